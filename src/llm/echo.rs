//! The built-in `echo` model, which answers when no upstream is configured:
//! it repeats the last user message, streaming or not, with usage counted
//! by the same tokenizer as the prompt estimate. It is there to try the
//! proxy and to test it, not to be talked to: it is not a language model.
//!
//! It is handed the request exactly as an upstream would be (with the
//! proxy's changes applied) and answers in OpenAI's shapes, so that every
//! answer goes through the same reading and metering as a real one.

use axum::body::Bytes;
use axum::http::StatusCode;
use serde_json::{Value, json};
use tiktoken_rs::{CoreBPE, Rank};

use super::tokenize;
use super::{Answer, answer_from};
use crate::clock;

pub const MODEL: &str = "echo";

/// What the request asks of the echo.
struct Asked {
    model: String,
    text: String,
    cap: Option<usize>,
    choices: usize,
    stream: bool,
    include_usage: bool,
    prompt_tokens: i64,
}

pub fn answer(body: &[u8], completion_id: &str) -> Answer {
    let body: Value = serde_json::from_slice(body).unwrap_or_default();
    let asked = asked(&body);
    let bpe = tokenize::encoding_for(&asked.model);
    let mut tokens = tokenize::encode(bpe, &asked.text);
    let cut = asked.cap.is_some_and(|cap| tokens.len() > cap);
    tokens.truncate(asked.cap.unwrap_or(usize::MAX));
    let finish = if cut { "length" } else { "stop" };
    let usage = usage(asked.prompt_tokens, (tokens.len() * asked.choices) as i64);
    if asked.stream {
        let events = events(bpe, &tokens, &asked, completion_id, finish, usage);
        answer_from(StatusCode::OK, "text/event-stream", events)
    } else {
        let text = pieces(bpe, &tokens).concat();
        let whole = whole(&asked, completion_id, &text, finish, usage);
        answer_from(StatusCode::OK, "application/json", vec![Bytes::from(whole.to_string())])
    }
}

fn asked(body: &Value) -> Asked {
    let model = body["model"].as_str().unwrap_or(MODEL).to_owned();
    let messages = body["messages"].as_array().map(Vec::as_slice).unwrap_or_default();
    let text = messages
        .iter()
        .rev()
        .find(|message| message["role"] == "user")
        .map(|message| tokenize::content_text(&message["content"]))
        .unwrap_or_default();
    let caps = [&body["max_tokens"], &body["max_completion_tokens"]];
    let cap = caps.iter().filter_map(|cap| cap.as_u64()).min().map(|cap| cap as usize);
    let bpe = tokenize::encoding_for(&model);
    Asked {
        prompt_tokens: body.as_object().map_or(0, |body| tokenize::estimate_prompt(bpe, body)),
        text,
        cap,
        choices: body["n"].as_u64().unwrap_or(1).max(1) as usize,
        stream: body["stream"] == true,
        include_usage: body["stream_options"]["include_usage"] == true,
        model,
    }
}

fn usage(prompt: i64, completion: i64) -> Value {
    json!({
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    })
}

fn whole(asked: &Asked, id: &str, text: &str, finish: &str, usage: Value) -> Value {
    let choices: Vec<Value> = (0..asked.choices)
        .map(|index| {
            json!({
                "index": index,
                "message": {"role": "assistant", "content": text},
                "finish_reason": finish,
            })
        })
        .collect();
    json!({
        "id": id,
        "object": "chat.completion",
        "created": clock::now_millis() / 1000,
        "model": asked.model,
        "choices": choices,
        "usage": usage,
    })
}

/// The answer as server-sent events: the role, one chunk per token for
/// each choice, the finish, the usage if asked for, and `[DONE]`.
fn events(
    bpe: &CoreBPE,
    tokens: &[Rank],
    asked: &Asked,
    id: &str,
    finish: &str,
    usage: Value,
) -> Vec<Bytes> {
    let chunk = |choices: Value| {
        json!({
            "id": id,
            "object": "chat.completion.chunk",
            "created": clock::now_millis() / 1000,
            "model": asked.model,
            "choices": choices,
        })
    };
    let mut events = Vec::new();
    for index in 0..asked.choices {
        let delta = |delta: Value| chunk(json!([{"index": index, "delta": delta}]));
        events.push(delta(json!({"role": "assistant", "content": ""})));
        for piece in pieces(bpe, tokens) {
            events.push(delta(json!({"content": piece})));
        }
        events.push(chunk(json!([{"index": index, "delta": {}, "finish_reason": finish}])));
    }
    if asked.include_usage {
        let mut last = chunk(json!([]));
        last["usage"] = usage;
        events.push(last);
    }
    let mut bytes: Vec<Bytes> =
        events.into_iter().map(|event| Bytes::from(format!("data: {event}\n\n"))).collect();
    bytes.push(Bytes::from_static(b"data: [DONE]\n\n"));
    bytes
}

/// The text of each token in turn. A token can end inside a multi-byte
/// character; its bytes then wait for the next token's, and are left out
/// if the answer was cut before the character ends.
fn pieces(bpe: &CoreBPE, tokens: &[Rank]) -> Vec<String> {
    let mut pending: Vec<u8> = Vec::new();
    let mut pieces = Vec::new();
    for token in tokens {
        pending.extend(bpe.decode_bytes(&[*token]).unwrap_or_default());
        let valid = match std::str::from_utf8(&pending) {
            Ok(text) => text.len(),
            Err(error) => error.valid_up_to(),
        };
        if valid > 0 {
            let rest = pending.split_off(valid);
            pieces.push(String::from_utf8(std::mem::replace(&mut pending, rest)).unwrap());
        }
    }
    pieces
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pieces_join_back_to_the_text_even_across_multibyte_characters() {
        let bpe = tokenize::encoding_for(MODEL);
        let text = "Grüße, 世界! 🦀🦀 done";
        let tokens = tokenize::encode(bpe, text);
        let pieces = pieces(bpe, &tokens);
        assert_eq!(pieces.concat(), text);
        assert!(pieces.len() > 3);
    }

    #[test]
    fn an_answer_cut_inside_a_character_ends_before_it() {
        let bpe = tokenize::encoding_for(MODEL);
        let text = "Hello 🌍 world";
        let tokens = tokenize::encode(bpe, text);
        let cut: String = (1..tokens.len())
            .map(|n| pieces(bpe, &tokens[..n]).concat())
            .find(|cut| !text.starts_with(cut.as_str()) || cut.contains('\u{FFFD}'))
            .unwrap_or_default();
        assert_eq!(cut, "", "a cut answer is not a prefix of the text: {cut:?}");
    }
}
