//! Summaries of what was measured: latency percentiles, tallies of what
//! went wrong, and numbers written for people.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

/// Latencies of many operations, by percentile (nearest rank).
#[derive(Clone, Copy, Debug, Default)]
pub struct Summary {
    pub count: u64,
    pub p50: Duration,
    pub p99: Duration,
    pub max: Duration,
}

impl Summary {
    pub fn of(mut samples: Vec<Duration>) -> Summary {
        samples.sort_unstable();
        Summary {
            count: samples.len() as u64,
            p50: percentile(&samples, 0.50),
            p99: percentile(&samples, 0.99),
            max: samples.last().copied().unwrap_or_default(),
        }
    }
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (p50, p99, max) = (millis(self.p50), millis(self.p99), millis(self.max));
        write!(f, "p50 {p50:.2} ms, p99 {p99:.2} ms, max {max:.2} ms")
    }
}

/// The sample at or above the fraction `p` of the sorted `samples`.
pub fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = (p * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

pub fn millis(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1000.0
}

/// How often each kind of failure happened.
#[derive(Clone, Debug, Default)]
pub struct Tally(BTreeMap<String, u64>);

impl Tally {
    pub fn add(&mut self, what: impl Into<String>) {
        *self.0.entry(what.into()).or_default() += 1;
    }

    pub fn merge(&mut self, other: Tally) {
        for (what, count) in other.0 {
            *self.0.entry(what).or_default() += count;
        }
    }

    pub fn total(&self) -> u64 {
        self.0.values().sum()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Display for Tally {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_empty() {
            return write!(f, "none");
        }
        let parts: Vec<String> =
            self.0.iter().map(|(what, count)| format!("{} × {what}", thousands(*count))).collect();
        write!(f, "{}", parts.join("; "))
    }
}

/// The median of `figures`, the mean of the middle two for an even count;
/// NaN for none.
pub fn median(figures: &[f64]) -> f64 {
    let mut sorted = figures.to_vec();
    sorted.sort_by(f64::total_cmp);
    let middle = sorted.len() / 2;
    match sorted.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => sorted[middle],
        _ => (sorted[middle - 1] + sorted[middle]) / 2.0,
    }
}

/// The lowest and the highest of `figures`.
pub fn spread(figures: &[f64]) -> (f64, f64) {
    let low = figures.iter().copied().fold(f64::INFINITY, f64::min);
    let high = figures.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    (low, high)
}

/// `19000` as `19,000`.
pub fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, digit) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(digit);
    }
    out
}

/// Waits for clients that each return their latencies and errors, and puts
/// them together; a client task that panicked counts as an error.
pub async fn gather(
    clients: impl IntoIterator<Item = tokio::task::JoinHandle<(Vec<Duration>, Tally)>>,
) -> (Vec<Duration>, Tally) {
    let mut latencies = Vec::new();
    let mut errors = Tally::default();
    for joined in futures::future::join_all(clients).await {
        match joined {
            Ok((mut theirs, their_errors)) => {
                latencies.append(&mut theirs);
                errors.merge(their_errors);
            }
            Err(error) => errors.add(format!("task: {error}")),
        }
    }
    (latencies, errors)
}
