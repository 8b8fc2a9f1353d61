//! Request bodies as any client could send them, through the checks the
//! API's handlers run on them: every input is tried as the body of each
//! endpoint that takes one. Beyond not panicking, what is accepted must be
//! within the ranges docs/API.md gives, and what is refused must be an
//! `invalid_input` that says which field is wrong.

#![no_main]

use libfuzzer_sys::fuzz_target;
use serde_json::Value;
use tollgate::api::error::ApiError;
use tollgate::config::CapField;
use tollgate::fuzzing::{
    ChangeLimits, ChatRequest, CreateToken, HumanOnly, MAX_HUMAN_BYTES, ReportBody, SetWebhook,
    UpdateTtl, grace_millis, parse_json,
};
use tollgate::limits::Limit;
use tollgate::llm::LlmError;
use tollgate::store::ProjectId;
use tollgate::webhooks::events;

/// The default `--max-token-ttl`.
const MAX_TTL_SECONDS: f64 = 86_400.0;

/// The longest grace a webhook rotation may give, in milliseconds.
const MAX_GRACE_MILLIS: i64 = 7 * 86_400 * 1000;

/// What the proxy may let one answer use, in the checks of a forwarded body.
const ALLOWANCE: i64 = 40;

fuzz_target!(|body: &[u8]| {
    tokens(body);
    report(body);
    webhook(body);
    chat(body);
});

fn tokens(body: &[u8]) {
    if let Some(mint) =
        accepted(parse_json::<CreateToken>(body).and_then(|b| b.check(MAX_TTL_SECONDS)))
    {
        check_human(&mint.human);
        check_ttl(mint.ttl_millis);
        check_limits(mint.limits.as_deref().unwrap_or_default(), 0);
    }
    if let Some(change) = accepted(parse_json::<ChangeLimits>(body).and_then(ChangeLimits::check)) {
        check_human(&change.human);
        assert!(!change.limits.is_empty(), "a change of no limits was accepted");
        check_limits(&change.limits, 0);
    }
    if let Some(human) = accepted(parse_json::<HumanOnly>(body).and_then(HumanOnly::check)) {
        check_human(&human);
    }
    if let Some(change) =
        accepted(parse_json::<UpdateTtl>(body).and_then(|b| b.check(MAX_TTL_SECONDS)))
    {
        check_human(&change.human);
        check_ttl(change.ttl_millis);
    }
}

fn report(body: &[u8]) {
    let checked = parse_json::<ReportBody>(body).and_then(|b| b.check(ProjectId(1), 0));
    let Some(report) = accepted(checked) else {
        return;
    };
    check_human(&report.human);
    let amount = report.amount;
    assert!((1..=report.limit_type.max_base()).contains(&amount), "amount {amount}");
    let key = &report.idempotency_key;
    assert!((1..=255).contains(&key.len()) && !key.chars().any(char::is_control), "{key:?}");
    if let Some(metadata) = &report.metadata {
        assert!(metadata.len() <= 16 * 1024, "metadata of {} bytes", metadata.len());
        let value: Value = serde_json::from_str(metadata).expect("metadata is kept as JSON");
        assert!(value.is_object(), "metadata {metadata}");
    }
}

fn webhook(body: &[u8]) {
    let secret = "whsec_fuzz".to_owned();
    let checked = parse_json::<SetWebhook>(body).and_then(|b| b.check(ProjectId(1), secret, 0));
    if let Some(change) = accepted(checked) {
        let url = &change.url;
        assert!(url.starts_with("http://") || url.starts_with("https://"), "url {url:?}");
        assert!(url.len() <= 2048 && !url.contains('#') && !url.contains('@'), "url {url:?}");
        if let Some(names) = &change.events {
            assert!(!names.is_empty(), "an empty list of events was accepted");
            for (i, name) in names.iter().enumerate() {
                assert!(events::ALL.contains(&name.as_str()), "event {name:?}");
                assert!(!names[..i].contains(name), "event {name:?} kept twice");
            }
        }
        check_limits(&change.thresholds, 1);
    }
    if let Some(grace) = accepted(grace_millis(body)) {
        assert!((0..=MAX_GRACE_MILLIS).contains(&grace), "grace {grace}");
    }
}

