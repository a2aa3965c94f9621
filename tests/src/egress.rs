//! How kube-apiserver reaches a kubelet inside a qemu guest, for `kubectl exec`, `logs` and port-forward.
//!
//! The kubelet reports the guest's address (10.0.2.15, qemu's user network), which the host cannot route to; its
//! port is forwarded to a port on the host's 127.0.0.1 instead (kubelet refuses a loopback node IP, so the Node
//! cannot simply name that). kube-apiserver's egress selector sends its `cluster` traffic (to nodes, pods and
//! services) as HTTP CONNECT requests over a unix socket; this proxy serves that socket and connects each
//! requested `address:port` it knows to its forwarded host port, refusing every other destination (502).
//! A plain thread per connection: the bed's tests often block their async runtime (a kubectl call), which must
//! not stall the API server's way to the kubelet.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use anyhow::{Context, Result};

/// The egress proxy: serves its socket until dropped.
pub struct EgressProxy {
    socket: PathBuf,
    routes: Arc<RwLock<BTreeMap<String, SocketAddr>>>,
}

impl EgressProxy {
    /// Listens on the unix socket `socket` (made here; its path must be shorter than 108 bytes).
    pub fn start(socket: &Path) -> Result<EgressProxy> {
        let listener = UnixListener::bind(socket).with_context(|| format!("binding {}", socket.display()))?;
        let routes: Arc<RwLock<BTreeMap<String, SocketAddr>>> = Arc::default();
        let table = routes.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming().flatten() {
                let table = table.clone();
                std::thread::spawn(move || {
                    if let Err(e) = serve(conn, &table) {
                        eprintln!("egress proxy: {e:#}");
                    }
                });
            }
        });
        Ok(EgressProxy { socket: socket.to_owned(), routes })
    }

    /// From now on, a CONNECT to `destination` (`host:port` as the API server writes it) goes to `to`.
    pub fn route(&self, destination: &str, to: SocketAddr) {
        self.routes.write().unwrap_or_else(|p| p.into_inner()).insert(destination.to_owned(), to);
    }

    /// kube-apiserver's `--egress-selector-config-file` contents for this proxy.
    pub fn apiserver_config(&self) -> String {
        format!(
            "apiVersion: apiserver.k8s.io/v1beta1\nkind: EgressSelectorConfiguration\negressSelections:\n\
             - name: cluster\n  connection:\n    proxyProtocol: HTTPConnect\n    transport:\n      uds:\n        \
             udsName: {}\n",
            self.socket.display()
        )
    }
}

impl Drop for EgressProxy {
    fn drop(&mut self) {
        // The accepting thread stays blocked in accept(2) on a socket nobody can reach any more.
        let _ = std::fs::remove_file(&self.socket);
    }
}

fn serve(conn: UnixStream, routes: &RwLock<BTreeMap<String, SocketAddr>>) -> Result<()> {
    conn.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut reader = BufReader::new(conn.try_clone()?);
    let mut request = String::new();
    reader.read_line(&mut request)?;
    // The header lines end with an empty one; none of them matters here.
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 || line.trim().is_empty() {
            break;
        }
    }
    let mut conn = conn;
    let destination = match request.split_whitespace().collect::<Vec<_>>().as_slice() {
        ["CONNECT", destination, _] => destination.to_string(),
        _ => {
            conn.write_all(b"HTTP/1.1 405 Method Not Allowed\r\n\r\n")?;
            anyhow::bail!("not a CONNECT request: {:?}", request.trim());
        }
    };
    let target = routes.read().unwrap_or_else(|p| p.into_inner()).get(&destination).copied();
    let Some(target) = target else {
        conn.write_all(b"HTTP/1.1 502 Bad Gateway\r\n\r\n")?;
        anyhow::bail!("no route to {destination} (only forwarded kubelet ports are reachable)");
    };
    let upstream = match TcpStream::connect_timeout(&target, Duration::from_secs(10)) {
        Ok(s) => s,
        Err(e) => {
            conn.write_all(b"HTTP/1.1 502 Bad Gateway\r\n\r\n")?;
            return Err(e).with_context(|| format!("connecting {destination} through {target}"));
        }
    };
    conn.write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")?;
    conn.set_read_timeout(None)?;
    // Bytes the API server sent right after its request are already in the reader's buffer.
    let buffered = reader.buffer().to_vec();
    let (mut up_write, mut up_read) = (upstream.try_clone()?, upstream);
    up_write.write_all(&buffered)?;
    let mut down_write = conn.try_clone()?;
    let mut down_read = reader.into_inner();
    let upward = std::thread::spawn(move || {
        let _ = std::io::copy(&mut down_read, &mut up_write);
        let _ = up_write.shutdown(Shutdown::Write);
    });
    let _ = std::io::copy(&mut up_read, &mut down_write);
    let _ = down_write.shutdown(Shutdown::Write);
    let _ = upward.join();
    Ok(())
}
