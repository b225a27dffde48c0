//! The accept loop's guard against running out of file descriptors: a listener that holds
//! one permit per open connection and stops accepting at the instance's capacity, leaving
//! further clients in the kernel's backlog instead of failing with EMFILE. Each new
//! connection is sniffed first, so event streams can be served on lean connections
//! ([`crate::stream_conn`]).

use std::{
    io,
    net::SocketAddr,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use futures::{StreamExt, future::BoxFuture, stream::FuturesUnordered};
use rustix::process::{Resource, getrlimit, setrlimit};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream},
    sync::{OwnedSemaphorePermit, Semaphore},
};

use crate::stream_conn::Triage;

/// Descriptors kept back from connections for database pools, Redis, logs and files.
const RESERVED_FDS: u64 = 256;

/// Raises the soft open-files limit to the hard one; returns the limit now in force.
pub fn raise_open_files_limit() -> u64 {
    let mut limit = getrlimit(Resource::Nofile);
    if limit.current != limit.maximum {
        limit.current = limit.maximum;
        if let Err(err) = setrlimit(Resource::Nofile, limit) {
            tracing::warn!(%err, "cannot raise the open-files limit");
            limit = getrlimit(Resource::Nofile);
        }
    }
    limit.current.unwrap_or(1 << 20)
}

/// How many connections fit under the (raised) open-files limit, less a reserve.
pub fn connection_capacity() -> usize {
    let files = raise_open_files_limit();
    usize::try_from(files.saturating_sub(RESERVED_FDS).max(16)).unwrap_or(usize::MAX)
}

/// A TCP listener that admits at most `capacity` open connections and hands axum those that
/// [`Triage`] does not serve itself.
pub struct LimitedListener {
    inner: TcpListener,
    permits: Arc<Semaphore>,
    triage: Triage,
    /// New connections waiting for their first bytes.
    sniffing: FuturesUnordered<BoxFuture<'static, Option<(Limited, SocketAddr)>>>,
}

impl LimitedListener {
    pub fn new(inner: TcpListener, capacity: usize, triage: Triage) -> Self {
        Self {
            inner,
            permits: Arc::new(Semaphore::new(capacity)),
            triage,
            sniffing: FuturesUnordered::new(),
        }
    }
}

impl axum::serve::Listener for LimitedListener {
    type Io = Limited;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Limited, SocketAddr) {
        loop {
            tokio::select! {
                Some(sniffed) = self.sniffing.next() => {
                    if let Some(conn) = sniffed {
                        return conn;
                    }
                }
                (conn, addr) = accept_within(&self.inner, &self.permits) => {
                    let triage = self.triage.clone();
                    self.sniffing.push(Box::pin(async move {
                        triage.sniff(conn).await.map(|conn| (conn, addr))
                    }));
                }
            }
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.inner.local_addr()
    }
}

/// Accepts the next connection once a permit is free. Cancel-safe: dropped before a
/// connection arrives, it loses nothing.
async fn accept_within(listener: &TcpListener, permits: &Arc<Semaphore>) -> (Limited, SocketAddr) {
    let permit = Arc::clone(permits)
        .acquire_owned()
        .await
        .expect("the permit semaphore is never closed");
    loop {
        match listener.accept().await {
            Ok((stream, addr)) => {
                // Small frames must leave at once; latency is the product.
                let _ = stream.set_nodelay(true);
                return (
                    Limited {
                        stream,
                        _permit: permit,
                    },
                    addr,
                );
            }
            Err(err) => {
                // EMFILE and friends: wait for descriptors to free up, never crash.
                tracing::warn!(%err, "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// An accepted connection that returns its permit when closed.
pub struct Limited {
    stream: TcpStream,
    _permit: OwnedSemaphorePermit,
}

impl Limited {
    /// The socket, for peeking and readiness checks that need no buffer.
    pub fn stream(&self) -> &TcpStream {
        &self.stream
    }
}

impl AsyncRead for Limited {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for Limited {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}
