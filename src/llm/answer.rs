//! Reading an answer as it passes through: the usage the upstream reports,
//! and the text it produced, to be counted when it reports none. A stream
//! is relayed event by event as it arrives and never gathered whole.

use std::collections::BTreeMap;
use std::time::Duration;

use axum::body::Bytes;
use eventsource_stream::{Event, Eventsource};
use futures::StreamExt;
use serde_json::Value;
use tiktoken_rs::CoreBPE;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::{BodyStream, BoxError, tokenize};
use crate::store::{CompletionOutcome, UsageSource};

/// The largest whole (non-streaming) answer read. Answers are a few
/// kilobytes of text; a body past this is not an answer, and is refused
/// rather than held in memory.
pub const MAX_WHOLE_BYTES: usize = 16 * 1024 * 1024;

/// No completion uses a billion tokens; a count past this is a fault of the
/// upstream, and is taken as this, so that sums of counts stay far from
/// overflowing.
const MAX_REPORTED_TOKENS: i64 = 1_000_000_000;

/// What has been seen of an answer so far.
#[derive(Debug, Default)]
pub struct Tally {
    /// `(prompt, completion)` tokens, as the upstream reported them.
    reported: Option<(i64, i64)>,
    /// The text of each choice, by index.
    texts: BTreeMap<u64, String>,
}

/// A completion's usage, settled.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Usage {
    pub prompt: i64,
    pub completion: i64,
    pub source: UsageSource,
}

impl Tally {
    /// Reads a whole answer's `usage` and the text of its choices.
    pub fn observe_whole(&mut self, answer: &Value) {
        self.observe_usage(answer);
        for choice in answer["choices"].as_array().into_iter().flatten() {
            self.observe_text(choice, &choice["message"]);
        }
    }

    /// Reads a stream's chunk: its `usage`, if any, on whatever chunk it
    /// comes (with an empty `choices` or not), and the text of its deltas.
    pub fn observe_chunk(&mut self, chunk: &Value) {
        self.observe_usage(chunk);
        for choice in chunk["choices"].as_array().into_iter().flatten() {
            self.observe_text(choice, &choice["delta"]);
        }
    }

    fn observe_usage(&mut self, answer: &Value) {
        let usage = &answer["usage"];
        if let (Some(prompt), Some(completion)) =
            (usage["prompt_tokens"].as_i64(), usage["completion_tokens"].as_i64())
        {
            let believable = |count: i64| count.clamp(0, MAX_REPORTED_TOKENS);
            self.reported = Some((believable(prompt), believable(completion)));
        }
    }

    /// Text the model produced: content, a refusal, the arguments of tool
    /// calls, and reasoning where a service sends it.
    fn observe_text(&mut self, choice: &Value, message: &Value) {
        let index = choice["index"].as_u64().unwrap_or(0);
        let text = self.texts.entry(index).or_default();
        for field in ["content", "refusal", "reasoning_content"] {
            if let Some(piece) = message[field].as_str() {
                text.push_str(piece);
            }
        }
        for call in message["tool_calls"].as_array().into_iter().flatten() {
            if let Some(arguments) = call["function"]["arguments"].as_str() {
                text.push_str(arguments);
            }
        }
    }

    /// The usage to debit: the upstream's, or when it gave none (or a
    /// total of zero, which no real answer has) the prompt's estimate and
    /// the count of the text seen. Never zero for a completion that ran.
    pub fn usage(&self, prompt_estimate: i64, bpe: &CoreBPE) -> Usage {
        match self.reported {
            Some((prompt, completion)) if prompt + completion > 0 => {
                Usage { prompt, completion, source: UsageSource::Upstream }
            }
            _ => Usage {
                prompt: prompt_estimate,
                completion: self.texts.values().map(|text| tokenize::count(bpe, text)).sum(),
                source: UsageSource::Counted,
            },
        }
    }
}

/// Why a relayed stream stopped.
#[derive(Debug)]
pub enum StreamEnd {
    /// The upstream sent `[DONE]` (held back, to go out once the usage is
    /// recorded) or ended its body.
    Finished {
        done: bool,
    },
    ClientGone,
    /// The upstream broke off or fell silent.
    UpstreamBroke(String),
    ServerShutdown,
}

impl StreamEnd {
    pub fn outcome(&self) -> CompletionOutcome {
        match self {
            StreamEnd::Finished { .. } => CompletionOutcome::Completed,
            StreamEnd::ClientGone => CompletionOutcome::ClientGone,
            StreamEnd::UpstreamBroke(_) => CompletionOutcome::UpstreamFailed,
            StreamEnd::ServerShutdown => CompletionOutcome::ServerShutdown,
        }
    }
}

/// What a stream relay needs besides the streams themselves.
pub struct Relay<'a> {
    pub tally: &'a mut Tally,
    /// The client asked for the usage chunk itself; when it did not, the
    /// chunk Tollgate asked for on its behalf is read and not passed on.
    pub client_wants_usage: bool,
    pub idle_timeout: Duration,
    pub shutdown: &'a CancellationToken,
}

/// Relays an upstream's server-sent events to the client, event by event,
/// reading each on the way, until the stream ends one way or another.
pub async fn relay_stream(
    relay: Relay<'_>,
    body: BodyStream,
    client_tx: &mpsc::Sender<Result<Bytes, BoxError>>,
) -> StreamEnd {
    let mut events = body.eventsource();
    loop {
        let next = tokio::select! {
            _ = relay.shutdown.cancelled() => return StreamEnd::ServerShutdown,
            _ = client_tx.closed() => return StreamEnd::ClientGone,
            next = tokio::time::timeout(relay.idle_timeout, events.next()) => next,
        };
        let event = match next {
            Err(_) => return StreamEnd::UpstreamBroke("the upstream fell silent".into()),
            Ok(None) => return StreamEnd::Finished { done: false },
            Ok(Some(Err(error))) => return StreamEnd::UpstreamBroke(error.to_string()),
            Ok(Some(Ok(event))) => event,
        };
        if event.data.trim() == "[DONE]" {
            return StreamEnd::Finished { done: true };
        }
        if pass_on(relay.tally, &event, relay.client_wants_usage)
            && client_tx.send(Ok(encode(&event))).await.is_err()
        {
            return StreamEnd::ClientGone;
        }
    }
}

