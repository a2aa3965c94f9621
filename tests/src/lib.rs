//! The test bed: real Kubernetes parts on loopback, for Berth's end-to-end tests and for `hack/up`.
//!
//! [`TestBed::start`] boots etcd, kube-apiserver, kube-controller-manager, kube-scheduler and kwok (simulated
//! kubelets) in a fresh temporary directory on free loopback ports, creates the simulated nodes (optionally each
//! with a loop-mounted filesystem of its own) and waits until everything is ready. Dropping the [`TestBed`] stops
//! every process, unmounts every filesystem, detaches every loop device and removes the directory, also while a
//! test panics (then the logs are kept under `target/testbed-logs/`).
//!
//! [`vm`] runs commands inside a real Linux kernel under qemu, for what the host kernel cannot do.

pub mod agents;
mod bed;
pub mod bind_mount;
pub mod bins;
pub mod cgroup;
pub mod demo;
pub mod deploy;
mod egress;
pub mod identities;
pub mod kube_util;
mod node_disk;
pub mod on_node;
mod pki;
mod ports;
pub mod process;
pub mod prometheus;
pub mod real_node;
mod reaper;
mod tokens;
pub mod vm;

pub use bed::{FsType, NodeDiskSpec, NodeSpec, SimNode, TestBed, TestBedConfig};
pub use node_disk::NodeDisk;
