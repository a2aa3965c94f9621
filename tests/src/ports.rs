//! Free loopback addresses and ports for one test bed.
//!
//! Each test bed gets its own address in 127.0.0.0/8 for everything that need not be on 127.0.0.1, so two beds
//! running at once cannot clash on ports there. Ports are drawn below the kernel's ephemeral range (32768+), so an
//! outgoing connection cannot grab a port between our check and the server's bind.

use std::net::{Ipv4Addr, SocketAddrV4, TcpListener};

use anyhow::{Result, bail};

/// A random address 127.A.B.1 (A, B in 1..=254). Simulated node `i` of the bed gets 127.A.B.(10 + i).
pub fn bed_address() -> Ipv4Addr {
    Ipv4Addr::new(127, fastrand::u8(1..=254), fastrand::u8(1..=254), 1)
}

/// A TCP port on `ip` that nothing listens on right now.
pub fn free_port(ip: Ipv4Addr) -> Result<u16> {
    for _ in 0..200 {
        let port = fastrand::u16(20000..32000);
        if TcpListener::bind(SocketAddrV4::new(ip, port)).is_ok() {
            return Ok(port);
        }
    }
    bail!("no free TCP port on {ip} after 200 tries")
}
