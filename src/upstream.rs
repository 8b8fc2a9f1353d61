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
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::{Connector, MaybeTlsStream, WebSocketStream};
use tracing::warn;

use crate::config::Upstream;

pub type UpstreamSocket = WebSocketStream<MaybeTlsStream<TcpStream>>;

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
        let mut roots = RootCertStore::empty();
        let native = rustls_native_certs::load_native_certs();
        for error in &native.errors {
            warn!(%error, "a system certificate could not be loaded");
        }
        roots.add_parsable_certificates(native.certs);
        if let Some(path) = extra_ca_file {
            let certificates = CertificateDer::pem_file_iter(path)
                .with_context(|| format!("cannot read the CA file {}", path.display()))?;
            for certificate in certificates {
                let certificate = certificate
                    .with_context(|| format!("a certificate in {} is malformed", path.display()))?;
                roots.add(certificate).context("a certificate of the CA file was refused")?;
            }
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let tls = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .context("cannot set up TLS")?
            .with_root_certificates(roots)
            .with_no_client_auth();
        Ok(UpstreamClient { tls: Arc::new(tls) })
    }

    /// Opens a session's connection to `upstream`, telling it the human and
    /// the session (never the client's usage token).
    pub async fn connect(
        &self,
        upstream: &Upstream,
        human: &str,
        session_id: &str,
        max_message_bytes: usize,
    ) -> Result<UpstreamSocket, UpstreamError> {
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

        let config = WebSocketConfig::default()
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
            Ok(connected) => Ok(connected?.0),
            Err(_) => Err(UpstreamError::Timeout(upstream.connect_timeout)),
        }
    }
}
