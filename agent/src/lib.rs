//! The agent's code as a library: `cli.rs` wires it together (both binaries, `berth-agent` and the test-only
//! `berth-agent-failpoints`, only call it), and the fuzz targets (`fuzz/`, docs/fuzzing.md) reach its parsers and
//! its router without a process.

// A library for the agent's own binary and fuzz targets, not an API for others: constructors need no `Default`.
#![allow(clippy::new_without_default)]

pub mod agent;
pub mod api;
pub mod auth;
pub mod backend;
pub mod capacity;
pub mod cli;
pub mod command;
pub mod config;
pub mod copy_tree;
pub mod edge;
pub mod epoch;
pub mod failpoints;
pub mod in_use;
pub mod metrics;
pub mod mountinfo;
pub mod node_lock;
pub mod publisher;
pub mod safe_remove;
pub mod tls;
