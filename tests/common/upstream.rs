//! A WebSocket service written for the tests, standing in for the service
//! behind a session (a voice agent, a speech synthesiser): plain, or TLS
//! with a certificate from a CA made on the spot. It records each
//! connection (the upgrade request, every frame, how it ended) and obeys
//! commands sent as text frames:
//!
//! - `close <code>`: closes with that code;
//! - `drop`: drops the connection without a close frame;
//! - `flood <count> <bytes>`: sends that many binary frames of that size;
//! - `big <bytes>`: sends one binary frame of that size;
//! - any other text comes back as `upstream: <text>`, and binary frames come
//!   back reversed, so that a test can tell them from the local echo.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::http::HeaderName;
use futures::{SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::handshake::server::{
    Callback, ErrorResponse, Request, Response,
};
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

/// What the upstream saw of one connection.
#[derive(Clone, Debug, Default)]
pub struct Connection {
    /// The request's path and query.
    pub uri: String,
    /// Every header of the upgrade request, names lowercase.
    pub headers: Vec<(String, String)>,
    pub received: Vec<Message>,
    /// The close frame the session sent, if it sent one.
    pub close: Option<CloseFrame>,
    /// The connection is gone.
    pub ended: bool,
}

impl Connection {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n == name).map(|(_, value)| value.as_str())
    }
}

type Connections = Arc<Mutex<Vec<Arc<Mutex<Connection>>>>>;

/// The server's settings for an upstream at `url`, with no extra headers.
pub fn upstream_at(url: &str) -> tollgate::config::Upstream {
    tollgate::config::Upstream {
        url: url.to_owned(),
        headers: Vec::new(),
        human_id_header: HeaderName::from_static("x-human-id"),
        session_id_header: HeaderName::from_static("x-session-id"),
        connect_timeout: Duration::from_secs(2),
    }
}

pub struct TestUpstream {
    pub url: String,
    /// The CA to trust for a TLS upstream.
    pub ca_file: Option<PathBuf>,
    connections: Connections,
    _dir: Option<tempfile::TempDir>,
}

impl TestUpstream {
    pub async fn plain() -> TestUpstream {
        TestUpstream::slow_to_answer(Duration::ZERO).await
    }

