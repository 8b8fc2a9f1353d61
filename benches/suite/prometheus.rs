//! Reading Prometheus's text format as `/metrics` writes it: single
//! samples, and histograms, whose cumulative buckets subtracted between two
//! scrapes give the distribution of what happened in between.

/// One scrape of `/metrics`.
pub struct Scrape {
    text: String,
}

impl Scrape {
    pub fn new(text: String) -> Scrape {
        Scrape { text }
    }

    /// The value of the sample written exactly `sample` (name and labels).
    pub fn value(&self, sample: &str) -> Option<f64> {
        self.samples().find_map(|(name, value)| (name == sample).then_some(value))
    }

    /// The histogram `name`: its `_bucket`, `_count` and `_sum` samples.
    pub fn histogram(&self, name: &str) -> Histogram {
        let bucket = format!("{name}_bucket{{le=\"");
        let buckets = self.samples().filter_map(|(sample, count)| {
            let bound = sample.strip_prefix(&bucket)?.strip_suffix("\"}")?;
            Some((bound.parse().ok()?, count))
        });
        Histogram {
            buckets: buckets.collect(),
            count: self.value(&format!("{name}_count")).unwrap_or(0.0),
        }
    }

    fn samples(&self) -> impl Iterator<Item = (&str, f64)> {
        let lines = self.text.lines().filter(|line| !line.starts_with('#'));
        lines.filter_map(|line| {
            let (name, value) = line.rsplit_once(' ')?;
            Some((name.trim(), value.parse().ok()?))
        })
    }
}

/// A histogram's cumulative counts by upper bound (`+Inf` last), as
/// Prometheus keeps them.
#[derive(Clone, Debug, Default)]
pub struct Histogram {
    pub buckets: Vec<(f64, f64)>,
    pub count: f64,
}

impl Histogram {
    /// What was observed after `earlier` was scraped.
    pub fn since(&self, earlier: &Histogram) -> Histogram {
        let before = |bound: f64| {
            let found = earlier.buckets.iter().find(|(le, _)| *le == bound);
            found.map_or(0.0, |(_, count)| *count)
        };
        let buckets = self.buckets.iter().map(|&(le, count)| (le, count - before(le)));
        Histogram { buckets: buckets.collect(), count: self.count - earlier.count }
    }

    /// The `q` quantile, interpolated linearly within its bucket as
    /// Prometheus's `histogram_quantile` does; `None` with no observations.
    /// It is only as fine as the buckets: between 10 and 25 ms, say, it
    /// assumes the observations are spread evenly.
    pub fn quantile(&self, q: f64) -> Option<f64> {
        if self.count <= 0.0 {
            return None;
        }
        let rank = q * self.count;
        let mut lower = (0.0, 0.0);
        for &(le, count) in &self.buckets {
            if count >= rank {
                if le.is_infinite() {
                    return Some(lower.0);
                }
                let share = (rank - lower.1) / (count - lower.1).max(f64::MIN_POSITIVE);
                return Some(lower.0 + (le - lower.0) * share);
            }
            lower = (le, count);
        }
        Some(lower.0)
    }
}
