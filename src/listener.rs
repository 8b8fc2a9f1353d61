//! The TCP listener and the HTTP/1.1 connections on it, served by hyper
//! with upgrades (for WebSockets) and a header read timeout, over TLS when
//! the server has a certificate. It holds at most a set number of
//! connections, sessions included, and answers those over the cap with a
//! 503 of its own. On shutdown it stops accepting and lets each connection
//! finish the request in hand.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::extract::ConnectInfo;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::Service;
use tracing::{debug, warn};

use crate::api::error::ApiError;
use crate::metrics::{CONNECTIONS_REFUSED, OPEN_CONNECTIONS};
use crate::read_ahead::ReadAhead;

/// Pending connections the kernel may queue before `accept`. tokio's
/// `bind` uses 128, which a burst of clients reconnecting at once
/// overflows; the kernel caps this at `net.core.somaxconn`.
const LISTEN_BACKLOG: u32 = 4096;

/// Most bytes of a request's head (request line and headers) accepted;
/// hyper answers a longer one with `431` and closes the connection. No
/// client of this API sends more than a few KiB. Without it the bound is
/// hyper's read buffer, about 400 KiB, which each connection could hold
/// while it trickles its head for as long as the header timeout allows.
const MAX_HEAD_BYTES: usize = 64 * 1024;

/// After a failed `accept` (out of file descriptors, say), wait this long
/// before the next, rather than spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// Open files the process needs besides its connections and their
/// upstreams: standard streams, the listener, the runtime's own, SQLite's
/// database, journal and lock files for each of its threads' connections,
/// and webhook deliveries (four at a time per endpoint).
const FILE_HEADROOM: u64 = 100;

/// Refused connections answered at once. Each holds a file until its
/// answer is read, so under a flood past the cap, connections beyond these
/// are closed without one.
const REFUSALS_AT_ONCE: usize = 32;

/// How long a refused connection is kept open after its answer, reading
/// and discarding what the client sends: closing a socket with unread
/// input resets it, and a reset can reach the client before it has read
/// the answer.
const REFUSAL_LINGER: Duration = Duration::from_secs(1);

/// The most a refused connection's input is read before it is closed.
const REFUSAL_DRAIN_BYTES: usize = 64 * 1024;

/// How the listener treats its connections.
#[derive(Clone)]
pub struct ListenerSettings {
    /// The most connections held at once, upgraded sessions included.
    pub max_connections: u32,
    /// How long a client may take to send a request's headers, from the
    /// moment it connects or its previous answer was sent. hyper closes a
    /// connection that trickles bytes to hold its slot (slowloris), and
    /// one that sends nothing at all, when it runs out. A TLS handshake
    /// gets as long.
    pub header_timeout: Duration,
    /// Serve TLS with this, when the server has a certificate.
    pub tls: Option<TlsAcceptor>,
}

/// The cap on connections when none is set: the open-file limit less
/// [`FILE_HEADROOM`], halved when there are upstreams (`with_upstreams`),
/// since a session relayed to one, or a chat completion forwarded to one,
/// holds a second file for it. An echoed session, or any other request,
/// holds one.
pub fn default_max_connections(with_upstreams: bool) -> u32 {
    let limit = rustix::process::getrlimit(rustix::process::Resource::Nofile);
    let files = limit.current.unwrap_or(u64::MAX).saturating_sub(FILE_HEADROOM);
    let cap = if with_upstreams { files / 2 } else { files };
    u32::try_from(cap).unwrap_or(u32::MAX).max(1)
}

pub fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

/// Accepts connections until `shutdown`, then waits for the open ones to
/// finish their current request. Upgraded connections have left hyper by
/// then; their sessions end through the meter.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    settings: ListenerSettings,
    shutdown: CancellationToken,
) {
    let slots = Arc::new(Semaphore::new(settings.max_connections as usize));
    let refusals = Arc::new(Semaphore::new(REFUSALS_AT_ONCE));
    let connections = TaskTracker::new();
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = shutdown.cancelled() => break,
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(error) => {
                warn!(%error, "cannot accept a connection");
                tokio::time::sleep(ACCEPT_BACKOFF).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            // A TLS client would read a plain answer as a broken handshake:
            // it is closed without one.
            let refusals = if settings.tls.is_some() { None } else { Some(&refusals) };
            refuse(stream, refusals, &connections);
            continue;
        };
        let held = Held::new(stream, slot);
        let serving = connection(held, peer, router.clone(), settings.clone(), shutdown.clone());
        connections.spawn(serving);
    }
    drop(listener);
    connections.close();
    connections.wait().await;
}

