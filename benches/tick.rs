//! The meter's tick at the store, without the network: how long the one
//! transaction that charges every open session takes, for a given number
//! of sessions (one human each). The whole server's figures, ticks included
//! as `/metrics` shows them under real load, come from the `suite` bench;
//! this one isolates the store so that a change to it can be measured on
//! its own.
//!
//! `cargo bench --bench tick -- [SESSIONS] [TICKS]` (default 19000, 60).

use std::time::{Duration, Instant};

use tollgate::limits::{Limit, LimitType, SessionKind};
use tollgate::secret::{Secret, SecretKind};
use tollgate::store::sqlite::SqliteStore;
use tollgate::store::{Admission, Charge, MintRequest, NewSession, Store, UsageBatch};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1).filter(|arg| arg != "--bench");
    let sessions: usize = args.next().map_or(Ok(19_000), |n| n.parse())?;
    let ticks: usize = args.next().map_or(Ok(60), |n| n.parse())?;

    let dir = tempfile::tempdir()?;
    let (store, threads) = SqliteStore::open(&dir.path().join("tick.db"))?;
    let charges = open_sessions(&store, sessions).await?;

    let mut took = Vec::with_capacity(ticks);
    let mut now = tollgate::clock::now_millis();
    for _ in 0..ticks {
        now += 1000;
        let batch = UsageBatch { charges: charges.clone(), ends: Vec::new() };
        let started = Instant::now();
        store.record_usage(batch, now).await?;
        took.push(started.elapsed());
    }
    took.sort();
    let at = |q: f64| took[((took.len() - 1) as f64 * q).round() as usize];
    println!(
        "{sessions} sessions, {ticks} ticks: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        millis(at(0.5)),
        millis(at(0.99)),
        millis(at(1.0))
    );
    drop(store);
    threads.join();
    Ok(())
}

/// Mints a token for each of `n` humans and opens a session for each;
/// returns a tick's worth of charges for them.
async fn open_sessions(store: &SqliteStore, n: usize) -> anyhow::Result<Vec<Charge>> {
    let key = Secret::generate(SecretKind::ApiKey);
    store.add_api_key("bench", key.hash()).await?;
    let project = store.find_api_key(key.hash()).await?.expect("just added");
    let now = tollgate::clock::now_millis();
    let mut charges = Vec::with_capacity(n);
    for i in 0..n {
        let human = format!("human-{i}");
        let limit = Limit { limit_type: LimitType::ConversationalSeconds, value: 1 << 40 };
        let mint = MintRequest {
            project,
            human: human.clone(),
            token_hash: Secret::generate(SecretKind::UsageToken).hash(),
            now,
            expires_at: now + 3_600_000,
            limits: Some(vec![limit]),
        };
        store.mint_token(mint).await?;
        let human = store.find_human(project, &human).await?.expect("just minted").id;
        let session = NewSession {
            human,
            kind: SessionKind::Conversational,
            public_id: format!("ses_{i}"),
            token: None,
            max_sessions_per_human: None,
            now,
        };
        let Admission::Admitted { key, .. } = store.open_session(session).await? else {
            anyhow::bail!("session {i} was not admitted");
        };
        let limit_type = LimitType::ConversationalSeconds;
        charges.push(Charge { session: key, human, limit_type, amount: 1000 });
    }
    Ok(charges)
}

fn millis(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1000.0
}
