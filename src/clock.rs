//! Wall-clock time, for what is stored and shown. Metering itself runs on
//! the monotonic clock (`tokio::time::Instant`), so that a clock step never
//! charges or frees time.

use std::time::{SystemTime, UNIX_EPOCH};

use chrono::{DateTime, SecondsFormat, Utc};

use crate::store::UnixMillis;

pub fn now_millis() -> UnixMillis {
    let since_epoch = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
    since_epoch.as_millis() as UnixMillis
}

/// RFC 3339 in UTC with milliseconds, e.g. `2026-12-03T11:22:33.456Z`.
pub fn rfc3339(millis: UnixMillis) -> String {
    DateTime::<Utc>::from_timestamp_millis(millis)
        .unwrap_or_default()
        .to_rfc3339_opts(SecondsFormat::Millis, true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_are_rfc3339_in_utc_with_milliseconds() {
        assert_eq!(rfc3339(1_796_297_753_456), "2026-12-03T11:35:53.456Z");
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00.000Z");
    }
}
