//! Free loopback addresses and ports for one test bed.
//!
//! Each test bed gets its own address in 127.0.0.0/8 for everything that need not be on 127.0.0.1, so two beds
//! running at once cannot clash on ports there. Ports are drawn below the kernel's ephemeral range (32768+), so an
//! outgoing connection cannot grab a port between our check and the server's bind.

use std::collections::HashSet;
use std::net::{Ipv4Addr, SocketAddrV4, TcpListener};
use std::sync::{LazyLock, Mutex};

use anyhow::{Result, bail};

/// A random address 127.A.B.1 (A, B in 1..=254). Simulated node `i` of the bed gets 127.A.B.(10 + i).
pub fn bed_address() -> Ipv4Addr {
    Ipv4Addr::new(127, fastrand::u8(1..=254), fastrand::u8(1..=254), 1)
}

/// Every port this process has handed out. A server binds its port seconds after we pick it (kube-controller-manager
/// starts slowly), so "nothing listens there now" does not stop the next pick from returning the same port: one
/// CI run lost kube-controller-manager to kube-scheduler's port picked that way ("bind: address already in use").
static HANDED_OUT: LazyLock<Mutex<HashSet<(Ipv4Addr, u16)>>> = LazyLock::new(Default::default);

/// A TCP port on `ip` that nothing listens on right now and that this process has not handed out before.
pub fn free_port(ip: Ipv4Addr) -> Result<u16> {
    let mut handed_out = HANDED_OUT.lock().unwrap_or_else(|e| e.into_inner());
    for _ in 0..200 {
        let port = fastrand::u16(20000..32000);
        if !handed_out.contains(&(ip, port)) && TcpListener::bind(SocketAddrV4::new(ip, port)).is_ok() {
            handed_out.insert((ip, port));
            return Ok(port);
        }
    }
    bail!("no free TCP port on {ip} after 200 tries")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Picks made before any server binds never repeat: 2,000 of them on one address (random picks from 12,000
    /// ports without the record repeat one with a probability near 1).
    #[test]
    fn a_port_is_handed_out_once() {
        let ip = bed_address();
        let mut seen = HashSet::new();
        for _ in 0..2000 {
            let port = free_port(ip).unwrap();
            assert!(seen.insert(port), "{ip}:{port} handed out twice");
        }
    }
}
