//! TLS to PostgreSQL through rustls, as the URL's `sslmode` asks for it.
//! tokio-postgres reads only three of libpq's modes and no `sslrootcert`,
//! so both are taken out of the URL here and the rest is left to it.
//!
//! The modes mean what they mean to libpq: `disable` never uses TLS;
//! `prefer` (the default) uses it when the server offers it, and `require`
//! always; `verify-ca` checks that a trusted CA signed the server's
//! certificate, and `verify-full` that it also names the host connected
//! to. Under `prefer` and `require` the certificate is checked as under
//! `verify-ca` when `sslrootcert` names a CA, and not at all otherwise.
//! The CA is the PEM file `sslrootcert` names, which must be readable
//! whatever the mode (libpq skips the check under `prefer` and `require`
//! when it is not there). With `sslrootcert=system`, the system's roots,
//! the mode is `verify-full`, and any other is refused, as libpq 16 and
//! later refuse it. `verify-ca` and `verify-full` without `sslrootcert`
//! are refused: libpq would read `~/.postgresql/root.crt`, which is not
//! read here.
//!
//! `~/.postgresql/root.crt` and `root.crl` are never read, nor libpq's
//! `PGSSLMODE` and `PGSSLROOTCERT`: where libpq would check a certificate
//! against that file under `prefer` or `require` without `sslrootcert`,
//! the certificate is taken unchecked here, so name the CA in the URL.
//! Under `prefer`, a certificate that fails its check fails the
//! connection, where libpq would try again without TLS.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
};
use tokio_postgres::config::SslMode;
use tokio_postgres_rustls::MakeRustlsConnect;

/// How a connection uses TLS.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Disable,
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

impl Mode {
    /// The mode's name in a URL.
    fn name(self) -> &'static str {
        match self {
            Mode::Disable => "disable",
            Mode::Prefer => "prefer",
            Mode::Require => "require",
            Mode::VerifyCa => "verify-ca",
            Mode::VerifyFull => "verify-full",
        }
    }

    fn parse(value: &str) -> Result<Mode, String> {
        Ok(match value {
            "disable" => Mode::Disable,
            "prefer" => Mode::Prefer,
            "require" => Mode::Require,
            "verify-ca" => Mode::VerifyCa,
            "verify-full" => Mode::VerifyFull,
            other => {
                return Err(format!(
                    "sslmode {other:?} is not one of disable, prefer, require, verify-ca, \
                     verify-full"
                ));
            }
        })
    }
}

/// Where the CA that checks the server's certificate comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Roots {
    /// `sslrootcert=system`: the system's trusted roots.
    System,
    /// The PEM file `sslrootcert` names.
    File(PathBuf),
}

impl Roots {
    /// An `sslrootcert` value; an empty one is none, as to libpq.
    fn parse(value: &str) -> Option<Roots> {
        match value {
            "" => None,
            "system" => Some(Roots::System),
            path => Some(Roots::File(PathBuf::from(path))),
        }
    }
}

/// Why `mode` is refused with `sslrootcert=system`, as libpq 16 and later
/// refuse it: the system's roots sign certificates for names of every
/// kind, so only the check of the name makes one the database's.
fn weak_with_system(mode: Mode) -> String {
    format!(
        "sslmode={} may not be used with sslrootcert=system: use sslmode=verify-full \
         (the default with sslrootcert=system), or name the CA's file in sslrootcert",
        mode.name()
    )
}

/// Why `mode` is refused without `sslrootcert`. libpq would read
/// `~/.postgresql/root.crt` then, and fail without it; that file is not
/// read here (libpq finds the home directory differently from version to
/// version, and reads `root.crl` beside it), so the CA must be named.
fn verify_without_roots(mode: Mode) -> String {
    let instead = match mode {
        Mode::VerifyCa => "or use sslmode=verify-full with sslrootcert=system",
        _ => "or sslrootcert=system for the system's roots",
    };
    format!(
        "sslmode={} needs the CA named: sslrootcert=/path/to/ca.pem, its PEM file, {instead} \
         (~/.postgresql/root.crt, which libpq would read, is not)",
        mode.name()
    )
}

/// The TLS settings of a URL.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Tls {
    mode: Mode,
    /// `sslrootcert`, when the URL names one.
    roots: Option<Roots>,
}