fn chat(body: &[u8]) {
    let request = match ChatRequest::parse(body) {
        Ok(request) => request,
        // OpenAI's shape: the field, if any, is the error's `param`.
        Err(LlmError::InvalidRequest { param, message }) => {
            assert!(param.is_none_or(|param| message.starts_with(param)), "{param:?}: {message}");
            return;
        }
        Err(other) => panic!("a chat request was refused with {other:?}"),
    };
    assert!(!request.model.is_empty());
    assert!((1..=128).contains(&request.choices), "n = {}", request.choices);
    assert!(request.cap.is_none_or(|cap| (1..=100_000_000).contains(&cap)), "{:?}", request.cap);
    // Three tokens prime the reply, and each message has three of framing.
    assert!(request.prompt_estimate >= 6, "estimate {}", request.prompt_estimate);

    for allowance in [None, Some(ALLOWANCE)] {
        let sent = request.forwarded("fuzz-human", allowance, CapField::MaxTokens);
        let sent: Value = serde_json::from_slice(&sent).expect("the forwarded body is JSON");
        assert_eq!(sent["user"], "fuzz-human");
        if request.stream {
            let asked = &sent["stream_options"]["include_usage"];
            assert_eq!(asked, true, "a stream forwarded without asking for usage: {sent}");
        }
        if allowance.is_some() {
            check_caps(&sent);
        }
    }
}

/// With an allowance, the forwarded body carries a cap, and every cap in
/// it is within the allowance.
fn check_caps(sent: &Value) {
    let caps: Vec<&Value> = ["max_tokens", "max_completion_tokens"]
        .iter()
        .filter_map(|field| sent.get(*field))
        .collect();
    assert!(!caps.is_empty(), "no cap forwarded: {sent}");
    for cap in caps {
        let cap = cap.as_i64().unwrap_or_else(|| panic!("cap {cap} is not a whole number"));
        assert!((1..=ALLOWANCE).contains(&cap), "cap {cap} past the allowance");
    }
}

/// The value of a check, or `None` after checking the refusal.
fn accepted<T>(result: Result<T, ApiError>) -> Option<T> {
    match result {
        Ok(value) => Some(value),
        Err(ApiError::InvalidInput(message)) => {
            check_message(&message);
            None
        }
        Err(other) => panic!("a body was refused with {other:?} rather than invalid_input"),
    }
}

/// A refusal names what is wrong, then what is wrong with it. An unknown
/// field is named as it was sent, which may itself start with `: `.
fn check_message(message: &str) {
    assert!(message.contains(": "), "{message:?} names no field");
    let unnamed = message.starts_with(": ") && !message.contains("unknown field `: ");
    assert!(!unnamed, "{message:?} names no field");
}

fn check_human(human: &str) {
    assert!((1..=MAX_HUMAN_BYTES).contains(&human.len()), "human of {} bytes", human.len());
    assert!(!human.chars().any(char::is_control) && human.trim() == human, "human {human:?}");
}

fn check_ttl(millis: i64) {
    assert!((1..=MAX_TTL_SECONDS as i64 * 1000).contains(&millis), "ttl of {millis} ms");
}

/// Limits in base units within their type's range, at least `least`, and
/// no type twice.
fn check_limits(limits: &[Limit], least: i64) {
    for (i, limit) in limits.iter().enumerate() {
        let range = least..=limit.limit_type.max_base();
        assert!(range.contains(&limit.value), "{limit:?} out of {range:?}");
        let twice = limits[..i].iter().any(|other| other.limit_type == limit.limit_type);
        assert!(!twice, "{:?} named twice", limit.limit_type);
    }
}
