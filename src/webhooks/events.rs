//! The events a project's webhook receives, and the JSON each is delivered
//! as: `{"type", "payload"}`, where the payload always names the event (a
//! stable `id`, the same on every attempt), the human (as `human` and, for
//! older receivers, `human_id`), the project, and when it happened.

use serde_json::{Map, Value, json};

use crate::limits::{LimitType, SessionKind};

pub const USAGE_TRACKED: &str = "usage.tracked";
pub const SESSION_STATE_CHANGED: &str = "realtime_session.state_changed";
pub const LIMIT_LOW: &str = "usage.limit_low";
pub const LIMIT_EXHAUSTED: &str = "usage.limit_exhausted";
pub const TOKEN_REVOKED: &str = "usage_token.revoked";

/// Every event type, as a webhook's `events` may name them.
pub const ALL: [&str; 5] =
    [USAGE_TRACKED, SESSION_STATE_CHANGED, LIMIT_LOW, LIMIT_EXHAUSTED, TOKEN_REVOKED];

/// What recorded usage came from, for `usage.tracked`'s `metadata`.
#[derive(Clone, Debug)]
pub enum UsageSource<'a> {
    Session { session: &'a str, kind: SessionKind },
    Completion { completion: &'a str, model: &'a str, prompt_tokens: i64, completion_tokens: i64 },
    Report { report: i64, idempotency_key: &'a str, metadata: Option<Value> },
}

/// An event, with what only its kind carries. Amounts are in base units.
#[derive(Clone, Debug)]
pub enum Event<'a> {
    UsageTracked { limit_type: LimitType, amount: i64, source: UsageSource<'a> },
    SessionStarted { session: &'a str, kind: SessionKind },
    SessionEnded { session: &'a str, kind: SessionKind, charged: i64, reason: &'a str },
    LimitLow { limit_type: LimitType, remaining: i64, threshold: i64 },
    LimitExhausted { limit_type: LimitType, remaining: i64 },
    TokenRevoked { revoked_tokens: u64 },
}

/// Whom an event is about, and when it happened.
pub struct Subject<'a> {
    pub event_id: &'a str,
    pub human: &'a str,
    pub project: &'a str,
    pub at: crate::store::UnixMillis,
}

impl Event<'_> {
    pub fn kind(&self) -> &'static str {
        match self {
            Event::UsageTracked { .. } => USAGE_TRACKED,
            Event::SessionStarted { .. } | Event::SessionEnded { .. } => SESSION_STATE_CHANGED,
            Event::LimitLow { .. } => LIMIT_LOW,
            Event::LimitExhausted { .. } => LIMIT_EXHAUSTED,
            Event::TokenRevoked { .. } => TOKEN_REVOKED,
        }
    }

    /// The body a delivery sends.
    pub fn body(&self, subject: &Subject) -> Value {
        let mut payload = self.fields();
        payload.insert("id".into(), json!(subject.event_id));
        payload.insert("human".into(), json!(subject.human));
        payload.insert("human_id".into(), json!(subject.human));
        payload.insert("project".into(), json!(subject.project));
        // Deliveries can arrive out of order; this puts them back in it.
        payload.insert("created_at".into(), json!(crate::clock::rfc3339(subject.at)));
        json!({ "type": self.kind(), "payload": payload })
    }

    fn fields(&self) -> Map<String, Value> {
        let fields = match self {
            Event::UsageTracked { limit_type, amount, source } => json!({
                "type": limit_type,
                "value": limit_type.to_value(*amount),
                "metadata": source.metadata(),
            }),
            Event::SessionStarted { session, kind } => json!({
                "session": session, "kind": kind, "state": "started",
            }),
            Event::SessionEnded { session, kind, charged, reason } => json!({
                "session": session,
                "kind": kind,
                "state": "ended",
                "seconds_used": *charged as f64 / 1000.0,
                "end_reason": reason,
            }),
            Event::LimitLow { limit_type, remaining, threshold } => json!({
                "type": limit_type,
                "remaining": limit_type.to_value(*remaining),
                "threshold": limit_type.to_value(*threshold),
            }),
            Event::LimitExhausted { limit_type, remaining } => json!({
                "type": limit_type, "remaining": limit_type.to_value(*remaining),
            }),
            Event::TokenRevoked { revoked_tokens } => json!({ "revoked_tokens": revoked_tokens }),
        };
        match fields {
            Value::Object(fields) => fields,
            _ => unreachable!("every event's fields are an object"),
        }
    }
}

impl UsageSource<'_> {
    fn metadata(&self) -> Value {
        match self {
            UsageSource::Session { session, kind } => json!({ "session": session, "kind": kind }),
            UsageSource::Completion { completion, model, prompt_tokens, completion_tokens } => {
                json!({
                    "completion": completion,
                    "model": model,
                    "prompt_tokens": prompt_tokens,
                    "completion_tokens": completion_tokens,
                })
            }
            UsageSource::Report { report, idempotency_key, metadata } => json!({
                "report": report, "idempotency_key": idempotency_key, "metadata": metadata,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_payload_names_the_event_the_human_twice_and_the_project() {
        let subject = Subject { event_id: "evt_1", human: "ada", project: "default", at: 0 };
        let event = Event::UsageTracked {
            limit_type: LimitType::ConversationalSeconds,
            amount: 1500,
            source: UsageSource::Session { session: "ses_1", kind: SessionKind::Conversational },
        };
        let body = event.body(&subject);
        assert_eq!(body["type"], "usage.tracked");
        let payload = &body["payload"];
        assert_eq!(
            (payload["id"].as_str(), payload["human"].as_str()),
            (Some("evt_1"), Some("ada"))
        );
        assert_eq!(payload["human_id"], "ada");
        assert_eq!(payload["project"], "default");
        assert_eq!(payload["value"], 1.5);
        assert_eq!(payload["metadata"]["session"], "ses_1");
    }
}