    /// A plain upstream that waits `delay` before it answers a handshake.
    pub async fn slow_to_answer(delay: Duration) -> TestUpstream {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("ws://{}/agent", listener.local_addr().unwrap());
        let connections = Connections::default();
        let recorded = connections.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let recorded = recorded.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(delay).await;
                    serve(stream, recorded).await;
                });
            }
        });
        TestUpstream { url, ca_file: None, connections, _dir: None }
    }

    /// A `wss://` upstream on 127.0.0.1 with a certificate signed by a CA
    /// whose certificate is in `ca_file`.
    pub async fn tls() -> TestUpstream {
        let (acceptor, ca_pem) = tls_acceptor();
        let dir = tempfile::tempdir().unwrap();
        let ca_file = dir.path().join("ca.pem");
        std::fs::write(&ca_file, ca_pem).unwrap();

        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("wss://{}/agent", listener.local_addr().unwrap());
        let connections = Connections::default();
        let recorded = connections.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let (acceptor, recorded) = (acceptor.clone(), recorded.clone());
                tokio::spawn(async move {
                    if let Ok(stream) = acceptor.accept(stream).await {
                        serve(stream, recorded).await;
                    }
                });
            }
        });
        TestUpstream { url, ca_file: Some(ca_file), connections, _dir: Some(dir) }
    }

    pub fn count(&self) -> usize {
        self.connections.lock().unwrap().len()
    }

    /// What the upstream has seen so far of connection `index`.
    pub fn connection(&self, index: usize) -> Connection {
        self.connections.lock().unwrap()[index].lock().unwrap().clone()
    }

    /// Connection `index` once it has ended.
    pub async fn ended(&self, index: usize) -> Connection {
        for _ in 0..200 {
            if self.count() > index && self.connection(index).ended {
                return self.connection(index);
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("upstream connection {index} never ended");
    }
}

async fn serve<S: AsyncRead + AsyncWrite + Unpin>(stream: S, connections: Connections) {
    let record = Arc::new(Mutex::new(Connection::default()));
    let callback = RecordRequest(record.clone());
    let Ok(mut socket) = tokio_tungstenite::accept_hdr_async(stream, callback).await else {
        return;
    };
    connections.lock().unwrap().push(record.clone());
    while let Some(Ok(message)) = socket.next().await {
        record.lock().unwrap().received.push(message.clone());
        if let Message::Close(frame) = &message {
            record.lock().unwrap().close = frame.clone();
            continue;
        }
        if !obey(&mut socket, message).await {
            break;
        }
    }
    record.lock().unwrap().ended = true;
}

/// Records the upgrade request of a connection.
struct RecordRequest(Arc<Mutex<Connection>>);

impl Callback for RecordRequest {
    fn on_request(self, request: &Request, response: Response) -> Result<Response, ErrorResponse> {
        let mut connection = self.0.lock().unwrap();
        connection.uri = request.uri().to_string();
        connection.headers = request
            .headers()
            .iter()
            .map(|(name, value)| {
                (name.as_str().to_owned(), value.to_str().unwrap_or("").to_owned())
            })
            .collect();
        Ok(response)
    }
}

/// Answers one frame; `false` to drop the connection.
async fn obey<S: AsyncRead + AsyncWrite + Unpin>(
    socket: &mut tokio_tungstenite::WebSocketStream<S>,
    message: Message,
) -> bool {
    let text = match message {
        Message::Binary(bytes) => {
            let reversed: Vec<u8> = bytes.iter().rev().copied().collect();
            return socket.send(Message::Binary(reversed.into())).await.is_ok();
        }
        Message::Text(text) => text.to_string(),
        _ => return true,
    };
    let words: Vec<&str> = text.split_whitespace().collect();
    match words.as_slice() {
        ["close", code] => {
            let code = CloseCode::from(code.parse::<u16>().unwrap());
            let frame = CloseFrame { code, reason: "bye".into() };
            socket.send(Message::Close(Some(frame))).await.is_ok()
        }
        ["drop"] => false,
        ["flood", count, bytes] => {
            let frame = vec![7u8; bytes.parse().unwrap()];
            for _ in 0..count.parse::<usize>().unwrap() {
                if socket.send(Message::Binary(frame.clone().into())).await.is_err() {
                    return false;
                }
            }
            true
        }
        ["big", bytes] => {
            let frame = vec![7u8; bytes.parse().unwrap()];
            socket.send(Message::Binary(frame.into())).await.is_ok()
        }
        _ => socket.send(Message::Text(format!("upstream: {text}").into())).await.is_ok(),
    }
}

/// A TLS acceptor for 127.0.0.1 with a certificate signed by a new CA, and
/// the CA's certificate as PEM.
fn tls_acceptor() -> (tokio_rustls::TlsAcceptor, String) {
    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
    use tokio_rustls::rustls;

    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
    let leaf_key = KeyPair::generate().unwrap();
    let leaf = CertificateParams::new(vec!["127.0.0.1".to_owned()])
        .unwrap()
        .signed_by(&leaf_key, &ca)
        .unwrap();

    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let key = rustls::pki_types::PrivateKeyDer::try_from(leaf_key.serialize_der()).unwrap();
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![leaf.der().clone()], key)
        .unwrap();
    (tokio_rustls::TlsAcceptor::from(Arc::new(config)), ca.pem())
}

/// What a stalling upstream saw.
#[derive(Debug, Default)]
pub struct Stalled {
    /// When it started reading again.
    pub resumed: Option<tokio::time::Instant>,
    /// When each data frame arrived after that.
    pub arrivals: Vec<tokio::time::Instant>,
    /// The close frame it got, if any.
    pub close: Option<CloseFrame>,
}

/// An upstream that accepts one connection, then neither reads nor answers
/// pings for `stall`; then it reads everything and never writes.
pub async fn stalling(stall: Duration) -> (String, Arc<Mutex<Stalled>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("ws://{}/agent", listener.local_addr().unwrap());
    let seen = Arc::new(Mutex::new(Stalled::default()));
    let record = seen.clone();
    tokio::spawn(async move {
        let (stream, _) = listener.accept().await.unwrap();
        let mut socket = tokio_tungstenite::accept_async(stream).await.unwrap();
        tokio::time::sleep(stall).await;
        record.lock().unwrap().resumed = Some(tokio::time::Instant::now());
        while let Some(Ok(message)) = socket.next().await {
            let mut seen = record.lock().unwrap();
            match message {
                Message::Close(frame) => seen.close = frame,
                Message::Text(_) | Message::Binary(_) => {
                    seen.arrivals.push(tokio::time::Instant::now())
                }
                _ => {}
            }
        }
    });
    (url, seen)
}
