//! The arithmetic of a shared pool: whole milliseconds between instants,
//! and the instant a pool runs dry.

use std::time::Duration;

use tokio::time::Instant;

/// Whole milliseconds from `since` to `until`, negative when `until` comes
/// first. Fractions of a millisecond are never charged; they stay on the
/// clock for the next charge.
pub fn signed_millis(until: Instant, since: Instant) -> i64 {
    if until >= since {
        (until - since).as_millis() as i64
    } else {
        -((since - until).as_millis() as i64)
    }
}

/// Whole milliseconds from `since` to `until`, rounded up; 0 when `until`
/// comes first. Used only for a cut-off, whose charges the store cuts to
/// what is left of the pool, so that the pool ends at zero exactly rather
/// than a millisecond above it.
pub fn millis_up_to(until: Instant, since: Instant) -> i64 {
    let span = until.saturating_duration_since(since);
    span.as_nanos().div_ceil(1_000_000) as i64
}

/// When a pool with `remaining` milliseconds runs dry, given the instants
/// up to which each of its open sessions has been charged. Each session
/// drains the pool at wall-clock rate from its own instant `c_i`, so the
/// pool is empty at the `t` where `remaining = sum(t - c_i)`, that is
/// `t = (remaining + sum(c_i)) / n`.
pub fn exhaustion(remaining: i64, committed: &[Instant]) -> Instant {
    let base = *committed.iter().min().expect("a pool with open sessions");
    let offsets: u128 = committed.iter().map(|at| (*at - base).as_nanos()).sum();
    let total = remaining.max(0) as u128 * 1_000_000 + offsets;
    let nanos = total / committed.len() as u128;
    base + Duration::from_nanos(u64::try_from(nanos).unwrap_or(u64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn one_session_runs_dry_after_exactly_what_remains() {
        let start = Instant::now();
        assert_eq!(exhaustion(1500, &[start]), start + ms(1500));
    }

    #[test]
    fn two_sessions_started_together_halve_the_time() {
        let start = Instant::now();
        assert_eq!(exhaustion(10_000, &[start, start]), start + ms(5000));
    }

    #[test]
    fn a_later_session_shares_only_what_is_left_when_it_joins() {
        // 10 s left at t=0 for the first session, the second joins at t=2 s:
        // 8 s are left then, drained twice as fast, so dry at t=6 s.
        let start = Instant::now();
        assert_eq!(exhaustion(10_000, &[start, start + ms(2000)]), start + ms(6000));
    }

    #[test]
    fn an_empty_or_overdrawn_pool_is_dry_at_once() {
        let start = Instant::now();
        assert_eq!(exhaustion(0, &[start]), start);
        assert_eq!(exhaustion(-500, &[start]), start);
    }

    #[test]
    fn a_cut_off_charge_rounds_up_to_the_millisecond() {
        let start = Instant::now();
        assert_eq!(millis_up_to(start + Duration::from_micros(2001), start), 3);
        assert_eq!(millis_up_to(start + ms(2), start), 2);
        assert_eq!(millis_up_to(start, start + ms(2)), 0);
    }

    #[test]
    fn signed_millis_counts_whole_milliseconds_either_way() {
        let start = Instant::now();
        assert_eq!(signed_millis(start + Duration::from_micros(2999), start), 2);
        assert_eq!(signed_millis(start, start + ms(3)), -3);
        assert_eq!(signed_millis(start, start), 0);
    }
}