/// `url` without its `sslmode` and `sslrootcert`, and what they say.
pub fn split(url: &str) -> Result<(String, Tls), String> {
    let Some(at) = query_start(url) else {
        return Ok((url.to_owned(), Tls::new(None, None)?));
    };
    let (mut mode, mut roots) = (None, None);
    let mut kept = Vec::new();
    for pair in url[at + 1..].split('&') {
        match pair.split_once('=') {
            Some(("sslmode", value)) => mode = Some(Mode::parse(&decode(value)?)?),
            Some(("sslrootcert", value)) => roots = Roots::parse(&decode(value)?),
            _ => kept.push(pair),
        }
    }
    let rest = if kept.is_empty() { String::new() } else { format!("?{}", kept.join("&")) };
    Ok((format!("{}{rest}", &url[..at]), Tls::new(mode, roots)?))
}

/// Where the query of `url` starts: its first `?` after the user's part,
/// which tokio-postgres ends at the first `@` (a password may hold `?`).
fn query_start(url: &str) -> Option<usize> {
    let after_scheme = url.find("://").map_or(0, |at| at + 3);
    let after_user = url[after_scheme..].find('@').map_or(after_scheme, |at| after_scheme + at);
    url[after_user..].find('?').map(|at| after_user + at)
}

/// A query value with its `%XX` escapes decoded.
fn decode(value: &str) -> Result<String, String> {
    let bad = || format!("a malformed %-escape in {value:?}");
    let mut bytes = Vec::with_capacity(value.len());
    let mut rest = value.bytes();
    while let Some(byte) = rest.next() {
        if byte != b'%' {
            bytes.push(byte);
            continue;
        }
        let hex = [rest.next().ok_or_else(bad)?, rest.next().ok_or_else(bad)?];
        let hex = std::str::from_utf8(&hex).map_err(|_| bad())?;
        bytes.push(u8::from_str_radix(hex, 16).map_err(|_| bad())?);
    }
    String::from_utf8(bytes).map_err(|_| bad())
}

impl Tls {
    /// The settings `sslmode` (if given) and `sslrootcert` make together.
    fn new(mode: Option<Mode>, roots: Option<Roots>) -> Result<Tls, String> {
        let mode = match (mode, &roots) {
            (None, Some(Roots::System)) => Mode::VerifyFull,
            (Some(weak), Some(Roots::System)) if weak != Mode::VerifyFull => {
                return Err(weak_with_system(weak));
            }
            (Some(mode @ (Mode::VerifyCa | Mode::VerifyFull)), None) => {
                return Err(verify_without_roots(mode));
            }
            (mode, _) => mode.unwrap_or(Mode::Prefer),
        };
        Ok(Tls { mode, roots })
    }

    /// What tokio-postgres is to ask the server for.
    pub fn negotiation(&self) -> SslMode {
        match self.mode {
            Mode::Disable => SslMode::Disable,
            Mode::Prefer => SslMode::Prefer,
            Mode::Require | Mode::VerifyCa | Mode::VerifyFull => SslMode::Require,
        }
    }

    /// The connector for every connection: ring's cryptography and the
    /// checks the mode asks for. Fails when the CA file cannot be read.
    pub fn connector(&self) -> anyhow::Result<MakeRustlsConnect> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        // A CA named under prefer or require is checked as under
        // verify-ca, as libpq checks it.
        // Only prefer and require come without a CA (see `Tls::new`).
        let verifier: Arc<dyn ServerCertVerifier> = match (self.mode, &self.roots) {
            (Mode::Disable, _) | (_, None) => Arc::new(Unchecked(provider.clone())),
            (Mode::VerifyFull, Some(roots)) => webpki(roots, &provider)?,
            (_, Some(roots)) => Arc::new(ChainOnly(webpki(roots, &provider)?)),
        };
        let config = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .context("cannot set up TLS to PostgreSQL")?
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_no_client_auth();
        Ok(MakeRustlsConnect::new(config))
    }
}

/// rustls's own check of chain and name, against `roots`.
fn webpki(
    roots: &Roots,
    provider: &Arc<CryptoProvider>,
) -> anyhow::Result<Arc<WebPkiServerVerifier>> {
    let mut store = RootCertStore::empty();
    match roots {
        Roots::File(path) => crate::upstream::add_ca_file(&mut store, path)?,
        Roots::System => {
            store.add_parsable_certificates(rustls_native_certs::load_native_certs().certs);
        }
    }
    WebPkiServerVerifier::builder_with_provider(Arc::new(store), provider.clone())
        .build()
        .context("cannot check PostgreSQL's certificate: no CA to check it against")
}

