//! A chat completion request, checked at the edge: the few fields the proxy
//! reads are typed and validated, and everything else is kept as it came,
//! to be forwarded unchanged.

use serde_json::{Map, Value, json};

use super::LlmError;
use super::tokenize;
use crate::config::CapField;

/// The most answers one request may ask for, as OpenAI allows.
const MAX_CHOICES: i64 = 128;

/// A cap past any model's context, and far from the edges of `i64` when
/// multiplied by the number of choices.
const MAX_CAP: i64 = 100_000_000;

#[derive(Debug)]
pub struct ChatRequest {
    body: Map<String, Value>,
    pub model: String,
    pub stream: bool,
    /// The client asked for the final usage chunk itself.
    pub client_wants_usage: bool,
    /// `n`: how many answers.
    pub choices: i64,
    /// The request's own cap on each answer's tokens, if it gives one.
    pub cap: Option<i64>,
    /// The prompt's tokens as Tollgate counts them.
    pub prompt_estimate: i64,
}

impl ChatRequest {
    pub fn parse(bytes: &[u8]) -> Result<ChatRequest, LlmError> {
        let body = match serde_json::from_slice::<Value>(bytes) {
            Ok(Value::Object(body)) => body,
            Ok(_) => return Err(invalid(None, "request body: must be a JSON object")),
            Err(error) => return Err(invalid(None, &format!("request body: {error}"))),
        };
        let model = match body.get("model") {
            Some(Value::String(model)) if !model.is_empty() => model.clone(),
            _ => return Err(invalid(Some("model"), "model: a model name is required")),
        };
        let messages = match body.get("messages") {
            Some(Value::Array(messages)) if !messages.is_empty() => messages,
            _ => return Err(invalid(Some("messages"), "messages: a non-empty array is required")),
        };
        if let Some(index) = messages.iter().position(|m| !m.is_object()) {
            return Err(invalid(Some("messages"), &format!("messages[{index}]: not an object")));
        }
        let bpe = tokenize::encoding_for(&model);
        let prompt_estimate = tokenize::estimate_prompt(bpe, &body);
        Ok(ChatRequest {
            stream: flag(&body, "stream")?,
            client_wants_usage: include_usage(&body)?,
            choices: integer(&body, "n", 1, MAX_CHOICES)?.unwrap_or(1),
            cap: cap(&body)?,
            prompt_estimate,
            model,
            body,
        })
    }

    /// The body as it goes upstream: `user` set to the human, whatever the
    /// client sent; a streaming request asks for the final usage chunk; and
    /// when the human's tokens are limited, every cap is at most the
    /// allowance (the configured field carries it when the client set none).
    pub fn forwarded(&self, human: &str, allowance: Option<i64>, cap_field: CapField) -> Vec<u8> {
        let mut body = self.body.clone();
        body.insert("user".into(), json!(human));
        if self.stream {
            // `null` is taken as no options, as the parse takes it.
            let options = body.entry("stream_options").or_insert(Value::Null);
            if options.is_null() {
                *options = json!({});
            }
            if let Value::Object(options) = options {
                options.insert("include_usage".into(), json!(true));
            }
        }
        if let Some(allowance) = allowance {
            let fields = [CapField::MaxTokens, CapField::MaxCompletionTokens];
            let given: Vec<CapField> =
                fields.into_iter().filter(|f| body.contains_key(f.as_str())).collect();
            for field in if given.is_empty() { vec![cap_field] } else { given } {
                let current = body.get(field.as_str()).and_then(Value::as_i64);
                let lowered = current.map_or(allowance, |current| current.min(allowance));
                body.insert(field.as_str().into(), json!(lowered));
            }
        }
        serde_json::to_vec(&Value::Object(body)).expect("a JSON value serialises")
    }
}

fn invalid(param: Option<&'static str>, message: &str) -> LlmError {
    LlmError::InvalidRequest { param, message: message.to_owned() }
}

fn flag(body: &Map<String, Value>, name: &'static str) -> Result<bool, LlmError> {
    match body.get(name) {
        None | Some(Value::Null) => Ok(false),
        Some(Value::Bool(value)) => Ok(*value),
        Some(_) => Err(invalid(Some(name), &format!("{name}: must be true or false"))),
    }
}

fn include_usage(body: &Map<String, Value>) -> Result<bool, LlmError> {
    match body.get("stream_options") {
        None | Some(Value::Null) => Ok(false),
        Some(Value::Object(options)) => Ok(options.get("include_usage") == Some(&json!(true))),
        Some(_) => Err(invalid(Some("stream_options"), "stream_options: must be an object")),
    }
}

