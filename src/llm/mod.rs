//! The chat completions proxy: a frontend calls an OpenAI-compatible
//! endpoint with a usage token as its API key, and Tollgate forwards the
//! request to the real service with the real key, holding and then
//! debiting the human's `token_cnt`.
//!
//! A request goes through three steps. Admission estimates the prompt's
//! tokens and, in one store transaction, holds the estimate plus the
//! answer's cap out of what the human has left (lowering the cap to fit, or
//! refusing when nothing would be left for an answer), so that concurrent
//! requests cannot together spend more than the budget. Forwarding runs in
//! a task of its own, so that it finishes even when the client goes away:
//! a stream is relayed event by event and read on the way. Settling debits
//! what the upstream reports it used (or, when it reports nothing, what
//! Tollgate counts) and releases the hold; for a stream this happens before
//! the final `[DONE]` goes out, so a client that has seen the end of its
//! answer reads its limits already debited.

mod answer;
mod client;
pub mod echo;
pub(crate) mod request;
mod tokenize;

use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::Response;
use futures::StreamExt;
use futures::stream::BoxStream;
use serde_json::{Value, json};
use tokio::sync::{Semaphore, mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, error, info, info_span, warn};

use crate::config::LlmSettings;
use crate::limits::LimitType;
use crate::store::{
    CompletionAdmission, CompletionEnd, CompletionKey, CompletionOutcome, Human, NewCompletion,
    Store, StoreError, UsageSource,
};
use answer::{Relay, StreamEnd, Tally, Usage};
pub use client::LlmClient;
use request::ChatRequest;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
pub type BodyStream = BoxStream<'static, Result<Bytes, BoxError>>;

/// How many events may wait for a slow client. Past this the relay stops
/// reading the upstream, which in turn slows down, so a slow client holds
/// a few kilobytes and not its whole answer.
const CLIENT_QUEUE: usize = 16;

/// The largest error body passed on from an upstream.
const MAX_ERROR_BYTES: usize = 64 * 1024;

/// An answer as it comes from a model: a status, a content type, and the
/// body as it arrives.
pub struct Answer {
    pub status: StatusCode,
    pub content_type: Option<HeaderValue>,
    pub body: BodyStream,
}

/// An answer made of known chunks, as the echo model gives.
pub fn answer_from(status: StatusCode, content_type: &'static str, chunks: Vec<Bytes>) -> Answer {
    let body = futures::stream::iter(chunks.into_iter().map(Ok)).boxed();
    Answer { status, content_type: Some(HeaderValue::from_static(content_type)), body }
}