/// The handshake's signatures checked, as they always are.
fn algorithms(provider: &CryptoProvider) -> &WebPkiSupportedAlgorithms {
    &provider.signature_verification_algorithms
}

/// `prefer` and `require` without a CA named: any certificate is taken,
/// as libpq takes it.
#[derive(Debug)]
struct Unchecked(Arc<CryptoProvider>);

impl ServerCertVerifier for Unchecked {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, algorithms(&self.0))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, algorithms(&self.0))
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        algorithms(&self.0).supported_schemes()
    }
}

/// `verify-ca`, and `prefer` or `require` with a CA named: rustls's check,
/// less the name. rustls checks the chain before the name, so a
/// certificate refused only for its name has a trusted chain.
#[derive(Debug)]
struct ChainOnly(Arc<WebPkiServerVerifier>);

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self.0.verify_server_cert(end_entity, intermediates, server_name, ocsp, now) {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sslmode_and_sslrootcert_are_taken_out_of_the_url_and_the_rest_is_kept() {
        let url = "postgres://ada:p?w@db/x?sslmode=verify-full&application_name=a\
                   &sslrootcert=%2Fetc%2Fca.pem";
        let (rest, tls) = split(url).unwrap();
        assert_eq!(rest, "postgres://ada:p?w@db/x?application_name=a");
        assert_eq!(tls.mode, Mode::VerifyFull);
        assert_eq!(tls.roots, Some(Roots::File(PathBuf::from("/etc/ca.pem"))));

        let (rest, tls) = split("postgres://db/x?sslmode=verify-ca&sslrootcert=ca.pem").unwrap();
        assert_eq!((rest.as_str(), tls.mode), ("postgres://db/x", Mode::VerifyCa));
        let (_, tls) = split("postgres://db/x").unwrap();
        assert_eq!((tls.mode, tls.roots), (Mode::Prefer, None));
        let (_, tls) = split("postgres://db/x?sslmode=require&sslrootcert=%2Fca.pem").unwrap();
        assert_eq!(tls.negotiation(), SslMode::Require);
        assert_eq!((tls.mode, tls.roots), (Mode::Require, Some(Roots::File("/ca.pem".into()))));
    }

    #[test]
    fn sslrootcert_system_means_verify_full_and_refuses_every_weaker_sslmode() {
        let (rest, tls) = split("postgres://db/x?sslrootcert=system").unwrap();
        assert_eq!(rest, "postgres://db/x");
        assert_eq!((tls.mode, tls.roots), (Mode::VerifyFull, Some(Roots::System)));
        let (_, tls) = split("postgres://db/x?sslrootcert=system&sslmode=verify-full").unwrap();
        assert_eq!(tls.mode, Mode::VerifyFull);

        for mode in ["disable", "prefer", "require", "verify-ca"] {
            let url = format!("postgres://db/x?sslmode={mode}&sslrootcert=system");
            let error = split(&url).unwrap_err();
            assert!(error.starts_with(&format!("sslmode={mode} may not")), "{error}");
            assert!(error.contains("use sslmode=verify-full"), "{error}");
        }
    }

    #[test]
    fn verify_ca_and_verify_full_without_sslrootcert_are_refused_and_the_ca_asked_for() {
        for mode in ["verify-ca", "verify-full"] {
            for url in [
                format!("postgres://db/x?sslmode={mode}"),
                format!("postgres://db/x?sslmode={mode}&sslrootcert="),
            ] {
                let error = split(&url).unwrap_err();
                assert!(error.starts_with(&format!("sslmode={mode} needs")), "{error}");
                assert!(error.contains("sslrootcert=/path/to/ca.pem"), "{error}");
                assert!(error.contains("sslrootcert=system"), "{error}");
            }
        }
    }

    #[test]
    fn an_unknown_sslmode_is_refused_with_the_modes_named() {
        let error = split("postgres://db/x?sslmode=allow").unwrap_err();
        assert!(error.contains("\"allow\"") && error.contains("verify-full"), "{error}");
    }
}
