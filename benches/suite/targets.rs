//! The targets of BENCHMARKS.md and whether a report meets them: the rows
//! of the table that `all` prints. A figure run smaller than its target's
//! size shows only that it works, not that the target is met.

use std::fmt;
use std::time::Duration;

use crate::suite::figures::mints::MintsReport;
use crate::suite::figures::relay::RelayReport;
use crate::suite::figures::sessions::SessionsReport;
use crate::suite::figures::upgrades::UpgradesReport;
use crate::suite::stats::{millis, thousands};

pub const SESSIONS: [&str; 5] = [
    "19,000 sessions held 5 minutes every one closed on time",
    "≤ 8 KiB RSS growth per idle session",
    "≤ 5 % of one core CPU at 19,000 idle sessions with 1 s ticks",
    "tick p99 ≤ 25 ms at 19,000 sessions",
    "every session closes within 0.1 s of its limit under that load",
];
pub const UPGRADES: [&str; 1] =
    ["authenticated upgrades at 256 in flight ≥ 90 % of the baseline's rate with p99 ≤ 1.5 × \
     the baseline's"];
pub const RELAY: [&str; 1] =
    ["echo relay throughput with 100 sessions of 640-byte frames ≥ 90 % of baseline's messages \
     per second"];
pub const MINTS: [&str; 1] = ["≥ 5,000 token mints per second with 64 concurrent clients"];

pub enum Verdict {
    Met,
    Missed,
    /// Met at a smaller size than the target's, named here.
    NotAtSize(String),
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Verdict::Met => write!(f, "yes"),
            Verdict::Missed => write!(f, "no"),
            Verdict::NotAtSize(size) => write!(f, "not shown ({size})"),
        }
    }
}

fn verdict(met: bool, at_size: bool, size: &str) -> Verdict {
    match (met, at_size) {
        (false, _) => Verdict::Missed,
        (true, true) => Verdict::Met,
        (true, false) => Verdict::NotAtSize(size.to_owned()),
    }
}

pub struct Row {
    pub figure: &'static str,
    pub target: &'static str,
    pub result: String,
    pub verdict: Verdict,
}

/// The rows of a figure that could not be run at all.
pub fn failed(figure: &'static str, targets: &[&'static str], error: &anyhow::Error) -> Vec<Row> {
    let row = |target| Row {
        figure,
        target,
        result: format!("failed: {error:#}"),
        verdict: Verdict::Missed,
    };
    targets.iter().copied().map(row).collect()
}

pub fn sessions(report: &SessionsReport) -> Vec<Row> {
    let at_size = report.sessions >= 19_000 && report.hold >= Duration::from_secs(300);
    let idle = at_size && !report.frames;
    let size = format!("{} sessions held {:?}", thousands(report.sessions), report.hold);
    let results = [
        (closed_on_time(report), at_size),
        (memory(report), idle),
        (cpu(report), idle),
        (ticks(report), at_size),
        (precision(report), at_size),
    ];
    let results = results.map(|((result, met), full)| (result, verdict(met, full, &size)));
    rows("sessions", &SESSIONS, results)
}

/// A result, and whether it meets its target.
type Judged = (String, bool);

fn closed_on_time(report: &SessionsReport) -> Judged {
    let result = format!(
        "{} opened, {} closed with 4001, errors: {}",
        thousands(report.opened),
        thousands(report.closed_at_limit),
        report.errors
    );
    (result, all_cut_off(report) && precision(report).1)
}

fn all_cut_off(report: &SessionsReport) -> bool {
    report.closed_at_limit == report.sessions && report.errors.is_empty()
}

fn memory(report: &SessionsReport) -> Judged {
    let kib = report.server.rss_per_session_kib;
    (format!("{kib:.2} KiB"), kib <= 8.0)
}

fn cpu(report: &SessionsReport) -> Judged {
    let percent = report.server.cpu_percent;
    (format!("{percent:.2} %"), percent <= 5.0)
}

fn ticks(report: &SessionsReport) -> Judged {
    match report.server.tick_p99 {
        Some(p99) => (format!("p99 {:.2} ms", millis(p99)), p99 <= Duration::from_millis(25)),
        None => ("no ticks seen".into(), false),
    }
}

fn precision(report: &SessionsReport) -> Judged {
    let cut_off = &report.cut_off;
    let result = format!(
        "max {:.1} ms, p99 {:.1} ms, {} beyond 0.1 s",
        millis(cut_off.max),
        millis(cut_off.p99),
        thousands(cut_off.outside_tolerance)
    );
    (result, cut_off.outside_tolerance == 0 && all_cut_off(report))
}

pub fn upgrades(report: &UpgradesReport) -> Vec<Row> {
    let size = format!("{} in flight", report.in_flight);
    let clean = report.tollgate.errors.is_empty() && report.baseline.errors.is_empty();
    let met = clean && report.rate_ratio() >= 0.9 && report.p99_ratio() <= 1.5;
    let (low, high) = report.spread();
    let result = format!(
        "{:.0}/s vs {:.0}/s; median of {} rounds {:.1} % (rounds {:.1} to {:.1} %); \
         p99 {:.2} ms vs {:.2} ms ({:.2} ×)",
        report.tollgate.per_second,
        report.baseline.per_second,
        report.rounds.len(),
        100.0 * report.rate_ratio(),
        100.0 * low,
        100.0 * high,
        millis(report.tollgate.latency.p99),
        millis(report.baseline.latency.p99),
        report.p99_ratio()
    );
    rows("upgrades", &UPGRADES, [(result, verdict(met, report.in_flight == 256, &size))])
}

pub fn relay(report: &RelayReport) -> Vec<Row> {
    let size = format!("{} sessions", report.sessions);
    let clean = report.tollgate.errors.is_empty() && report.baseline.errors.is_empty();
    let (low, high) = report.spread();
    let result = format!(
        "{:.0} vs {:.0} messages/s; median of {} rounds {:.1} % (rounds {:.1} to {:.1} %)",
        report.tollgate.per_second,
        report.baseline.per_second,
        report.rounds.len(),
        100.0 * report.ratio(),
        100.0 * low,
        100.0 * high
    );
    let met = clean && report.ratio() >= 0.9;
    rows("relay", &RELAY, [(result, verdict(met, report.sessions == 100, &size))])
}

pub fn mints(report: &MintsReport) -> Vec<Row> {
    let size = format!("{} clients", report.concurrency);
    let result = format!("{:.0}/s, {}", report.per_second, report.latency);
    let met = report.errors.is_empty() && report.per_second >= 5000.0;
    rows("mints", &MINTS, [(result, verdict(met, report.concurrency == 64, &size))])
}

fn rows<const N: usize>(
    figure: &'static str,
    targets: &[&'static str; N],
    results: [(String, Verdict); N],
) -> Vec<Row> {
    let rows = targets.iter().zip(results);
    rows.map(|(target, (result, verdict))| Row { figure, target, result, verdict }).collect()
}

pub fn markdown(rows: &[Row]) -> String {
    let mut table = String::from("| figure | target | result | met? |\n|---|---|---|---|\n");
    for row in rows {
        let line =
            format!("| {} | {} | {} | {} |\n", row.figure, row.target, row.result, row.verdict);
        table.push_str(&line);
    }
    table
}
