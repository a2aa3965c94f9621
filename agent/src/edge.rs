//! The connection limit of the agent's listener (issue 18 item 4): anyone who can reach the port (every pod on the
//! node) could otherwise open connections until the agent runs out of memory or descriptors. A connection holds a
//! permit from the moment it is accepted, before its TLS handshake, until it is closed; one accepted while none
//! is left is closed at once. The handshake (10 s) and each request's headers (`--header-read-timeout-seconds`)
//! have deadlines, so no connection keeps its permit by saying nothing.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};

use axum_server::accept::Accept;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Wraps the acceptor `inner` (the TLS one wraps this) with at most `max` connections at a time.
#[derive(Clone)]
pub struct ConnectionLimit<A> {
    inner: A,
    permits: Arc<Semaphore>,
    max: usize,
    /// So that a flood is logged once per episode, not once per connection.
    refusing: Arc<AtomicBool>,
}

impl<A> ConnectionLimit<A> {
    pub fn new(inner: A, max: usize) -> ConnectionLimit<A> {
        ConnectionLimit { inner, permits: Arc::new(Semaphore::new(max)), max, refusing: Arc::default() }
    }
}

impl<A, I, S> Accept<I, S> for ConnectionLimit<A>
where
    A: Accept<I, S>,
    A::Future: Send + 'static,
    A::Stream: Send + 'static,
    A::Service: Send + 'static,
{
    type Stream = Limited<A::Stream>;
    type Service = A::Service;
    type Future = Pin<Box<dyn Future<Output = io::Result<(Self::Stream, Self::Service)>> + Send>>;

    fn accept(&self, stream: I, service: S) -> Self::Future {
        let Ok(permit) = self.permits.clone().try_acquire_owned() else {
            if !self.refusing.swap(true, Ordering::Relaxed) {
                tracing::warn!(max = self.max, "connection limit reached: new connections are closed at once");
            }
            drop(stream);
            return Box::pin(std::future::ready(Err(io::Error::other("connection limit reached"))));
        };
        if self.permits.available_permits() > self.max / 2 && self.refusing.swap(false, Ordering::Relaxed) {
            tracing::info!("connections are below the limit again");
        }
        let accepted = self.inner.accept(stream, service);
        Box::pin(async move {
            let (stream, service) = accepted.await?;
            Ok((Limited { inner: stream, _permit: permit }, service))
        })
    }
}

/// A connection's stream with its permit, given back when the connection is dropped.
pub struct Limited<S> {
    inner: S,
    _permit: OwnedSemaphorePermit,
}

impl<S: AsyncRead + Unpin> AsyncRead for Limited<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Limited<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}