/// The errors of the proxy's endpoints. The API turns each into OpenAI's
/// error shape, so that SDKs show them as they show OpenAI's own.
#[derive(Debug, thiserror::Error)]
pub enum LlmError {
    #[error("{message}")]
    InvalidRequest { param: Option<&'static str>, message: String },
    #[error("the model {0:?} does not exist; without an upstream, the only model is \"echo\"")]
    ModelNotFound(String),
    #[error("the usage limit for token_cnt is exhausted")]
    LimitExhausted,
    #[error("the usage token has been revoked")]
    TokenRevoked,
    #[error("the usage token has expired")]
    TokenExpired,
    /// The upstream could not be reached or gave no usable answer; why is
    /// logged.
    #[error("the model's service cannot be reached; try again later")]
    UpstreamUnavailable,
    /// The upstream answered with an error, passed on: the status (the
    /// upstream's for a fault of the request, 502 for one of the service)
    /// and its body.
    #[error("the model's service answered with an error")]
    Upstream { status: StatusCode, content_type: Option<HeaderValue>, body: Bytes },
    /// The upstream refused the request with this status, and no error of
    /// its own to pass on.
    #[error("the model's service refused the request")]
    UpstreamRefused(StatusCode),
    #[error("{0}")]
    Store(#[from] StoreError),
    /// A bug: a task of the proxy panicked.
    #[error("internal error")]
    Internal,
}

/// Whom a completion is for.
pub struct Caller {
    pub human: Human,
    /// The usage token used, re-checked at admission; `None` for an API key.
    pub token: Option<i64>,
}

/// Where answers come from.
enum Model {
    Echo,
    Upstream(Box<LlmClient>),
}

pub struct Proxy {
    model: Model,
    settings: LlmSettings,
    store: Arc<dyn Store>,
    shutdown: CancellationToken,
    /// Counting tokens is the one heavy computation of the proxy (a
    /// megabyte-long prompt takes most of a second). It runs on blocking
    /// threads, at most one fewer at a time than there are cores, so that
    /// a flood of long prompts queues here and the meter and the sessions
    /// keep a core for themselves.
    counting: Arc<Semaphore>,
}

/// A completion that has been admitted, on its way.
struct Running {
    key: CompletionKey,
    public_id: String,
    caller_human: crate::store::HumanId,
    prompt_estimate: i64,
    model: String,
    client_wants_usage: bool,
}

impl Proxy {
    pub fn new(
        settings: LlmSettings,
        client: Option<LlmClient>,
        store: Arc<dyn Store>,
        shutdown: CancellationToken,
    ) -> Proxy {
        let model = client.map_or(Model::Echo, |client| Model::Upstream(Box::new(client)));
        let cores = std::thread::available_parallelism().map_or(1, usize::from);
        let counting = Arc::new(Semaphore::new(cores.saturating_sub(1).max(1)));
        Proxy { model, settings, store, shutdown, counting }
    }

    /// Runs a job that counts tokens, on a blocking thread, in turn.
    async fn count<R: Send + 'static>(
        &self,
        job: impl FnOnce() -> R + Send + 'static,
    ) -> Result<R, LlmError> {
        // The permit goes with the job, so that it is held while the job
        // runs even if the caller stops waiting for it.
        let permit = self.counting.clone().acquire_owned().await.map_err(|_| LlmError::Internal)?;
        let job = move || {
            let _permit = permit;
            job()
        };
        tokio::task::spawn_blocking(job).await.map_err(|_| LlmError::Internal)
    }

    pub fn max_request_bytes(&self) -> usize {
        self.settings.max_request_bytes
    }

    /// `POST /v1/chat/completions`: admits the request and answers once
    /// the upstream has answered (a stream then goes on in the body).
    /// Admission and all that follows run in a task of their own: a hold,
    /// once written, is always settled, even if the client leaves while
    /// it is being written.
    pub async fn chat(self: &Arc<Self>, caller: Caller, body: Bytes) -> Result<Response, LlmError> {
        // A human with nothing left costs no counting.
        if self.spent(&caller).await? {
            return Err(LlmError::LimitExhausted);
        }
        let request = self.count(move || ChatRequest::parse(&body)).await??;
        if matches!(self.model, Model::Echo) && request.model != echo::MODEL {
            return Err(LlmError::ModelNotFound(request.model));
        }
        let public_id = crate::ids::public_id("cmpl");
        let span = info_span!("completion", id = %public_id, human = %caller.human.name,
                              model = %request.model, stream = request.stream);
        let (head_tx, head_rx) = oneshot::channel();
        let task = self.clone().admit_and_run(caller, request, public_id, head_tx);
        tokio::spawn(task.instrument(span));
        head_rx.await.unwrap_or(Err(LlmError::Internal))
    }

    /// Holds tokens for the request, then forwards it.
    async fn admit_and_run(
        self: Arc<Self>,
        caller: Caller,
        request: ChatRequest,
        public_id: String,
        head_tx: oneshot::Sender<Result<Response, LlmError>>,
    ) {
        let admission = self.store.start_completion(NewCompletion {
            human: caller.human.id,
            token: caller.token,
            public_id: public_id.clone(),
            model: request.model.clone(),
            prompt_estimate: request.prompt_estimate,
            wanted: request.cap.unwrap_or(i64::from(self.settings.default_max_tokens)),
            choices: request.choices,
            now: crate::clock::now_millis(),
        });
        let refusal = match admission.await {
            Ok(CompletionAdmission::Admitted { key, allowance }) => {
                let forwarded =
                    request.forwarded(&caller.human.name, allowance, self.settings.cap_field);
                let running = Running {
                    key,
                    public_id,
                    caller_human: caller.human.id,
                    prompt_estimate: request.prompt_estimate,
                    model: request.model,
                    client_wants_usage: request.client_wants_usage,
                };
                return self.run(running, forwarded, head_tx).await;
            }
            Ok(CompletionAdmission::LimitExhausted) => LlmError::LimitExhausted,
            Ok(CompletionAdmission::TokenRevoked) => LlmError::TokenRevoked,
            Ok(CompletionAdmission::TokenExpired) => LlmError::TokenExpired,
            Err(error) => LlmError::Store(error),
        };
        let _ = head_tx.send(Err(refusal));
    }

    /// Whether the human's `token_cnt` is limited and has nothing left: a
    /// quick look before any work, which admission then checks again.
    async fn spent(&self, caller: &Caller) -> Result<bool, LlmError> {
        let limits = self.store.limits(caller.human.id).await?;
        Ok(limits.iter().any(|limit| limit.limit_type == LimitType::TokenCnt && limit.value <= 0))
    }

    /// Forwards the request, hands the answer's head to the handler, relays
    /// the rest, and settles.
    async fn run(
        self: Arc<Self>,
        running: Running,
        forwarded: Vec<u8>,
        head_tx: oneshot::Sender<Result<Response, LlmError>>,
    ) {
        let asked = tokio::select! {
            asked = self.ask(&running, forwarded) => asked,
            _ = self.shutdown.cancelled() => {
                // The upstream has the prompt, and may bill for it.
                let outcome = CompletionOutcome::ServerShutdown;
                self.settle(&running, Some(Tally::default()), outcome).await;
                let _ = head_tx.send(Err(LlmError::UpstreamUnavailable));
                return;
            }
        };
        let answer = match asked {
            Ok(answer) => answer,
            Err(refusal) => {
                self.settle(&running, None, CompletionOutcome::UpstreamFailed).await;
                let _ = head_tx.send(Err(refusal));
                return;
            }
        };
        if is_event_stream(answer.content_type.as_ref()) {
            self.run_stream(running, answer, head_tx).await;
        } else {
            self.run_whole(running, answer, head_tx).await;
        }
    }

    /// Sends the request to the model; an error answer becomes the error
    /// to pass on.
    async fn ask(&self, running: &Running, forwarded: Vec<u8>) -> Result<Answer, LlmError> {
        let answer = match &self.model {
            Model::Echo => {
                let id = running.public_id.clone();
                self.count(move || echo::answer(&forwarded, &id)).await?
            }
            Model::Upstream(client) => {
                client.post("chat/completions", forwarded).await.map_err(|error| {
                    warn!(%error, "the upstream could not be asked");
                    LlmError::UpstreamUnavailable
                })?
            }
        };
        if answer.status.is_success() {
            return Ok(answer);
        }
        Err(self.upstream_error(answer).await)
    }

    /// An upstream's error answer, to pass on. A fault of the request (a
    /// 4xx other than for the service's own credentials) keeps its status;
    /// anything else is the service's fault and becomes 502. A refusal of
    /// Tollgate's own key is not passed on, since it may quote the key.
    async fn upstream_error(&self, answer: Answer) -> LlmError {
        let status = answer.status;
        warn!(%status, "the upstream answered with an error");
        if matches!(status, StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN) {
            error!(%status, "the upstream refused Tollgate's key; check TOLLGATE_LLM_API_KEY");
            return LlmError::UpstreamUnavailable;
        }
        let timeout = self.settings.idle_timeout;
        let body = answer::read_whole(answer.body, MAX_ERROR_BYTES, timeout, &self.shutdown).await;
        let theirs = status.is_client_error();
        let status = if theirs { status } else { StatusCode::BAD_GATEWAY };
        let openai_error = |body: &Bytes| {
            serde_json::from_slice::<Value>(body).is_ok_and(|body| body["error"].is_object())
        };
        match body {
            Ok(body) if openai_error(&body) => {
                LlmError::Upstream { status, content_type: answer.content_type, body }
            }
            _ if theirs => LlmError::UpstreamRefused(status),
            _ => LlmError::UpstreamUnavailable,
        }
    }

    async fn run_whole(
        &self,
        running: Running,
        answer: Answer,
        head_tx: oneshot::Sender<Result<Response, LlmError>>,
    ) {
        let timeout = self.settings.idle_timeout;
        let read =
            answer::read_whole(answer.body, answer::MAX_WHOLE_BYTES, timeout, &self.shutdown);
        let body = match read.await {
            Ok(body) => body,
            Err(reason) => {
                warn!(%reason, "the upstream's answer could not be read");
                let outcome = if self.shutdown.is_cancelled() {
                    CompletionOutcome::ServerShutdown
                } else {
                    CompletionOutcome::UpstreamFailed
                };
                self.settle(&running, Some(Tally::default()), outcome).await;
                let _ = head_tx.send(Err(LlmError::UpstreamUnavailable));
                return;
            }
        };
        let mut tally = Tally::default();
        if let Ok(parsed) = serde_json::from_slice::<Value>(&body) {
            tally.observe_whole(&parsed);
        }
        self.settle(&running, Some(tally), CompletionOutcome::Completed).await;
        let content_type = answer.content_type.unwrap_or(content_type(false));
        let response = Response::builder()
            .status(answer.status)
            .header(header::CONTENT_TYPE, content_type)
            .body(Body::from(body))
            .expect("a response built from valid parts");
        let _ = head_tx.send(Ok(response));
    }

    async fn run_stream(
        &self,
        running: Running,
        answer: Answer,
        head_tx: oneshot::Sender<Result<Response, LlmError>>,
    ) {
        let (client_tx, client_rx) = mpsc::channel::<Result<Bytes, BoxError>>(CLIENT_QUEUE);
        let body = Body::from_stream(tokio_stream_of(client_rx));
        let response = Response::builder()
            .status(answer.status)
            .header(header::CONTENT_TYPE, content_type(true))
            .header(header::CACHE_CONTROL, "no-cache")
            // Asks nginx and the like to pass events on as they come.
            .header("x-accel-buffering", "no")
            .body(body)
            .expect("a response built from valid parts");
        // Should the handler be gone already, the relay finds the client's
        // queue closed at once, and the usage so far is settled.
        let _ = head_tx.send(Ok(response));

        let mut tally = Tally::default();
        let relay = Relay {
            tally: &mut tally,
            client_wants_usage: running.client_wants_usage,
            idle_timeout: self.settings.idle_timeout,
            shutdown: &self.shutdown,
        };
        let end = answer::relay_stream(relay, answer.body, &client_tx).await;
        if let StreamEnd::UpstreamBroke(reason) = &end {
            warn!(%reason, "the upstream's stream broke off");
        }
        self.settle(&running, Some(tally), end.outcome()).await;
        match end {
            StreamEnd::Finished { done: true } => {
                let _ = client_tx.send(Ok(answer::done_event())).await;
            }
            StreamEnd::UpstreamBroke(reason) => {
                let _ = client_tx.send(Err(reason.into())).await;
            }
            _ => {}
        }
    }

    /// Ends the completion: debits its usage (none when `tally` is `None`,
    /// for a request the upstream refused) and releases its hold. Should
    /// the store fail, the hold stays, so that the human cannot spend it
    /// twice meanwhile, until the next start, which charges the prompt's
    /// estimate.
    async fn settle(&self, running: &Running, tally: Option<Tally>, outcome: CompletionOutcome) {
        let (model, estimate) = (running.model.clone(), running.prompt_estimate);
        let usage = match tally {
            Some(tally) => self
                .count(move || tally.usage(estimate, tokenize::encoding_for(&model)))
                .await
                .unwrap_or(Usage { prompt: estimate, completion: 0, source: UsageSource::Counted }),
            None => Usage { prompt: 0, completion: 0, source: UsageSource::Upstream },
        };
        let end = CompletionEnd {
            key: running.key,
            human: running.caller_human,
            prompt_tokens: usage.prompt,
            completion_tokens: usage.completion,
            source: usage.source,
            outcome,
            now: crate::clock::now_millis(),
        };
        match self.store.end_completion(end).await {
            Ok(remaining) => info!(
                outcome = outcome.as_str(),
                prompt_tokens = usage.prompt,
                completion_tokens = usage.completion,
                usage_source = usage.source.as_str(),
                remaining,
                "completion ended"
            ),
            Err(error) => error!(%error, "the completion's usage could not be recorded"),
        }
    }

    /// `GET /v1/models`: the echo model, or the upstream's list.
    pub async fn models(&self) -> Result<Response, LlmError> {
        let Model::Upstream(client) = &self.model else {
            let list = json!({"object": "list", "data": [
                {"id": echo::MODEL, "object": "model", "created": 0, "owned_by": "tollgate"}
            ]});
            return Ok(json_response(StatusCode::OK, list.to_string().into()));
        };
        let answer = client.get("models").await.map_err(|error| {
            warn!(%error, "the upstream could not be asked for its models");
            LlmError::UpstreamUnavailable
        })?;
        if !answer.status.is_success() {
            return Err(self.upstream_error(answer).await);
        }
        let timeout = self.settings.idle_timeout;
        let body =
            answer::read_whole(answer.body, answer::MAX_WHOLE_BYTES, timeout, &self.shutdown)
                .await
                .map_err(|reason| {
                    warn!(%reason, "the upstream's model list could not be read");
                    LlmError::UpstreamUnavailable
                })?;
        Ok(json_response(answer.status, body))
    }
}

fn json_response(status: StatusCode, body: Bytes) -> Response {
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, content_type(false))
        .body(Body::from(body))
        .expect("a response built from valid parts")
}

/// The content type of an answer the proxy writes itself.
fn content_type(stream: bool) -> HeaderValue {
    HeaderValue::from_static(if stream { "text/event-stream" } else { "application/json" })
}

fn is_event_stream(content_type: Option<&HeaderValue>) -> bool {
    content_type
        .and_then(|value| value.to_str().ok())
        .is_some_and(|value| value.trim_start().starts_with("text/event-stream"))
}

/// The receiving half of the client's queue as a body stream.
fn tokio_stream_of(
    mut rx: mpsc::Receiver<Result<Bytes, BoxError>>,
) -> impl futures::Stream<Item = Result<Bytes, BoxError>> {
    futures::stream::poll_fn(move |cx| rx.poll_recv(cx))
}
