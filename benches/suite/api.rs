//! Tollgate's HTTP API as the suite uses it: minting usage tokens with the
//! API key, asking `/healthz`, and scraping `/metrics`.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use futures::{StreamExt, TryStreamExt};
use serde_json::{Value, json};

use crate::suite::prometheus::Scrape;

/// How long one request may take before the run gives up on it.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// Mints in flight at once when tokens are minted ahead of a run: enough
/// to keep the server's writer busy, few enough to leave it responsive.
const MINT_CONCURRENCY: usize = 64;

#[derive(Clone)]
pub struct Api {
    base: String,
    key: String,
    http: reqwest::Client,
}

impl Api {
    pub fn new(addr: SocketAddr, key: String) -> Result<Api> {
        Ok(Api { base: format!("http://{addr}"), key, http: http_client()? })
    }

    /// The same API with a connection pool of its own, whose keep-alive
    /// connections close when it and its clones are dropped.
    pub fn fresh(&self) -> Result<Api> {
        Ok(Api { base: self.base.clone(), key: self.key.clone(), http: http_client()? })
    }

    /// The same key on another server sharing this one's database.
    pub fn at(&self, addr: SocketAddr) -> Result<Api> {
        Api::new(addr, self.key.clone())
    }

    /// Whether `/healthz` answers 200: the store answers and usage is
    /// being recorded.
    pub async fn healthy(&self) -> bool {
        let response = self.http.get(format!("{}/healthz", self.base)).send().await;
        response.is_ok_and(|response| response.status() == reqwest::StatusCode::OK)
    }

    /// Mints a usage token for `human`, setting their `conversational_seconds`.
    pub async fn mint(&self, human: &str, seconds: f64) -> Result<String> {
        let limits = json!([{ "type": "conversational_seconds", "value": seconds }]);
        let response = self
            .http
            .post(format!("{}/v1/usage/token", self.base))
            .header("x-api-key", &self.key)
            .json(&json!({ "human": human, "limits": limits }))
            .send()
            .await?;
        let status = response.status();
        let body: Value = response.json().await.unwrap_or(Value::Null);
        if status != reqwest::StatusCode::OK {
            bail!("minting answered {status}: {body}");
        }
        let token = body["token"].as_str().context("the mint's answer has no token")?;
        Ok(token.to_owned())
    }

    /// Mints one token for each of `humans`, in their order.
    pub async fn mint_all(&self, humans: &[String], seconds: f64) -> Result<Vec<String>> {
        let mints = futures::stream::iter(humans).map(|human| self.mint(human, seconds));
        mints.buffered(MINT_CONCURRENCY).try_collect().await
    }

    pub async fn scrape(&self) -> Result<Scrape> {
        let response = self.http.get(format!("{}/metrics", self.base)).send().await?;
        let response = response.error_for_status()?;
        Ok(Scrape::new(response.text().await?))
    }
}

/// How long the suite keeps an idle connection to the server for reuse:
/// well under the server's header timeout (10 s), after which the server
/// closes a kept-alive connection that sent nothing. A connection kept
/// longer can be reused just as the server closes it, and the request on
/// it fails, a POST without a retry. The soak's clients share one pool: a
/// 20-minute soak with the default of 90 s saw 5 of its 2.1 million mints
/// fail with the connection closed or reset under them, the errors this
/// race gives (the cause was not otherwise shown), and a soak of 5 minutes
/// with 5 s saw none.
const IDLE_CONNECTION: Duration = Duration::from_secs(5);

fn http_client() -> Result<reqwest::Client> {
    let builder = reqwest::Client::builder().timeout(REQUEST_TIMEOUT);
    Ok(builder.pool_idle_timeout(IDLE_CONNECTION).build()?)
}
