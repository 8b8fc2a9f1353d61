//! The TCP listener and the HTTP/1.1 connections on it, served by hyper
//! with upgrades (for WebSockets) and a header read timeout, over TLS when
//! the server has a certificate. On shutdown it stops accepting and lets
//! each connection finish the request in hand.

use std::net::SocketAddr;
use std::time::Duration;

use axum::Router;
use axum::extract::ConnectInfo;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::Service;
use tracing::{debug, warn};

/// Pending connections the kernel may queue before `accept`. tokio's
/// `bind` uses 128, which a burst of clients reconnecting at once
/// overflows; the kernel caps this at `net.core.somaxconn`.
const LISTEN_BACKLOG: u32 = 4096;

/// How long a client may take to send a request's headers. Closes
/// connections that trickle bytes to hold a slot (slowloris).
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a client may take over the TLS handshake, for the same reason.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Most bytes of a request's head (request line and headers) accepted;
/// hyper answers a longer one with `431` and closes the connection. No
/// client of this API sends more than a few KiB. Without it the bound is
/// hyper's read buffer, about 400 KiB, which each connection could hold
/// while it trickles its head for the 10 s the timeout above allows.
const MAX_HEAD_BYTES: usize = 64 * 1024;

/// After a failed `accept` (out of file descriptors, say), wait this long
/// before the next, rather than spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

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
    tls: Option<TlsAcceptor>,
    shutdown: CancellationToken,
) {
    let connections = TaskTracker::new();
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = shutdown.cancelled() => break,
        };
        match accepted {
            Ok((stream, peer)) => {
                let (router, tls, shutdown) = (router.clone(), tls.clone(), shutdown.clone());
                connections.spawn(connection(stream, peer, router, tls, shutdown));
            }
            Err(error) => {
                warn!(%error, "cannot accept a connection");
                tokio::time::sleep(ACCEPT_BACKOFF).await;
            }
        }
    }
    drop(listener);
    connections.close();
    connections.wait().await;
}

async fn connection(
    stream: TcpStream,
    peer: SocketAddr,
    router: Router,
    tls: Option<TlsAcceptor>,
    shutdown: CancellationToken,
) {
    let Some(acceptor) = tls else {
        return serve_http(stream, peer, router, shutdown).await;
    };
    match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
        Ok(Ok(stream)) => serve_http(stream, peer, router, shutdown).await,
        Ok(Err(error)) => debug!(%peer, %error, "TLS handshake failed"),
        Err(_) => debug!(%peer, "TLS handshake timed out"),
    }
}

/// Serves HTTP on one connection, plain or TLS, until it closes.
async fn serve_http<S>(stream: S, peer: SocketAddr, router: Router, shutdown: CancellationToken)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let service = hyper::service::service_fn(move |mut request: hyper::Request<Incoming>| {
        request.extensions_mut().insert(ConnectInfo(peer));
        router.clone().call(request)
    });
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
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
