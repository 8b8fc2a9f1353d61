//! When a session's client is sent its figures. Between two
//! `usage.remaining` messages a client can count down on its own: its own
//! usage grows by a second a second, and its pool falls by a second a
//! second for each of the pool's open sessions, which the message names.
//! By default the meter sends the figures only when they stop matching
//! that count-down (a top-up, a set, another session of the pool starting
//! or ending, time given back) and when the pool falls below the warning
//! line. A message a second to each of 19,000 idle sessions cost about 40 %
//! of a core (BENCHMARKS.md); a client that wants one every tick asks for
//! it with `events=ticks`. The meter does not look at the other sessions
//! as time passes, which at 19,000 was half of an idle server's CPU: each
//! of those changes reaches it as an event (a commit that charged or read
//! the pool, a session opening or ending, the pool's warning timer), and
//! it works out the figures then.

use tokio::time::Instant;

use super::SessionUpdate;
use super::pool::signed_millis;

/// How far the figures may stray from the client's count-down before the
/// client is sent them again: less than the whole second an app shows.
const DRIFT_MILLIS: i64 = 500;

/// Which `usage.*` messages a session's client asked for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UsageEvents {
    /// None (`events=none`).
    Off,
    /// The figures when they stray from the count-down (`events=all`, the
    /// default).
    Changes,
    /// The figures after every tick as well (`events=ticks`).
    EveryTick,
}

/// The figures a client was last sent, and when.
#[derive(Clone, Copy, Debug)]
pub struct Told {
    pub at: Instant,
    pub update: SessionUpdate,
}

/// `update` counted down to `now`, as its client counts it: for figures
/// sent late, so that they are as true when they go out as when they were
/// worked out.
pub fn counted_down(update: &SessionUpdate, now: Instant) -> SessionUpdate {
    let Some(at) = update.at else {
        return *update;
    };
    let elapsed = signed_millis(now, at).max(0);
    let drained = i64::from(update.sessions) * elapsed;
    SessionUpdate {
        remaining_millis: update.remaining_millis.map(|left| (left - drained).max(0)),
        used_millis: update.used_millis + elapsed,
        at: Some(now),
        ..*update
    }
}

/// Whether a client that asked for `events` and was last sent `told`
/// should be sent `update`, the figures at `now`.
pub fn worth_sending(
    events: UsageEvents,
    told: Option<&Told>,
    update: &SessionUpdate,
    now: Instant,
) -> bool {
    match (events, told) {
        (UsageEvents::Off, _) => false,
        (UsageEvents::EveryTick, _) | (UsageEvents::Changes, None) => true,
        (UsageEvents::Changes, Some(told)) => strays(told, update, now),
    }
}

/// Whether `update` differs from what a client counting down from `told`
/// expects at `now`, or crosses the warning line.
fn strays(told: &Told, update: &SessionUpdate, now: Instant) -> bool {
    let last = &told.update;
    if last.low != update.low || last.sessions != update.sessions {
        return true;
    }
    let elapsed = signed_millis(now, told.at).max(0);
    let used = last.used_millis + elapsed;
    if (update.used_millis - used).abs() > DRIFT_MILLIS {
        return true;
    }
    match (last.remaining_millis, update.remaining_millis) {
        (None, None) => false,
        (Some(then), Some(remaining)) => {
            let expected = (then - i64::from(last.sessions) * elapsed).max(0);
            (remaining - expected).abs() > DRIFT_MILLIS
        }
        _ => true,
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn update(remaining: Option<i64>, used: i64, sessions: u32) -> SessionUpdate {
        SessionUpdate {
            remaining_millis: remaining,
            used_millis: used,
            sessions,
            ..Default::default()
        }
    }

    fn told(update: SessionUpdate) -> (Told, Instant) {
        let at = Instant::now();
        (Told { at, update }, at + Duration::from_secs(3))
    }

    #[test]
    fn a_steady_count_down_is_not_sent_again() {
        let (told, later) = told(update(Some(10_000), 1_000, 2));
        let counted_down = update(Some(4_000), 4_000, 2);
        assert!(!worth_sending(UsageEvents::Changes, Some(&told), &counted_down, later));
        assert!(worth_sending(UsageEvents::EveryTick, Some(&told), &counted_down, later));
        assert!(!worth_sending(UsageEvents::Off, None, &counted_down, later));
    }

    #[test]
    fn figures_sent_late_are_counted_down_to_when_they_go_out() {
        let (told, later) = told(update(Some(10_000), 1_000, 2));
        let late = counted_down(&SessionUpdate { at: Some(told.at), ..told.update }, later);
        assert_eq!((late.remaining_millis, late.used_millis), (Some(4_000), 4_000));
        assert!(!worth_sending(UsageEvents::Changes, Some(&told), &late, later));
        let dry =
            counted_down(&SessionUpdate { at: Some(told.at), ..update(Some(1_000), 0, 1) }, later);
        assert_eq!(dry.remaining_millis, Some(0));
    }

    #[test]
    fn the_first_figures_are_always_sent_unless_none_were_asked_for() {
        let first = update(Some(10_000), 0, 1);
        assert!(worth_sending(UsageEvents::Changes, None, &first, Instant::now()));
    }

    #[test]
    fn a_top_up_or_a_drain_past_the_drift_is_sent() {
        let (told, later) = told(update(Some(10_000), 0, 1));
        let within = update(Some(7_000 + DRIFT_MILLIS), 3_000, 1);
        assert!(!worth_sending(UsageEvents::Changes, Some(&told), &within, later));
        let topped_up = update(Some(7_000 + DRIFT_MILLIS + 1), 3_000, 1);
        assert!(worth_sending(UsageEvents::Changes, Some(&told), &topped_up, later));
        let drained = update(Some(7_000 - DRIFT_MILLIS - 1), 3_000, 1);
        assert!(worth_sending(UsageEvents::Changes, Some(&told), &drained, later));
    }

    #[test]
    fn another_session_of_the_pool_or_the_warning_line_is_sent() {
        let (told, later) = told(update(Some(10_000), 0, 1));
        let joined = update(Some(7_000), 3_000, 2);
        assert!(worth_sending(UsageEvents::Changes, Some(&told), &joined, later));
        let low = SessionUpdate { low: true, ..update(Some(7_000), 3_000, 1) };
        assert!(worth_sending(UsageEvents::Changes, Some(&told), &low, later));
    }

    #[test]
    fn a_count_down_stops_at_zero_and_unlimited_pools_count_only_usage() {
        let (told, later) = told(update(Some(1_000), 0, 1));
        let empty = update(Some(0), 3_000, 1);
        assert!(!worth_sending(UsageEvents::Changes, Some(&told), &empty, later));
        let (told, later) = self::told(update(None, 0, 1));
        assert!(!worth_sending(UsageEvents::Changes, Some(&told), &update(None, 3_000, 1), later));
        let refunded = update(None, 3_000 - DRIFT_MILLIS - 1, 1);
        assert!(worth_sending(UsageEvents::Changes, Some(&told), &refunded, later));
        let limited = update(Some(5_000), 3_000, 1);
        assert!(worth_sending(UsageEvents::Changes, Some(&told), &limited, later));
    }
}
