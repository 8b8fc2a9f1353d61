//! The server's own messages on a session: JSON text frames whose `type`
//! starts with `usage.`. docs/API.md describes them for clients.

use serde::Serialize;

use crate::limits::SessionKind;

#[derive(Debug, Serialize)]
#[serde(tag = "type")]
pub enum ServerMessage<'a> {
    /// The first frame of every session.
    #[serde(rename = "usage.session_started")]
    SessionStarted {
        session_id: &'a str,
        kind: SessionKind,
        human: &'a str,
        /// Seconds left in the human's pool, `null` when unlimited.
        remaining: Option<f64>,
    },
    /// When the figures change other than by the client's count-down
    /// (or after every tick, if the client asked for that).
    #[serde(rename = "usage.remaining")]
    Remaining {
        remaining: Option<f64>,
        /// Seconds this session has been charged so far.
        used: f64,
        /// The pool's open sessions: `remaining` falls by this many
        /// seconds a second.
        sessions: u32,
    },
    /// Once when the pool falls below the warning threshold, and again
    /// after a top-up lifted it above and it fell once more.
    #[serde(rename = "usage.warning")]
    Warning { remaining: f64 },
}

impl ServerMessage<'_> {
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("server messages always serialise")
    }
}

pub fn seconds(millis: i64) -> f64 {
    millis as f64 / 1000.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_carry_their_usage_type() {
        let started = ServerMessage::SessionStarted {
            session_id: "ses_1",
            kind: SessionKind::VoiceSynthesis,
            human: "ada",
            remaining: None,
        };
        let json: serde_json::Value = serde_json::from_str(&started.to_json()).unwrap();
        let expected = serde_json::json!({
            "type": "usage.session_started",
            "session_id": "ses_1",
            "kind": "voice_synthesis",
            "human": "ada",
            "remaining": null,
        });
        assert_eq!(json, expected);
        let remaining =
            ServerMessage::Remaining { remaining: Some(seconds(1500)), used: 0.25, sessions: 2 };
        let expected = r#"{"type":"usage.remaining","remaining":1.5,"used":0.25,"sessions":2}"#;
        assert_eq!(remaining.to_json(), expected);
    }
}
