//! Serving HTTPS and WSS directly with `--tls-cert` and `--tls-key`: the
//! API and metered sessions over TLS with a certificate signed by a CA made
//! for the test, plain HTTP on the TLS port refused without harm, and files
//! that cannot serve stopping start-up with their setting named.

mod common;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_rustls::TlsConnector;
use tokio_rustls::rustls::{self, ClientConfig, RootCertStore};
use tokio_tungstenite::Connector;
use tollgate::config::Settings;
use tollgate::tls::TlsFiles;

/// A CA, and a certificate for 127.0.0.1 it signed, written as PEM files.
struct Certificates {
    dir: tempfile::TempDir,
    ca: rustls::pki_types::CertificateDer<'static>,
}

impl Certificates {
    fn new() -> Certificates {
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
        let key = KeyPair::generate().unwrap();
        let leaf =
            CertificateParams::new(vec!["127.0.0.1".to_owned()]).unwrap().signed_by(&key, &ca);
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("cert.pem"), leaf.unwrap().pem()).unwrap();
        std::fs::write(dir.path().join("key.pem"), key.serialize_pem()).unwrap();
        Certificates { ca: ca.der().clone(), dir }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn files(&self) -> TlsFiles {
        TlsFiles { cert: self.path("cert.pem"), key: self.path("key.pem") }
    }

    /// A client configuration trusting only the test's CA.
    fn client(&self) -> Arc<ClientConfig> {
        let mut roots = RootCertStore::empty();
        roots.add(self.ca.clone()).unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        Arc::new(config)
    }
}

async fn tls_server(certificates: &Certificates) -> TestServer {
    let files = certificates.files();
    TestServer::start_with(|settings| settings.tls = Some(files)).await
}

fn addr_of(server: &TestServer) -> String {
    server.base.trim_start_matches("http://").to_owned()
}

/// One HTTPS request with hyper's client over a rustls connection; the
/// status and the JSON body.
async fn https(
    server: &TestServer,
    client: Arc<ClientConfig>,
    request: hyper::Request<Full<Bytes>>,
) -> (u16, Value) {
    let tcp = TcpStream::connect(addr_of(server)).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
    let tls = TlsConnector::from(client).connect(name, tcp).await.unwrap();
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(TokioIo::new(tls)).await.unwrap();
    tokio::spawn(connection);
    let response = sender.send_request(request).await.unwrap();
    let status = response.status().as_u16();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    (status, serde_json::from_slice(&body).unwrap_or(Value::Null))
}

fn mint_request(server: &TestServer, body: Value) -> hyper::Request<Full<Bytes>> {
    hyper::Request::post("/v1/usage/token")
        .header("host", addr_of(server))
        .header("x-api-key", &server.key)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())))
        .unwrap()
}

async fn wss_session(server: &TestServer, client: Arc<ClientConfig>, token: &str) -> Client {
    let url =
        format!("wss://{}/v1/realtime/session?kind=conversational&token={token}", addr_of(server));
    let tcp = TcpStream::connect(addr_of(server)).await.unwrap();
    let connector = Some(Connector::Rustls(client));
    let (ws, _) =
        tokio_tungstenite::client_async_tls_with_config(url, tcp, None, connector).await.unwrap();
    Client { ws, opened: Instant::now() }
}

#[tokio::test]
async fn the_api_and_metered_sessions_are_served_over_tls() {
    let certificates = Certificates::new();
    let server = tls_server(&certificates).await;
    let limits = json!([{ "type": "conversational_seconds", "value": 0.4 }]);
    let body = json!({ "human": "ada", "limits": limits });
    let (status, minted) = https(&server, certificates.client(), mint_request(&server, body)).await;
    assert_eq!(status, 200, "{minted}");
    let token = minted["token"].as_str().unwrap();

    let mut client = wss_session(&server, certificates.client(), token).await;
    let started = client.next_event().await;
    assert!(started["session_id"].is_string(), "{started}");
    let closed = client.until_closed().await;
    assert_eq!(closed.code, Some(4001), "{closed:?}");
    assert_near(closed.after, 0.4, 0.2);
    let limits = hyper::Request::get("/v1/usage/limits")
        .header("host", addr_of(&server))
        .header("x-api-key", &server.key)
        .header("x-human-id", "ada")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let (status, limits) = https(&server, certificates.client(), limits).await;
    assert_eq!((status, &limits[0]["value"]), (200, &json!(0.0)), "{limits}");
    assert_ledger_identity(&server.db());
}

#[tokio::test]
async fn plain_http_on_the_tls_port_is_refused_and_the_server_goes_on() {
    let certificates = Certificates::new();
    let server = tls_server(&certificates).await;
    let plain = server.http.get(server.url("/healthz")).send().await;
    assert!(plain.is_err(), "plain HTTP was answered: {plain:?}");

    let untrusted = Certificates::new();
    let tcp = TcpStream::connect(addr_of(&server)).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
    let refused = TlsConnector::from(untrusted.client()).connect(name, tcp).await;
    assert!(refused.is_err(), "a client trusting another CA accepted the certificate");

    let health = hyper::Request::get("/healthz")
        .header("host", addr_of(&server))
        .body(Full::new(Bytes::new()))
        .unwrap();
    let (status, body) = https(&server, certificates.client(), health).await;
    assert_eq!(status, 200, "{body}");
}

#[tokio::test]
async fn files_that_cannot_serve_tls_stop_start_up_naming_the_setting() {
    let certificates = Certificates::new();
    let other = Certificates::new();
    std::fs::write(certificates.path("empty.pem"), "").unwrap();
    let cases = [
        (certificates.path("missing.pem"), certificates.path("key.pem"), "tls_cert"),
        (certificates.path("empty.pem"), certificates.path("key.pem"), "tls_cert"),
        (certificates.path("cert.pem"), certificates.path("cert.pem"), "tls_key"),
        (certificates.path("cert.pem"), other.path("key.pem"), "do not make a pair"),
    ];
    for (cert, key, expected) in cases {
        let error = start_error(TlsFiles { cert, key }).await;
        assert!(error.contains(expected), "{expected}: {error}");
    }
}

async fn start_error(tls: TlsFiles) -> String {
    let database = common::TestDatabase::create().await;
    let mut settings = Settings::new(database.database());
    settings.listen = "127.0.0.1:0".parse().unwrap();
    settings.tls = Some(tls);
    let error = tollgate::start(settings).await.err().expect("start-up was refused");
    let untouched = database.db().untouched();
    assert!(untouched, "the database was created before the files were read");
    format!("{error:#}")
}

#[tokio::test]
async fn a_connection_over_the_cap_on_a_tls_port_is_closed_without_a_plain_answer() {
    use tokio::io::AsyncReadExt;

    let certificates = Certificates::new();
    let files = certificates.files();
    let server = TestServer::start_with(|settings| {
        settings.tls = Some(files);
        settings.max_connections = Some(1);
    })
    .await;
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
    let tcp = TcpStream::connect(addr_of(&server)).await.unwrap();
    let _held = TlsConnector::from(certificates.client()).connect(name, tcp).await.unwrap();

    let mut over = TcpStream::connect(addr_of(&server)).await.unwrap();
    let mut answer = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), over.read_to_end(&mut answer));
    let _ = read.await.expect("the connection over the cap is closed");
    assert!(answer.is_empty(), "{}", String::from_utf8_lossy(&answer));
}
