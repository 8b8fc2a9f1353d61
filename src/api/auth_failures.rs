//! Failed authentications counted per client address, and the refusal of
//! every authenticated request from an address that failed too often,
//! made before its credential is looked at, so that a guess that would
//! have been right is refused like the others.
//!
//! This is our own small table rather than `governor`'s keyed limiter,
//! which can only count a request and decide in the same step: it cannot
//! say whether an address is blocked without spending one of its cells,
//! so it cannot refuse before the credential is read and count only the
//! failures. Its keyed state also grows with every new key until pruned,
//! with no bound of its own; this table has one, kept by `lru`.
//!
//! Each address's window begins with its first failure and lasts the
//! limit's window; within it, once `max` failures are counted, the
//! address is refused until the window ends. A success does not reset the
//! count: otherwise a caller holding one good credential could interleave
//! it with guesses for ever.
//!
//! A request is checked before its credential is looked up and counted
//! after, so requests from one address that are in flight at the same
//! moment all pass the check: an address can make as many failures beyond
//! the limit as it has requests in flight at once (bounded by the cap on
//! connections), once per window.
//!
//! The address is the TCP peer's. Behind a proxy every client has the
//! proxy's address, so the limit counts all of them together, and a few
//! clients with bad credentials lock every client out for the rest of the
//! window; `X-Forwarded-For` is not read, so such a deployment should turn
//! the limit off and limit failures at the proxy.

use std::net::IpAddr;
use std::num::NonZeroUsize;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use lru::LruCache;

use super::error::ApiError;
use crate::config::AuthFailureLimit;

/// Addresses whose failures are remembered. An entry takes about a hundred
/// bytes, so the table stays within a few megabytes however many addresses
/// an attacker has. Past it, the address that failed least recently is
/// forgotten: an attacker with more addresses than this that fail every
/// minute can free one of them early, and gets no more guesses from that
/// than its addresses gave it already.
const MAX_TRACKED_ADDRESSES: usize = 65_536;

/// Ended windows dropped from the table's old end each time a failure is
/// counted, so that addresses that stopped failing leave the table without
/// a sweep of it, and without one failure paying for many.
const PRUNED_PER_FAILURE: usize = 4;

/// Who the count is kept for. An IPv4 client is its address. An IPv6
/// client is its /64: a host is given a whole /64 (and picks new addresses
/// in it at will, privacy addresses rotate within it), so counting whole
/// addresses would give one client 2^64 budgets. The hosts of one /64
/// share a budget, as the clients behind one IPv4 NAT do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Source {
    V4(u32),
    V6(u64),
}

impl Source {
    fn of(address: IpAddr) -> Source {
        // A dual-stack listener sees IPv4 clients as ::ffff:a.b.c.d.
        match address.to_canonical() {
            IpAddr::V4(v4) => Source::V4(v4.to_bits()),
            IpAddr::V6(v6) => Source::V6((v6.to_bits() >> 64) as u64),
        }
    }
}

/// An address's failures in its current window.
struct Window {
    started: Instant,
    failures: u32,
}

/// The table of failures, shared by every request of a server.
pub struct AuthFailures {
    limit: AuthFailureLimit,
    /// Locked for a lookup or an update only, never across an await.
    table: Mutex<LruCache<Source, Window>>,
}

impl AuthFailures {
    pub fn new(limit: AuthFailureLimit) -> AuthFailures {
        let capacity = NonZeroUsize::new(MAX_TRACKED_ADDRESSES).expect("not zero");
        AuthFailures { limit, table: Mutex::new(LruCache::new(capacity)) }
    }

    /// Refuses the request if its address has used up its failures.
    pub fn check(&self, peer: IpAddr) -> Result<(), ApiError> {
        if self.limit.max == 0 {
            return Ok(());
        }
        let table = self.table.lock().unwrap_or_else(PoisonError::into_inner);
        let Some(window) = table.peek(&Source::of(peer)) else {
            return Ok(());
        };
        let left = self.left_of(window, Instant::now());
        match left {
            Some(left) if window.failures >= self.limit.max => {
                metrics::counter!(crate::metrics::AUTH_RATE_LIMITED).increment(1);
                Err(ApiError::RateLimited { retry_after: whole_seconds(left) })
            }
            _ => Ok(()),
        }
    }

    /// Counts a failed authentication from the address.
    pub fn record(&self, peer: IpAddr) {
        if self.limit.max == 0 {
            return;
        }
        let now = Instant::now();
        let mut table = self.table.lock().unwrap_or_else(PoisonError::into_inner);
        self.prune(&mut table, now);
        let source = Source::of(peer);
        match table.get_mut(&source) {
            Some(window) if self.left_of(window, now).is_some() => {
                window.failures = window.failures.saturating_add(1);
            }
            _ => {
                table.put(source, Window { started: now, failures: 1 });
            }
        }
    }

    /// Drops a few of the least recently failing addresses whose windows
    /// have ended.
    fn prune(&self, table: &mut LruCache<Source, Window>, now: Instant) {
        for _ in 0..PRUNED_PER_FAILURE {
            match table.peek_lru() {
                Some((_, window)) if self.left_of(window, now).is_none() => table.pop_lru(),
                _ => return,
            };
        }
    }

    /// What is left of the window, or `None` once it has ended.
    fn left_of(&self, window: &Window, now: Instant) -> Option<Duration> {
        let ends = window.started + self.limit.window;
        Some(ends.saturating_duration_since(now)).filter(|left| !left.is_zero())
    }
}

/// Seconds for `Retry-After`, rounded up so that a client that waits them
/// is let in, and never 0.
fn whole_seconds(left: Duration) -> u64 {
    left.as_millis().div_ceil(1000).max(1) as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_ipv6_client_is_counted_by_its_64_and_a_mapped_ipv4_one_by_its_address() {
        let one: IpAddr = "2001:db8:1:2:aaaa::1".parse().unwrap();
        let same_64: IpAddr = "2001:db8:1:2:bbbb::2".parse().unwrap();
        let other_64: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert_eq!(Source::of(one), Source::of(same_64));
        assert_ne!(Source::of(one), Source::of(other_64));
        let mapped: IpAddr = "::ffff:192.0.2.7".parse().unwrap();
        assert_eq!(Source::of(mapped), Source::of("192.0.2.7".parse().unwrap()));
    }

    #[test]
    fn the_table_forgets_the_least_recently_failing_address_when_full() {
        let failures = AuthFailures::new(AuthFailureLimit::per_minute(1));
        let first: IpAddr = "10.0.0.1".parse().unwrap();
        failures.record(first);
        assert!(failures.check(first).is_err());
        for n in 0..MAX_TRACKED_ADDRESSES as u32 {
            failures.record(IpAddr::V4((0x0b00_0000 + n).into()));
        }
        let table = failures.table.lock().unwrap();
        assert_eq!(table.len(), MAX_TRACKED_ADDRESSES);
        drop(table);
        assert!(failures.check(first).is_ok(), "the oldest address was kept");
    }

    #[test]
    fn retry_after_is_rounded_up_to_a_whole_second() {
        assert_eq!(whole_seconds(Duration::from_millis(1)), 1);
        assert_eq!(whole_seconds(Duration::from_millis(1000)), 1);
        assert_eq!(whole_seconds(Duration::from_millis(59_001)), 60);
    }
}
