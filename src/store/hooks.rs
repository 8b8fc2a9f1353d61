//! What a project's webhook asks for, as every backend reads it from its
//! `webhooks` row, and the decision of which "running low" and
//! "exhausted" events a pool's new balance fires. Writing the events and
//! the pool's marks is each backend's own.

use std::collections::HashMap;

use crate::limits::{Limit, LimitType};
use crate::webhooks::events::{Event, LIMIT_EXHAUSTED, LIMIT_LOW};

/// One project's webhook: the event types it wants and its lines.
#[derive(Clone, Debug, Default)]
pub struct Hook {
    /// `None`: every event type.
    events: Option<Vec<String>>,
    /// The remaining value, in base units, below which "running low" fires.
    thresholds: HashMap<LimitType, i64>,
}

impl Hook {
    /// From the `events` and `thresholds` columns, JSON text; text that
    /// does not parse counts as absent.
    pub fn from_columns(events: Option<&str>, thresholds: Option<&str>) -> Hook {
        let events = events.and_then(|text| serde_json::from_str(text).ok());
        let thresholds = thresholds
            .and_then(|text| serde_json::from_str::<HashMap<LimitType, i64>>(text).ok())
            .unwrap_or_default();
        Hook { events, thresholds }
    }

    pub fn wants(&self, kind: &str) -> bool {
        match &self.events {
            None => true,
            Some(events) => events.iter().any(|event| event == kind),
        }
    }

    pub fn threshold(&self, limit_type: LimitType) -> Option<i64> {
        self.thresholds.get(&limit_type).copied()
    }
}

/// What has fired for a pool since its balance was last above each line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Notified {
    pub low: bool,
    pub exhausted: bool,
}

/// What a pool's new balance fires, and its marks afterwards.
pub struct Crossing {
    pub events: Vec<Event<'static>>,
    pub notified: Notified,
    /// The "running low" line still armed, if any: the balance below which
    /// the store must be told of the pool again.
    pub armed_line: Option<i64>,
}

/// Fires "running low" when `balance` is first below the webhook's
/// threshold and "exhausted" when it first reaches zero, once per
/// crossing, and re-arms each once the balance is back above its line.
pub fn crossing(hook: &Hook, limit_type: LimitType, was: Notified, balance: i64) -> Crossing {
    let mut events = Vec::new();
    let mut notified = was;
    // A line the webhook does not want is left armed, so that wanting it
    // later does not find its crossing already used up.
    let threshold = hook.threshold(limit_type).filter(|_| hook.wants(LIMIT_LOW));
    if let Some(threshold) = threshold {
        if balance < threshold && !notified.low {
            events.push(Event::LimitLow { limit_type, remaining: balance, threshold });
            notified.low = true;
        } else if balance > threshold {
            notified.low = false;
        }
    }
    if hook.wants(LIMIT_EXHAUSTED) {
        if balance <= 0 && !notified.exhausted {
            events.push(Event::LimitExhausted { limit_type, remaining: balance });
            notified.exhausted = true;
        } else if balance > 0 {
            notified.exhausted = false;
        }
    }
    let armed_line = threshold.filter(|_| !notified.low);
    Crossing { events, notified, armed_line }
}

/// The "running low" line still armed for a pool whose marks are
/// `notified`, as [`crossing`] leaves it, without a new balance.
pub fn armed_line(hook: &Hook, limit_type: LimitType, notified: Notified) -> Option<i64> {
    hook.threshold(limit_type).filter(|_| hook.wants(LIMIT_LOW) && !notified.low)
}

/// A webhook's lines as its `thresholds` column keeps them: a JSON object
/// of limit type to value, `None` for no lines.
pub fn thresholds_text(thresholds: &[Limit]) -> Option<String> {
    if thresholds.is_empty() {
        return None;
    }
    let map: serde_json::Map<String, serde_json::Value> = thresholds
        .iter()
        .map(|limit| (limit.limit_type.as_str().to_owned(), serde_json::json!(limit.value)))
        .collect();
    Some(serde_json::Value::Object(map).to_string())
}

/// The lines of a `thresholds` column, in the order of their types.
pub fn parse_thresholds(text: Option<&str>) -> Vec<Limit> {
    let map: std::collections::BTreeMap<LimitType, i64> =
        text.and_then(|text| serde_json::from_str(text).ok()).unwrap_or_default();
    map.into_iter().map(|(limit_type, value)| Limit { limit_type, value }).collect()
}
