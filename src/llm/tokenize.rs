//! Counting tokens with tiktoken's encodings: the estimate of a prompt that
//! admission holds tokens for, and the count of an answer whose upstream
//! reported no usage.
//!
//! The estimate follows OpenAI's published way of counting chat messages
//! (a few tokens of framing per message and for the reply). It counts text
//! exactly for OpenAI's models and approximately for others, and an image
//! as a fixed number of tokens; the debit itself comes from the upstream's
//! own count whenever it gives one.

use serde_json::{Map, Value};
use tiktoken_rs::tokenizer::{Tokenizer, get_tokenizer};
use tiktoken_rs::{CoreBPE, Rank};

/// Framing around each message, and the tokens that start the reply.
const TOKENS_PER_MESSAGE: i64 = 3;
const TOKENS_PER_NAME: i64 = 1;
const REPLY_PRIMING: i64 = 3;

/// What an image part is counted as: a 1024×1024 image at high detail
/// (85 base tokens and 170 for each of four tiles). Smaller or low-detail
/// images cost less, larger ones more.
const TOKENS_PER_IMAGE: i64 = 765;

/// The encoding of a model: its own for OpenAI's chat models, `o200k_base`
/// (the encoding of OpenAI's current models) for any other.
pub fn encoding_for(model: &str) -> &'static CoreBPE {
    match get_tokenizer(model) {
        Some(Tokenizer::Cl100kBase) => tiktoken_rs::cl100k_base_singleton(),
        _ => tiktoken_rs::o200k_base_singleton(),
    }
}

/// tiktoken's pattern backtracks over long runs of white space, and gives up
/// (with a panic) past about a million characters of it; pieces this long
/// stay far below that. A token split at a piece's edge is counted as two.
const PIECE_BYTES: usize = 64 * 1024;

/// The tokens of a text, special-token markers in it taken as text.
pub fn encode(bpe: &CoreBPE, text: &str) -> Vec<Rank> {
    let mut tokens = Vec::new();
    for piece in pieces(text) {
        match std::panic::catch_unwind(|| bpe.encode_ordinary(piece)) {
            Ok(encoded) => tokens.extend(encoded),
            // Should the tokenizer still give up, each byte counts as a
            // token: never fewer tokens than the text has.
            Err(_) => tokens.extend(piece.bytes().map(Rank::from)),
        }
    }
    tokens
}

pub fn count(bpe: &CoreBPE, text: &str) -> i64 {
    encode(bpe, text).len() as i64
}

/// `text` cut into pieces of at most [`PIECE_BYTES`], at character
/// boundaries.
fn pieces(text: &str) -> impl Iterator<Item = &str> {
    let mut rest = text;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let mut end = rest.len().min(PIECE_BYTES);
        while !rest.is_char_boundary(end) {
            end -= 1;
        }
        let (piece, after) = rest.split_at(end);
        rest = after;
        Some(piece)
    })
}

/// Request fields that set how the model answers but put nothing in front
/// of it. Every other field (tools, a response format, a prediction, any
/// field this list does not know) is counted as its JSON text, so that no
/// part of a request can reach the model uncounted; for most, that counts
/// a little more than the model sees.
const PARAMETERS: [&str; 20] = [
    "model",
    "messages",
    "stream",
    "stream_options",
    "n",
    "max_tokens",
    "max_completion_tokens",
    "temperature",
    "top_p",
    "presence_penalty",
    "frequency_penalty",
    "seed",
    "user",
    "logprobs",
    "top_logprobs",
    "logit_bias",
    "parallel_tool_calls",
    "store",
    "service_tier",
    "reasoning_effort",
];

