//! HTTP to the OpenAI-compatible service behind the proxy, with the
//! service's key added to every request and the client's never sent.

use std::time::Duration;

use axum::body::Bytes;
use axum::http::{HeaderValue, Method, Request, header};
use futures::StreamExt;
use http_body_util::{BodyExt, Full};
use rustls::ClientConfig;

use super::{Answer, BoxError};
use crate::config::LlmUpstream;
use crate::outbound::{self, HttpsClient};

/// Why the service could not be asked.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    #[error("{0}")]
    Failed(#[source] BoxError),
}

pub struct LlmClient {
    client: HttpsClient,
    upstream: LlmUpstream,
    /// How long to wait for the head of an answer.
    idle_timeout: Duration,
}

impl LlmClient {
    /// `tls` must not name ALPN protocols: the connector sets HTTP/1.1.
    pub fn new(upstream: LlmUpstream, tls: ClientConfig, idle_timeout: Duration) -> LlmClient {
        LlmClient { client: outbound::client(tls), upstream, idle_timeout }
    }

    /// `POST`s a JSON body to an endpoint under the base URL.
    pub async fn post(&self, path: &str, body: Vec<u8>) -> Result<Answer, SendError> {
        self.send(Method::POST, path, Full::new(Bytes::from(body))).await
    }

    pub async fn get(&self, path: &str) -> Result<Answer, SendError> {
        self.send(Method::GET, path, Full::default()).await
    }

    async fn send(
        &self,
        method: Method,
        path: &str,
        body: Full<Bytes>,
    ) -> Result<Answer, SendError> {
        let mut request = Request::builder().method(method).uri(self.upstream.endpoint(path));
        let headers = request.headers_mut().expect("a request built from valid parts");
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
        headers.insert(
            header::ACCEPT,
            HeaderValue::from_static("application/json, text/event-stream"),
        );
        if let Some(authorization) = &self.upstream.authorization {
            headers.insert(header::AUTHORIZATION, authorization.clone());
        }
        let request = request.body(body).expect("a request built from valid parts");
        let response = tokio::time::timeout(self.idle_timeout, self.client.request(request))
            .await
            .map_err(|_| SendError::Timeout(self.idle_timeout))?
            .map_err(|error| SendError::Failed(error.into()))?;
        let (head, body) = response.into_parts();
        let body = body.into_data_stream().map(|chunk| chunk.map_err(BoxError::from)).boxed();
        Ok(Answer {
            status: head.status,
            content_type: head.headers.get(header::CONTENT_TYPE).cloned(),
            body,
        })
    }
}
