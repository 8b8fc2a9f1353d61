//! Serving HTTPS and WSS directly, for deployments with no proxy in front:
//! the certificate chain and key read once at start-up, and the rustls
//! acceptor the listener wraps each connection in.
//!
//! The files are read only at start-up: a renewed certificate takes a
//! restart to be served (sessions are cut with 1001 and clients reconnect).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;
use rustls::ServerConfig;
use rustls::crypto::ring::default_provider;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::TlsAcceptor;

/// The PEM files of `--tls-cert` and `--tls-key`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// The server's certificate first, then the intermediates.
    pub cert: PathBuf,
    /// Its private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
}

/// An acceptor for the certificate and key in `files`, speaking only
/// HTTP/1.1 (the server has no HTTP/2, and WebSockets upgrade over 1.1).
pub fn acceptor(files: &TlsFiles) -> anyhow::Result<TlsAcceptor> {
    let chain = certificates(&files.cert)?;
    let key = PrivateKeyDer::from_pem_file(&files.key)
        .with_context(|| format!("tls_key: cannot read a private key from {:?}", files.key))?;
    let mut config = ServerConfig::builder_with_provider(Arc::new(default_provider()))
        .with_safe_default_protocol_versions()
        .context("rustls offers no protocol version")?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .with_context(|| {
            format!("tls_cert and tls_key: {:?} and {:?} do not make a pair", files.cert, files.key)
        })?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}

fn certificates(path: &Path) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let chain = CertificateDer::pem_file_iter(path)
        .and_then(|certificates| certificates.collect::<Result<Vec<_>, _>>())
        .with_context(|| format!("tls_cert: cannot read certificates from {path:?}"))?;
    anyhow::ensure!(!chain.is_empty(), "tls_cert: {path:?} holds no certificate");
    Ok(chain)
}