async fn connection(
    stream: Held,
    peer: SocketAddr,
    router: Router,
    settings: ListenerSettings,
    shutdown: CancellationToken,
) {
    let timeout = settings.header_timeout;
    let Some(acceptor) = settings.tls else {
        return serve_http(stream, peer, router, timeout, shutdown).await;
    };
    // The handshake gets as long as the headers do, for the same reason.
    match tokio::time::timeout(timeout, acceptor.accept(stream)).await {
        Ok(Ok(stream)) => serve_http(stream, peer, router, timeout, shutdown).await,
        Ok(Err(error)) => debug!(%peer, %error, "TLS handshake failed"),
        Err(_) => debug!(%peer, "TLS handshake timed out"),
    }
}

/// Serves HTTP on one connection, plain or TLS, until it closes.
async fn serve_http<S>(
    stream: S,
    peer: SocketAddr,
    router: Router,
    header_timeout: Duration,
    shutdown: CancellationToken,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let service = hyper::service::service_fn(move |mut request: hyper::Request<Incoming>| {
        request.extensions_mut().insert(ConnectInfo(peer));
        router.clone().call(request)
    });
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(header_timeout)
        .max_header_size(MAX_HEAD_BYTES);
    let connection = builder.serve_connection(TokioIo::new(stream), service).with_upgrades();
    tokio::pin!(connection);
    let result = tokio::select! {
        result = connection.as_mut() => result,
        _ = shutdown.cancelled() => {
            connection.as_mut().graceful_shutdown();
            connection.await
        }
    };
    if let Err(error) = result {
        debug!(%peer, %error, "connection ended with an error");
    }
}

/// Turns away a connection over the cap: answered with a 503 without its
/// request being read, while few are being answered (`refusals`), and
/// closed at once otherwise or with no `refusals` to answer with.
fn refuse(stream: TcpStream, refusals: Option<&Arc<Semaphore>>, connections: &TaskTracker) {
    metrics::counter!(CONNECTIONS_REFUSED).increment(1);
    debug!("refused a connection: the server holds as many as it may");
    let Some(Ok(answering)) = refusals.map(|r| r.clone().try_acquire_owned()) else {
        return;
    };
    connections.spawn(async move {
        let _ = tokio::time::timeout(REFUSAL_LINGER, answer_refusal(stream)).await;
        drop(answering);
    });
}

/// Writes the refusal, ends the sending side, and reads what the client
/// sends until it closes its side too.
async fn answer_refusal(mut stream: TcpStream) -> io::Result<()> {
    stream.write_all(&ApiError::TooManyConnections.raw_response()).await?;
    stream.shutdown().await?;
    let mut discarded = [0u8; 4096];
    let mut left = REFUSAL_DRAIN_BYTES;
    while left > 0 {
        match stream.read(&mut discarded).await? {
            0 => break,
            read => left = left.saturating_sub(read),
        }
    }
    Ok(())
}

/// A connection's socket with its slot under the cap. The slot is given
/// back when the socket is dropped, by hyper or, after an upgrade, by the
/// session that took the socket over.
struct Held {
    stream: ReadAhead<TcpStream>,
    _slot: OwnedSemaphorePermit,
}

impl Held {
    fn new(stream: TcpStream, slot: OwnedSemaphorePermit) -> Held {
        metrics::gauge!(OPEN_CONNECTIONS).increment(1);
        Held { stream: ReadAhead::new(stream), _slot: slot }
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        metrics::gauge!(OPEN_CONNECTIONS).decrement(1);
    }
}

impl AsyncRead for Held {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for Held {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}
