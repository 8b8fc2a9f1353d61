//! The meter's tick at the store, without the network: how long a tick's
//! one transaction takes with a given number of open sessions (one human
//! each). The meter records each open session once a minute, so a tick in
//! the steady state records a sixtieth of them, in rotation, and the
//! meter's clock; the worst case, every session due in the same tick
//! (they all opened within one second), is timed too. The whole server's
//! figures, ticks included as `/metrics` shows them under real load, come
//! from the `suite` bench; this one isolates the store so that a change to
//! it can be measured on its own.
//!
//! `cargo bench --bench tick -- [SESSIONS] [TICKS]` (default 19000, 120).

use std::time::{Duration, Instant};

use tollgate::limits::{Limit, LimitType, SessionKind};
use tollgate::secret::{Secret, SecretKind};
use tollgate::store::sqlite::SqliteStore;
use tollgate::store::{
    Admission, Charge, MintRequest, NewSession, SessionCaller, Store, UsageBatch,
};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1).filter(|arg| arg != "--bench");
    let sessions: usize = args.next().map_or(Ok(19_000), |n| n.parse())?;
    let ticks: usize = args.next().map_or(Ok(120), |n| n.parse())?;

    let dir = tempfile::tempdir()?;
    let (store, threads) = SqliteStore::open(&dir.path().join("tick.db"))?;
    let charges = open_sessions(&store, sessions).await?;

    let mut now = tollgate::clock::now_millis();
    let mut steady = Vec::with_capacity(ticks);
    let slice = sessions.div_ceil(60);
    for due in charges.chunks(slice).cycle().take(ticks) {
        now += 1000;
        let due = due.iter().map(|charge| Charge { amount: 60_000, ..*charge }).collect();
        steady.push(time_tick(&store, due, now).await?);
    }
    report(&format!("{sessions} sessions, {slice} due a tick"), steady);
    let mut all_due = Vec::new();
    for _ in 0..5 {
        now += 60_000;
        all_due.push(time_tick(&store, charges.clone(), now).await?);
    }
    report(&format!("{sessions} sessions, all due in one tick"), all_due);
    drop(store);
    threads.join();
    Ok(())
}

/// Mints a token for each of `n` humans and opens a session for each;
/// returns a tick's worth of charges for them.
async fn open_sessions(store: &SqliteStore, n: usize) -> anyhow::Result<Vec<Charge>> {
    let key = Secret::generate(SecretKind::ApiKey);
    store.add_api_key("bench", key.hash()).await?;
    let project = store.find_api_key(key.hash()).await?.expect("just added").project;
    let now = tollgate::clock::now_millis();
    let mut charges = Vec::with_capacity(n);
    for i in 0..n {
        let human = format!("human-{i}");
        let limit = Limit { limit_type: LimitType::ConversationalSeconds, value: 1 << 40 };
        let token = Secret::generate(SecretKind::UsageToken);
        let mint = MintRequest {
            project,
            human,
            token_hash: token.hash(),
            now,
            expires_at: now + 3_600_000,
            limits: Some(vec![limit]),
        };
        store.mint_token(mint).await?;
        let session = NewSession {
            caller: SessionCaller::Token(token.hash()),
            kind: SessionKind::Conversational,
            public_id: format!("ses_{i}"),
            max_sessions_per_human: None,
            now,
        };
        let Admission::Admitted { key, human, .. } = store.open_session(session).await? else {
            anyhow::bail!("session {i} was not admitted");
        };
        let human = human.id;
        let limit_type = LimitType::ConversationalSeconds;
        charges.push(Charge { session: key, human, limit_type, amount: 1000 });
    }
    Ok(charges)
}

async fn time_tick(
    store: &SqliteStore,
    charges: Vec<Charge>,
    now: i64,
) -> anyhow::Result<Duration> {
    let started = Instant::now();
    store.record_usage(UsageBatch { charges, ..UsageBatch::default() }, now).await?;
    Ok(started.elapsed())
}

fn report(what: &str, mut took: Vec<Duration>) {
    took.sort();
    let at = |q: f64| millis(took[((took.len() - 1) as f64 * q).round() as usize]);
    let (ticks, p50, p99, max) = (took.len(), at(0.5), at(0.99), at(1.0));
    println!("{what}, {ticks} ticks: p50 {p50:.2} ms, p99 {p99:.2} ms, max {max:.2} ms");
}

fn millis(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1000.0
}
