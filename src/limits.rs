//! The metered quantities: limit types, session kinds, and the conversion
//! between the API's units (seconds, tokens) and the store's base units
//! (milliseconds, tokens).

use serde::{Deserialize, Serialize};

/// The largest value a limit may be set to or raised to, in API units.
/// Anything larger is almost certainly a bug in the caller (a timestamp or a
/// byte count sent by mistake), and refusing it keeps every balance far from
/// the edges of `i64` even after it is converted to milliseconds.
pub const MAX_LIMIT_VALUE: f64 = 1e12;

/// A kind of usage that can be limited.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LimitType {
    ConversationalSeconds,
    VoiceSynthesisSeconds,
    TokenCnt,
}

impl LimitType {
    pub const ALL: [LimitType; 3] =
        [LimitType::ConversationalSeconds, LimitType::VoiceSynthesisSeconds, LimitType::TokenCnt];

    /// The name used in the API and in the database.
    pub fn as_str(self) -> &'static str {
        match self {
            LimitType::ConversationalSeconds => "conversational_seconds",
            LimitType::VoiceSynthesisSeconds => "voice_synthesis_seconds",
            LimitType::TokenCnt => "token_cnt",
        }
    }

    pub fn parse(name: &str) -> Option<LimitType> {
        LimitType::ALL.into_iter().find(|t| t.as_str() == name)
    }

    /// How many base units make one API unit: seconds are kept in
    /// milliseconds, tokens are kept as they are.
    fn units_per_value(self) -> i64 {
        match self {
            LimitType::ConversationalSeconds | LimitType::VoiceSynthesisSeconds => 1000,
            LimitType::TokenCnt => 1,
        }
    }

    /// Converts an API value (already checked to be finite and in range) to
    /// base units. Seconds are rounded to the nearest millisecond; a
    /// fractional token count is refused.
    pub fn to_base(self, value: f64) -> Result<i64, &'static str> {
        if !value.is_finite() || value < 0.0 {
            return Err("must be a number of at least 0");
        }
        if value > MAX_LIMIT_VALUE {
            return Err("must be at most 1e12");
        }
        let scaled = value * self.units_per_value() as f64;
        if self == LimitType::TokenCnt && scaled.fract() != 0.0 {
            return Err("must be a whole number of tokens");
        }
        Ok(scaled.round() as i64)
    }

    /// The largest balance, in base units, that a top-up may reach.
    pub fn max_base(self) -> i64 {
        MAX_LIMIT_VALUE as i64 * self.units_per_value()
    }

    /// Converts base units back to the API's number.
    pub fn to_value(self, base: i64) -> f64 {
        base as f64 / self.units_per_value() as f64
    }
}

/// The kind of a realtime session, which decides the limit it debits.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SessionKind {
    Conversational,
    VoiceSynthesis,
}

impl SessionKind {
    pub const ALL: [SessionKind; 2] = [SessionKind::Conversational, SessionKind::VoiceSynthesis];

    pub fn as_str(self) -> &'static str {
        match self {
            SessionKind::Conversational => "conversational",
            SessionKind::VoiceSynthesis => "voice_synthesis",
        }
    }

    pub fn parse(name: &str) -> Option<SessionKind> {
        match name {
            "conversational" => Some(SessionKind::Conversational),
            "voice_synthesis" => Some(SessionKind::VoiceSynthesis),
            _ => None,
        }
    }

    /// The limit a session of this kind draws on.
    pub fn limit_type(self) -> LimitType {
        match self {
            SessionKind::Conversational => LimitType::ConversationalSeconds,
            SessionKind::VoiceSynthesis => LimitType::VoiceSynthesisSeconds,
        }
    }
}

/// One limit of a human as the API shows it: `{"type", "value"}`, the value
/// in API units (seconds or tokens).
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct LimitView {
    #[serde(rename = "type")]
    pub limit_type: LimitType,
    pub value: f64,
}

/// One limit in base units, as the store keeps it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limit {
    pub limit_type: LimitType,
    pub value: i64,
}

impl Limit {
    pub fn view(self) -> LimitView {
        LimitView { limit_type: self.limit_type, value: self.limit_type.to_value(self.value) }
    }
}

/// How a change of limits applies its values.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ChangeMode {
    /// The value becomes the remaining amount.
    #[default]
    Set,
    /// The value is added to the remaining amount (a top-up). On a type the
    /// human has no limit for, it starts the limit at that value.
    Add,
}

/// How many completion tokens each choice of a chat completion may have,
/// given what its human's `token_cnt` has `available` (the balance less
/// what running completions hold): what the request `wanted`, lowered so
/// that the prompt's estimate and every choice fit. `None` when nothing
/// would be left for an answer.
pub fn completion_allowance(available: i64, prompt: i64, wanted: i64, choices: i64) -> Option<i64> {
    let per_choice = (available - prompt) / choices.max(1);
    Some(wanted.min(per_choice)).filter(|allowance| *allowance > 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_answer_is_allowed_what_remains_after_the_prompt_and_no_more_than_asked() {
        assert_eq!(completion_allowance(1000, 10, 100, 1), Some(100));
        assert_eq!(completion_allowance(50, 10, 100, 1), Some(40));
        assert_eq!(completion_allowance(50, 10, 100, 4), Some(10));
        assert_eq!(completion_allowance(10, 10, 100, 1), None);
        assert_eq!(completion_allowance(-5, 10, 100, 1), None);
        assert_eq!(completion_allowance(12, 10, 100, 3), None);
    }

    #[test]
    fn seconds_are_kept_in_milliseconds_rounded_to_the_nearest() {
        let t = LimitType::ConversationalSeconds;
        assert_eq!(t.to_base(1.5), Ok(1500));
        assert_eq!(t.to_base(0.1 + 0.2), Ok(300));
        assert_eq!(t.to_base(0.0004), Ok(0));
        assert_eq!(t.to_value(1234), 1.234);
    }

    #[test]
    fn token_counts_must_be_whole() {
        let t = LimitType::TokenCnt;
        assert_eq!(t.to_base(42.0), Ok(42));
        assert!(t.to_base(1.5).is_err());
    }

    #[test]
    fn negative_non_finite_and_absurd_values_are_refused() {
        let t = LimitType::VoiceSynthesisSeconds;
        for bad in [-1.0, f64::NAN, f64::INFINITY, 1e12 + 1.0, 1e300] {
            assert!(t.to_base(bad).is_err(), "{bad} was accepted");
        }
        assert_eq!(t.to_base(1e12), Ok(1_000_000_000_000_000));
    }

    #[test]
    fn names_round_trip() {
        for t in LimitType::ALL {
            assert_eq!(LimitType::parse(t.as_str()), Some(t));
        }
        assert_eq!(SessionKind::parse("voice_synthesis"), Some(SessionKind::VoiceSynthesis));
        assert_eq!(SessionKind::parse("video"), None);
    }
}