/// A whole number within bounds, if the field is given.
fn integer(
    body: &Map<String, Value>,
    name: &'static str,
    min: i64,
    max: i64,
) -> Result<Option<i64>, LlmError> {
    match body.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(value) => {
            value.as_i64().filter(|n| (min..=max).contains(n)).map(Some).ok_or_else(|| {
                invalid(Some(name), &format!("{name}: must be a whole number from {min} to {max}"))
            })
        }
    }
}

/// The request's cap on each answer: the smaller of the two fields that
/// can carry one.
fn cap(body: &Map<String, Value>) -> Result<Option<i64>, LlmError> {
    let old = integer(body, "max_tokens", 1, MAX_CAP)?;
    let new = integer(body, "max_completion_tokens", 1, MAX_CAP)?;
    Ok(match (old, new) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(body: Value) -> Result<ChatRequest, LlmError> {
        ChatRequest::parse(body.to_string().as_bytes())
    }

    fn forwarded(request: &ChatRequest, allowance: Option<i64>) -> Value {
        let bytes = request.forwarded("human-1", allowance, CapField::MaxTokens);
        serde_json::from_slice(&bytes).unwrap()
    }

    fn hello() -> Value {
        json!({"model": "m", "messages": [{"role": "user", "content": "hi"}]})
    }

    #[test]
    fn the_human_always_wins_and_everything_else_is_kept() {
        let mut body = hello();
        body["user"] = json!("someone-else");
        body["temperature"] = json!(0.2);
        body["custom"] = json!({"nested": [1, 2]});
        let sent = forwarded(&parse(body).unwrap(), None);
        assert_eq!(sent["user"], "human-1");
        assert_eq!(sent["temperature"], 0.2);
        assert_eq!(sent["custom"], json!({"nested": [1, 2]}));
        assert!(sent.get("max_tokens").is_none(), "no cap added when unlimited");
    }

    #[test]
    fn a_stream_asks_for_usage_keeping_other_stream_options() {
        let mut body = hello();
        body["stream"] = json!(true);
        body["stream_options"] = json!({"other": 1});
        let request = parse(body).unwrap();
        assert!(request.stream && !request.client_wants_usage);
        let sent = forwarded(&request, None);
        assert_eq!(sent["stream_options"], json!({"other": 1, "include_usage": true}));
    }

    #[test]
    fn a_stream_with_null_stream_options_still_asks_for_usage() {
        let body = br#"{"model":"m","messages":[{}],"stream":true,"stream_options":null}"#;
        let request = ChatRequest::parse(body).unwrap();
        let sent = forwarded(&request, None);
        assert_eq!(sent["stream_options"], json!({"include_usage": true}));
    }

    #[test]
    fn caps_are_lowered_to_the_allowance_in_the_fields_the_client_used() {
        let mut body = hello();
        body["max_completion_tokens"] = json!(500);
        let sent = forwarded(&parse(body).unwrap(), Some(40));
        assert_eq!(sent["max_completion_tokens"], 40);
        assert!(sent.get("max_tokens").is_none());

        let mut body = hello();
        body["max_tokens"] = json!(10);
        assert_eq!(forwarded(&parse(body).unwrap(), Some(40))["max_tokens"], 10);
        assert_eq!(forwarded(&parse(hello()).unwrap(), Some(40))["max_tokens"], 40);
    }

    #[test]
    fn malformed_requests_name_the_field() {
        for (body, param) in [
            (json!({"messages": [{"role": "user", "content": "x"}]}), Some("model")),
            (json!({"model": "m", "messages": []}), Some("messages")),
            (json!({"model": "m", "messages": ["x"]}), Some("messages")),
            (json!({"model": "m", "messages": [{}], "stream": "yes"}), Some("stream")),
            (json!({"model": "m", "messages": [{}], "max_tokens": -1}), Some("max_tokens")),
            (json!({"model": "m", "messages": [{}], "max_tokens": 1.5}), Some("max_tokens")),
            (json!({"model": "m", "messages": [{}], "n": 0}), Some("n")),
            (json!([1]), None),
        ] {
            match parse(body.clone()) {
                Err(LlmError::InvalidRequest { param: got, .. }) => {
                    assert_eq!(got, param, "{body}")
                }
                other => panic!("{body}: {other:?}"),
            }
        }
    }
}
