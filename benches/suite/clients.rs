//! WebSocket clients. Each TCP socket is bound to the next source address
//! of a rotating set (127.0.0.2, 127.0.0.3, ...) before it connects, so
//! that tens of thousands of connections, and the TIME_WAIT left by closed
//! ones, never exhaust the ephemeral ports of one address.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use futures::StreamExt;
use tokio::net::{TcpSocket, TcpStream};
use tokio::time::timeout;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{self, Message};

use crate::suite::fds;

pub type Ws = WebSocketStream<TcpStream>;

/// How long a connection and its upgrade may take before it counts as
/// failed; a server that has stopped accepting is found out this way.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);

/// How long a clean close may wait for the server's close frame and the
/// end of the connection.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(10);

/// The clients read small frames; tungstenite's default of 128 KiB per
/// connection would cost the suite gigabytes of address space at 19,000.
const READ_BUFFER_BYTES: usize = 8 * 1024;

/// Source addresses handed out in turn, 127.0.0.2 onwards. The whole of
/// 127.0.0.0/8 reaches the loopback interface on Linux.
pub struct Sources {
    count: u32,
    next: AtomicU32,
}

impl Sources {
    pub fn new(count: u32) -> Sources {
        Sources { count: count.clamp(1, 250), next: AtomicU32::new(0) }
    }

    fn next(&self) -> Ipv4Addr {
        let turn = self.next.fetch_add(1, Ordering::Relaxed) % self.count;
        Ipv4Addr::from(u32::from(Ipv4Addr::new(127, 0, 0, 2)) + turn)
    }
}

/// Opens a WebSocket to `addr` at `path_and_query`. The error says what
/// went wrong in words fit for a tally: a refusal's status and body, a
/// timeout, or running out of file descriptors.
pub async fn connect(
    addr: SocketAddr,
    path_and_query: &str,
    sources: &Sources,
) -> Result<Ws, String> {
    let attempt = async {
        let stream = tcp(addr, sources).await?;
        upgrade(addr, path_and_query, stream).await
    };
    match timeout(CONNECT_TIMEOUT, attempt).await {
        Ok(result) => result,
        Err(_) => Err(format!("no upgrade within {CONNECT_TIMEOUT:?}")),
    }
}

async fn tcp(addr: SocketAddr, sources: &Sources) -> Result<TcpStream, String> {
    let socket = TcpSocket::new_v4().map_err(|error| io_failure("socket", &error))?;
    let source = SocketAddr::from((sources.next(), 0));
    socket.bind(source).map_err(|error| io_failure("bind", &error))?;
    let stream = socket.connect(addr).await.map_err(|error| io_failure("connect", &error))?;
    stream.set_nodelay(true).map_err(|error| io_failure("nodelay", &error))?;
    Ok(stream)
}

fn io_failure(step: &str, error: &std::io::Error) -> String {
    if fds::is_exhausted(error) {
        return fds::exhausted_here();
    }
    format!("{step}: {error}")
}

async fn upgrade(addr: SocketAddr, path_and_query: &str, stream: TcpStream) -> Result<Ws, String> {
    let request = format!("ws://{addr}{path_and_query}").into_client_request();
    let request = request.map_err(|error| format!("bad request: {error}"))?;
    let config = WebSocketConfig::default().read_buffer_size(READ_BUFFER_BYTES);
    match tokio_tungstenite::client_async_with_config(request, stream, Some(config)).await {
        Ok((ws, _)) => Ok(ws),
        Err(tungstenite::Error::Http(response)) => {
            let body = response.body().as_deref().unwrap_or_default();
            Err(format!("refused with {}: {}", response.status(), String::from_utf8_lossy(body)))
        }
        Err(error) => Err(format!("upgrade failed: {error}")),
    }
}

/// Sends a close frame and reads until the connection ends, skipping
/// whatever the server sent meanwhile.
pub async fn close(mut ws: Ws) -> Result<(), String> {
    let closing = async {
        ws.close(None).await.map_err(|error| format!("close failed: {error}"))?;
        while let Some(message) = ws.next().await {
            if let Err(error) = message {
                return Err(format!("error while closing: {error}"));
            }
        }
        Ok(())
    };
    timeout(CLOSE_TIMEOUT, closing).await.unwrap_or(Err("the close was never answered".into()))
}

/// Reads what is left after the server's close frame, so that the reply
/// goes out and the connection ends; errors no longer matter then.
pub async fn finish(mut ws: Ws) {
    let _ = timeout(CLOSE_TIMEOUT, async { while let Some(Ok(_)) = ws.next().await {} }).await;
}

/// A binary message of `bytes` bytes, as a 20 ms frame of 16 kHz PCM is.
pub fn frame(bytes: usize) -> Message {
    Message::Binary(vec![0x5a; bytes].into())
}

/// The close code and reason of a close frame, `None` for a bare close.
pub fn close_of(message: &Message) -> Option<(u16, String)> {
    match message {
        Message::Close(Some(frame)) => Some((u16::from(frame.code), frame.reason.to_string())),
        _ => None,
    }
}