/// The prompt tokens of a chat completion request: its messages, counted
/// as OpenAI describes, and every other field that reaches the model.
pub fn estimate_prompt(bpe: &CoreBPE, request: &Map<String, Value>) -> i64 {
    let messages = request.get("messages").and_then(Value::as_array);
    let mut total = REPLY_PRIMING;
    for message in messages.into_iter().flatten() {
        total += TOKENS_PER_MESSAGE;
        for (field, value) in message.as_object().into_iter().flatten() {
            total += match (field.as_str(), value) {
                ("content", content) => content_tokens(bpe, content),
                ("name", Value::String(name)) => count(bpe, name) + TOKENS_PER_NAME,
                (_, Value::String(text)) => count(bpe, text),
                (_, Value::Null) => 0,
                (_, other) => count(bpe, &other.to_string()),
            };
        }
    }
    let others = request.iter().filter(|(field, _)| !PARAMETERS.contains(&field.as_str()));
    total + others.map(|(_, value)| count(bpe, &value.to_string())).sum::<i64>()
}

/// A message's content: a text, or a list of parts of which text parts are
/// counted and images are given a fixed size.
fn content_tokens(bpe: &CoreBPE, content: &Value) -> i64 {
    match content {
        Value::String(text) => count(bpe, text),
        Value::Array(parts) => parts.iter().map(|part| part_tokens(bpe, part)).sum(),
        Value::Null => 0,
        other => count(bpe, &other.to_string()),
    }
}

fn part_tokens(bpe: &CoreBPE, part: &Value) -> i64 {
    match part.get("type").and_then(Value::as_str) {
        Some("text") => part.get("text").and_then(Value::as_str).map_or(0, |t| count(bpe, t)),
        Some("image_url") => TOKENS_PER_IMAGE,
        _ => count(bpe, &part.to_string()),
    }
}

/// The text a message's content carries, its text parts joined.
pub fn content_text(content: &Value) -> String {
    match content {
        Value::String(text) => text.clone(),
        Value::Array(parts) => parts
            .iter()
            .filter(|part| part.get("type").and_then(Value::as_str) == Some("text"))
            .filter_map(|part| part.get("text").and_then(Value::as_str))
            .collect(),
        _ => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_message_costs_its_text_and_the_framing_openai_describes() {
        let bpe = encoding_for("gpt-4o");
        let text = count(bpe, "Hello there");
        let request = json!({"model": "gpt-4o", "temperature": 0.5,
                             "messages": [{"role": "user", "content": "Hello there"}]});
        let role = count(bpe, "user");
        let request = request.as_object().unwrap();
        assert_eq!(estimate_prompt(bpe, request), 3 + 3 + role + text);
    }

    #[test]
    fn every_field_that_reaches_the_model_is_counted() {
        let bpe = encoding_for("gpt-4o");
        let schema = json!({"type": "json_schema", "json_schema": {"name": "a long schema"}});
        let request = json!({"model": "m", "messages": [], "response_format": schema,
                             "tools": [{"type": "function"}], "something_new": "text"});
        let expected = 3
            + count(bpe, &schema.to_string())
            + count(bpe, r#"[{"type":"function"}]"#)
            + count(bpe, r#""text""#);
        assert_eq!(estimate_prompt(bpe, request.as_object().unwrap()), expected);
    }

    #[test]
    fn text_parts_are_counted_and_images_given_a_fixed_size() {
        let bpe = encoding_for("unknown-model");
        let parts = json!([
            {"type": "text", "text": "What is in this picture?"},
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
        ]);
        let expected = count(bpe, "What is in this picture?") + TOKENS_PER_IMAGE;
        assert_eq!(content_tokens(bpe, &parts), expected);
        assert_eq!(content_text(&parts), "What is in this picture?");
    }

    #[test]
    fn a_megabyte_of_white_space_is_counted_not_a_panic() {
        let bpe = encoding_for("gpt-4o");
        let spaces = " ".repeat(1 << 20);
        let tokens = count(bpe, &spaces);
        assert!((1..=spaces.len() as i64).contains(&tokens), "{tokens}");
        let text = "é".repeat(PIECE_BYTES);
        assert_eq!(pieces(&text).map(str::len).sum::<usize>(), text.len());
    }

    #[test]
    fn older_models_use_their_own_encoding() {
        let old = encoding_for("gpt-3.5-turbo");
        let new = encoding_for("gpt-4o-mini");
        let text = "tokenizers disagree about 🦀 emoji and whitespace    runs";
        assert_ne!(old.encode_ordinary(text), new.encode_ordinary(text));
        assert!(std::ptr::eq(new, encoding_for("llama-3")));
    }
}
