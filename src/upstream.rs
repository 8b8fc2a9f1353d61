//! Connections to the service behind a session: `ws://` or `wss://`, with
//! TLS through rustls, trusting the system's roots and an optional extra CA
//! file. A connection is opened before the client's upgrade is accepted, so
//! that an unreachable service costs the client nothing.

use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use axum::http::HeaderValue;
use rustls::{ClientConfig, RootCertStore};
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, WebSocketConfig};
use tokio_tungstenite::{Connector, MaybeTlsStream, WebSocketStream};
use tracing::warn;

use crate::config::Upstream;

pub type UpstreamSocket = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// The read buffer of an upstream connection, as for clients: frames
/// larger than this still arrive, in several reads. Unlike a client's, the
/// connection has no read-ahead beneath it (`read_ahead`), so an upstream
/// sending in bulk costs a read from the socket for every 2 KiB.
const READ_BUFFER_BYTES: usize = 2 * 1024;

/// How long an unused upstream connection is given to take its close.
const CLOSE_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// An upstream connection opened for a session whose upgrade has not
/// completed yet. If the session never starts, the upstream is told so with
/// a close frame rather than left to find its connection dropped.
pub struct OpenUpstream(Option<UpstreamSocket>);

impl OpenUpstream {
    pub fn into_socket(mut self) -> UpstreamSocket {
        self.0.take().expect("taken once")
    }
}

impl Drop for OpenUpstream {
    fn drop(&mut self) {
        let (Some(mut socket), Ok(runtime)) =
            (self.0.take(), tokio::runtime::Handle::try_current())
        else {
            return;
        };
        runtime.spawn(async move {
            let frame = CloseFrame { code: CloseCode::Away, reason: "upgrade_failed".into() };
            let _ = tokio::time::timeout(CLOSE_WAIT, socket.close(Some(frame))).await;
        });
    }
}

#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("no answer within {0:?}")]
    Timeout(std::time::Duration),
    #[error("{0}")]
    Connect(#[from] tokio_tungstenite::tungstenite::Error),
    #[error("the human or session id cannot be sent as a header")]
    Human,
}

/// What every upstream connection is made with.
pub struct UpstreamClient {
    tls: Arc<ClientConfig>,
}

impl UpstreamClient {
    /// Loads the system's roots and the extra CA file, if any.
    pub fn new(extra_ca_file: Option<&Path>) -> anyhow::Result<UpstreamClient> {
        Ok(UpstreamClient { tls: Arc::new(tls_config(extra_ca_file)?) })
    }

    /// Opens a session's connection to `upstream`, telling it the human and
    /// the session (never the client's usage token).
    pub async fn connect(
        &self,
        upstream: &Upstream,
        human: &str,
        session_id: &str,
        max_message_bytes: usize,
    ) -> Result<OpenUpstream, UpstreamError> {
        let mut request = upstream.url.as_str().into_client_request()?;
        let headers = request.headers_mut();
        for (name, value) in &upstream.headers {
            headers.insert(name.clone(), value.clone());
        }
        // Human ids are checked at the edge (no control characters), so
        // this only fails for one stored before that check existed.
        let human = HeaderValue::from_bytes(human.as_bytes()).map_err(|_| UpstreamError::Human)?;
        headers.insert(upstream.human_id_header.clone(), human);
        let session = HeaderValue::from_str(session_id).map_err(|_| UpstreamError::Human)?;
        headers.insert(upstream.session_id_header.clone(), session);

        // The upstream is the operator's own service and trusted this far:
        // its write buffer is not capped as a client's is, so an upstream
        // that sends pings without ever reading makes the session buffer its
        // pongs without bound until the connection ends.
        let config = WebSocketConfig::default()
            .read_buffer_size(READ_BUFFER_BYTES)
            .max_message_size(Some(max_message_bytes))
            .max_frame_size(Some(max_message_bytes));
        let connector = Connector::Rustls(self.tls.clone());
        let connecting = tokio_tungstenite::connect_async_tls_with_config(
            request,
            Some(config),
            true,
            Some(connector),
        );
        match tokio::time::timeout(upstream.connect_timeout, connecting).await {
            Ok(connected) => Ok(OpenUpstream(Some(connected?.0))),
            Err(_) => Err(UpstreamError::Timeout(upstream.connect_timeout)),
        }
    }
}

/// TLS for every upstream, WebSocket or HTTP: ring's cryptography, the
/// system's roots and those of the extra CA file, if any.
pub fn tls_config(extra_ca_file: Option<&Path>) -> anyhow::Result<ClientConfig> {
    let mut roots = RootCertStore::empty();
    let native = rustls_native_certs::load_native_certs();
    for error in &native.errors {
        warn!(%error, "a system certificate could not be loaded");
    }
    roots.add_parsable_certificates(native.certs);
    if let Some(path) = extra_ca_file {
        add_ca_file(&mut roots, path)?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let tls = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("cannot set up TLS")?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(tls)
}

/// Adds every certificate of a PEM file to `roots`; a file with none is an
/// error, since nothing could then be reached through it.
pub(crate) fn add_ca_file(roots: &mut RootCertStore, path: &Path) -> anyhow::Result<()> {
    let certificates = CertificateDer::pem_file_iter(path)
        .with_context(|| format!("cannot read the CA file {}", path.display()))?;
    let mut added = 0;
    for certificate in certificates {
        let certificate = certificate
            .with_context(|| format!("a certificate in {} is malformed", path.display()))?;
        roots.add(certificate).context("a certificate of the CA file was refused")?;
        added += 1;
    }
    anyhow::ensure!(added > 0, "the CA file {} holds no PEM certificate", path.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ca_file_without_a_certificate_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ca.der");
        std::fs::write(&path, b"\x30\x82\x01\x0a\x02\x82").unwrap();
        let error = UpstreamClient::new(Some(&path)).err().expect("refused");
        assert!(error.to_string().contains("holds no PEM certificate"), "{error}");
        assert!(UpstreamClient::new(None).is_ok());
    }
}