/// Reads an event; says whether the client is to see it.
fn pass_on(tally: &mut Tally, event: &Event, client_wants_usage: bool) -> bool {
    let Ok(chunk) = serde_json::from_str::<Value>(&event.data) else {
        return true;
    };
    tally.observe_chunk(&chunk);
    let usage_only =
        chunk["usage"].is_object() && chunk["choices"].as_array().is_some_and(Vec::is_empty);
    client_wants_usage || !usage_only
}

/// An event as server-sent events write it.
fn encode(event: &Event) -> Bytes {
    let mut text = String::with_capacity(event.data.len() + 16);
    if !event.event.is_empty() && event.event != "message" {
        text.push_str(&format!("event: {}\n", event.event));
    }
    if !event.id.is_empty() {
        text.push_str(&format!("id: {}\n", event.id));
    }
    for line in event.data.split('\n') {
        text.push_str("data: ");
        text.push_str(line);
        text.push('\n');
    }
    text.push('\n');
    Bytes::from(text)
}

/// The end of a stream as the client sees it.
pub fn done_event() -> Bytes {
    Bytes::from_static(b"data: [DONE]\n\n")
}

/// Reads a whole body, up to `limit` bytes, giving up on one that falls
/// silent for `idle_timeout`.
pub async fn read_whole(
    mut body: BodyStream,
    limit: usize,
    idle_timeout: Duration,
    shutdown: &CancellationToken,
) -> Result<Bytes, String> {
    let mut whole = Vec::new();
    loop {
        let next = tokio::select! {
            _ = shutdown.cancelled() => return Err("the server is shutting down".into()),
            next = tokio::time::timeout(idle_timeout, body.next()) => next,
        };
        match next {
            Err(_) => return Err("the upstream fell silent".into()),
            Ok(None) => return Ok(Bytes::from(whole)),
            Ok(Some(Err(error))) => return Err(error.to_string()),
            Ok(Some(Ok(chunk))) if whole.len() + chunk.len() > limit => {
                return Err(format!("the answer is larger than {limit} bytes"));
            }
            Ok(Some(Ok(chunk))) => whole.extend_from_slice(&chunk),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn usage_is_read_from_a_final_chunk_with_or_without_choices() {
        let bpe = tokenize::encoding_for("gpt-4o");
        for last in [
            json!({"choices": [], "usage": {"prompt_tokens": 9, "completion_tokens": 4}}),
            json!({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}],
                   "usage": {"prompt_tokens": 9, "completion_tokens": 4}}),
        ] {
            let mut tally = Tally::default();
            tally.observe_chunk(&json!({"choices": [{"index": 0, "delta": {"content": "hi"}}],
                                        "usage": null}));
            tally.observe_chunk(&last);
            let usage = tally.usage(100, bpe);
            assert_eq!(
                (usage.prompt, usage.completion, usage.source),
                (9, 4, UsageSource::Upstream)
            );
        }
    }

    #[test]
    fn without_usage_the_text_of_every_choice_is_counted() {
        let bpe = tokenize::encoding_for("gpt-4o");
        let mut tally = Tally::default();
        for (index, piece) in [(0, "Hello"), (1, "Bonjour"), (0, " world")] {
            tally.observe_chunk(
                &json!({"choices": [{"index": index, "delta": {"content": piece}}]}),
            );
        }
        let expected = tokenize::count(bpe, "Hello world") + tokenize::count(bpe, "Bonjour");
        let usage = tally.usage(12, bpe);
        assert_eq!(
            (usage.prompt, usage.completion, usage.source),
            (12, expected, UsageSource::Counted)
        );
    }

    #[test]
    fn absurd_counts_are_cut_to_a_billion() {
        let bpe = tokenize::encoding_for("gpt-4o");
        let mut tally = Tally::default();
        tally
            .observe_whole(&json!({"usage": {"prompt_tokens": i64::MAX, "completion_tokens": -3}}));
        let usage = tally.usage(5, bpe);
        assert_eq!((usage.prompt, usage.completion), (MAX_REPORTED_TOKENS, 0));
    }

    #[test]
    fn a_reported_total_of_zero_is_not_believed() {
        let bpe = tokenize::encoding_for("gpt-4o");
        let mut tally = Tally::default();
        tally.observe_whole(&json!({
            "choices": [{"index": 0, "message": {"content": "an answer"}}],
            "usage": {"prompt_tokens": 0, "completion_tokens": 0}
        }));
        let usage = tally.usage(5, bpe);
        assert_eq!(usage.source, UsageSource::Counted);
        assert_eq!(usage.prompt + usage.completion, 5 + tokenize::count(bpe, "an answer"));
    }

    #[test]
    fn events_are_written_back_as_they_were_read() {
        let event = Event {
            event: "message".into(),
            data: "{\"a\":1}".into(),
            id: String::new(),
            retry: None,
        };
        assert_eq!(encode(&event), Bytes::from_static(b"data: {\"a\":1}\n\n"));
        let event =
            Event { event: "error".into(), data: "x\ny".into(), id: "7".into(), retry: None };
        assert_eq!(
            encode(&event),
            Bytes::from_static(b"event: error\nid: 7\ndata: x\ndata: y\n\n")
        );
    }
}
