//! The same scenarios against each storage backend, through the `Store`
//! trait alone: SQLite always, and PostgreSQL in a fresh database per test
//! when `TOLLGATE_TEST_POSTGRES` names a server (see tests/common/postgres.rs
//! and .ci/postgres). Each scenario ends by checking the ledger identity:
//! every pool's balance is the sum of its ledger rows.

mod common;

use std::path::PathBuf;
use std::sync::Arc;

use common::postgres::{self, FreshDatabase};
use tollgate::close::EndReason;
use tollgate::limits::{ChangeMode, Limit, LimitType, SessionKind};
use tollgate::secret::{Secret, SecretHash, SecretKind};
use tollgate::store::postgres::PostgresStore;
use tollgate::store::sqlite::SqliteStore;
use tollgate::store::{
    Admission, AttemptOutcome, BatchId, Charge, CompletionAdmission, CompletionEnd,
    CompletionOutcome, DELIVERY_LEASE, DeliveryStatus, Foreign, HumanId, LedgerFilter, MintRequest,
    NewCompletion, NewReport, NewSession, Page, ProjectId, ReportOutcome, SessionCaller,
    SessionEnd, SessionFilter, SessionKey, Store, StoreError, UsageBatch, UsageSource,
    WebhookChange,
};

const CONVERSATIONAL: LimitType = LimitType::ConversationalSeconds;
const NOW: i64 = 1_800_000_000_000;
const HOUR: i64 = 3_600_000;

/// One backend's store and where its rows can be read directly.
struct Backend {
    name: &'static str,
    store: Arc<dyn Store>,
    rows: Rows,
}

enum Rows {
    Sqlite { path: PathBuf, _dir: tempfile::TempDir },
    Postgres { db: FreshDatabase },
}

/// A store of each backend there is, each on an empty database.
async fn backends(case: &str) -> Vec<Backend> {
    backends_joined(case, None).await
}

/// As [`backends`], the PostgreSQL store joined as a server's run metering
/// every `tick` (see [`PostgresStore::join`]), as a server's store is; a
/// store with no run is a command's, whose sessions no server meters.
async fn backends_joined(case: &str, tick: Option<std::time::Duration>) -> Vec<Backend> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t.db");
    let (sqlite, _threads) = SqliteStore::open(&path).unwrap();
    let mut backends = vec![Backend {
        name: "sqlite",
        store: Arc::new(sqlite),
        rows: Rows::Sqlite { path, _dir: dir },
    }];
    if let Some(server) = postgres::server(case) {
        let db = FreshDatabase::create(&server).await;
        let mut store = PostgresStore::open(&db.url).await.unwrap();
        if let Some(tick) = tick {
            store = store.join(tick).await.unwrap();
        }
        backends.push(Backend {
            name: "postgres",
            store: Arc::new(store),
            rows: Rows::Postgres { db },
        });
    }
    backends
}

/// A minted usage token: its id, and the hash a session is opened with.
#[derive(Clone, Copy)]
struct Token {
    id: i64,
    hash: SecretHash,
}

/// A conversational session opened with the token at NOW, under no cap.
fn new_session(token: Token, id: &str) -> NewSession {
    NewSession {
        caller: SessionCaller::Token(token.hash),
        kind: SessionKind::Conversational,
        public_id: id.into(),
        max_sessions_per_human: None,
        now: NOW,
    }
}

/// Pools whose balance differs from the sum of their ledger rows:
/// (human, type, balance, sum).
const UNBALANCED: &str = "
    SELECT l.human_id, l.limit_type, l.balance,
           CAST((SELECT COALESCE(SUM(amount), 0) FROM ledger g
                 WHERE g.human_id = l.human_id AND g.limit_type = l.limit_type) AS BIGINT)
    FROM limits l";

impl Backend {
    async fn assert_ledger_identity(&self) {
        let pools: Vec<(i64, String, i64, i64)> = match &self.rows {
            Rows::Sqlite { path, .. } => {
                let conn = common::open_db(path);
                let mut stmt = conn.prepare(UNBALANCED).unwrap();
                let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)));
                rows.unwrap().map(Result::unwrap).collect()
            }
            Rows::Postgres { db } => {
                let (client, connection) =
                    tokio_postgres::connect(&db.url, tokio_postgres::NoTls).await.unwrap();
                tokio::spawn(connection);
                let rows = client.query(UNBALANCED, &[]).await.unwrap();
                rows.iter().map(|r| (r.get(0), r.get(1), r.get(2), r.get(3))).collect()
            }
        };
        let broken: Vec<_> = pools.iter().filter(|(_, _, balance, sum)| balance != sum).collect();
        assert!(broken.is_empty(), "{}: balance differs from the ledger: {broken:?}", self.name);
    }

    /// A new project, by name.
    async fn project(&self, name: &str) -> ProjectId {
        let key = Secret::generate(SecretKind::ApiKey);
        self.store.add_api_key(name, key.hash()).await.unwrap();
        self.store.find_api_key(key.hash()).await.unwrap().unwrap().project
    }

    /// Mints a token for `human` with these limits; returns the human and
    /// the token's id.
    async fn mint(&self, project: ProjectId, human: &str, limits: &[Limit]) -> (HumanId, Token) {
        let token = Secret::generate(SecretKind::UsageToken);
        let request = MintRequest {
            project,
            human: human.into(),
            token_hash: token.hash(),
            now: NOW,
            expires_at: NOW + HOUR,
            limits: Some(limits.to_vec()),
        };
        self.store.mint_token(request).await.unwrap();
        let record = self.store.find_usage_token(token.hash()).await.unwrap().unwrap();
        (record.human.id, Token { id: record.id, hash: token.hash() })
    }

    async fn open(&self, token: Token, id: &str, cap: Option<u32>) -> Admission {
        let session = NewSession { max_sessions_per_human: cap, ..new_session(token, id) };
        self.store.open_session(session).await.unwrap()
    }

    async fn admitted(&self, token: Token, id: &str) -> SessionKey {
        match self.open(token, id, None).await {
            Admission::Admitted { key, .. } => key,
            other => panic!("{}: session {id} refused: {other:?}", self.name),
        }
    }

    async fn charge(&self, human: HumanId, session: SessionKey, amount: i64) -> Option<i64> {
        let charge = Charge { session, human, limit_type: CONVERSATIONAL, amount };
        let batch = UsageBatch { id: None, charges: vec![charge], ..UsageBatch::default() };
        let recorded = self.store.record_usage(batch, NOW + 1000).await.unwrap();
        recorded.pools[0].remaining
    }
}

fn seconds(value: i64) -> Limit {
    Limit { limit_type: CONVERSATIONAL, value: value * 1000 }
}

fn tokens(value: i64) -> Limit {
    Limit { limit_type: LimitType::TokenCnt, value }
}

#[tokio::test]
async fn minting_sets_limits_and_a_change_sets_or_adds_with_a_grant_each() {
    for b in backends("minting_sets_limits").await {
        let project = b.project("acme").await;
        let (human, _) = b.mint(project, "ada", &[seconds(10)]).await;
        assert_eq!(b.store.limits(human).await.unwrap(), vec![seconds(10)], "{}", b.name);

        let added = b.store.change_limits(project, "ada", vec![seconds(5)], ChangeMode::Add, NOW);
        assert_eq!(added.await.unwrap(), vec![seconds(15)], "{}", b.name);
        let set = b.store.change_limits(project, "ada", vec![tokens(100)], ChangeMode::Set, NOW);
        assert_eq!(set.await.unwrap(), vec![seconds(15), tokens(100)], "{}", b.name);

        let huge = Limit { limit_type: CONVERSATIONAL, value: CONVERSATIONAL.max_base() };
        let over = b.store.change_limits(project, "ada", vec![huge], ChangeMode::Add, NOW).await;
        assert!(matches!(over, Err(StoreError::LimitOverflow(_))), "{}: {over:?}", b.name);
        assert_eq!(b.store.limits(human).await.unwrap(), vec![seconds(15), tokens(100)]);

        let filter = LedgerFilter { project, human: Some("ada".into()), limit_type: None };
        let ledger = b.store.ledger(filter, Page { after: None, limit: 10 }).await.unwrap();
        let amounts: Vec<i64> = ledger.rows.iter().map(|row| row.amount).collect();
        assert_eq!(amounts, vec![10_000, 5_000, 100], "{}", b.name);
        b.assert_ledger_identity().await;
    }
}

#[tokio::test]
async fn a_session_is_refused_past_the_cap_when_the_limit_is_spent_or_the_token_is_dead() {
    for b in backends("a_session_is_refused").await {
        let project = b.project("acme").await;
        let (ada, token) = b.mint(project, "ada", &[seconds(10)]).await;
        for id in ["s1", "s2"] {
            let admitted = b.open(token, id, Some(2)).await;
            let expected_remaining = Some(10_000);
            assert!(
                matches!(&admitted, Admission::Admitted { remaining, human, .. }
                         if *remaining == expected_remaining && human.id == ada
                            && human.name == "ada"),
                "{}: {admitted:?}",
                b.name
            );
        }
        assert_eq!(b.open(token, "s3", Some(2)).await, Admission::TooManySessions);

        let (_, spent_token) = b.mint(project, "bob", &[seconds(0)]).await;
        assert_eq!(b.open(spent_token, "s4", None).await, Admission::LimitExhausted);

        b.store.revoke(project, "ada", NOW).await.unwrap();
        assert_eq!(b.open(token, "s5", None).await, Admission::TokenRevoked, "{}", b.name);

        let (_, late_token) = b.mint(project, "cy", &[seconds(10)]).await;
        let late = NewSession { now: NOW + 2 * HOUR, ..new_session(late_token, "s6") };
        assert_eq!(b.store.open_session(late).await.unwrap(), Admission::TokenExpired);

        let never_minted = Secret::generate(SecretKind::UsageToken).hash();
        let unknown = Token { id: 0, hash: never_minted };
        assert_eq!(b.open(unknown, "s7", None).await, Admission::UnknownToken, "{}", b.name);
        b.assert_ledger_identity().await;
    }
}

#[tokio::test]
async fn usage_is_debited_cut_at_zero_and_the_end_records_what_the_session_was_charged() {
    for b in backends("usage_is_debited").await {
        let project = b.project("acme").await;
        let (human, token) = b.mint(project, "ada", &[seconds(10)]).await;
        let session = b.admitted(token, "s1").await;

        assert_eq!(b.charge(human, session, 3_000).await, Some(7_000), "{}", b.name);
        assert_eq!(b.charge(human, session, 9_000).await, Some(0), "{}", b.name);
        let end = SessionEnd { session, reason: EndReason::UsageLimitExceeded };
        let batch = UsageBatch { ends: vec![end], ..UsageBatch::default() };
        let recorded = b.store.record_usage(batch, NOW + 2000).await.unwrap();
        assert_eq!(recorded.ended, vec![(session, 10_000)], "{}", b.name);

        let filter = SessionFilter { project, human: None, state: None };
        let listed = b.store.sessions(filter, Page { after: None, limit: 10 }).await.unwrap();
        let row = &listed.unwrap().rows[0];
        assert_eq!(
            (row.charged, row.end_reason.as_deref()),
            (10_000, Some("usage_limit_exceeded"))
        );
        b.assert_ledger_identity().await;
    }
}

#[tokio::test]
async fn a_grant_or_a_debit_too_large_for_a_balance_is_refused_and_changes_nothing() {
    for b in backends("a_grant_or_a_debit_too_large").await {
        let project = b.project("acme").await;
        let (human, _) = b.mint(project, "ada", &[seconds(10)]).await;
        let report = |amount, key: &str| NewReport {
            project,
            human: "ada".into(),
            limit_type: CONVERSATIONAL,
            amount,
            idempotency_key: key.into(),
            metadata: None,
            now: NOW,
        };
        let huge = Limit { limit_type: CONVERSATIONAL, value: i64::MAX };
        let grant = b.store.change_limits(project, "ada", vec![huge], ChangeMode::Add, NOW).await;
        assert!(matches!(grant, Err(StoreError::LimitOverflow(_))), "{}: {grant:?}", b.name);

        // Below zero, where a debit of the largest number passes the
        // smallest one.
        b.store.report_usage(report(20_000, "first")).await.unwrap();
        let debit = b.store.report_usage(report(i64::MAX, "huge")).await;
        assert!(matches!(debit, Err(StoreError::BalanceFloor(_))), "{}: {debit:?}", b.name);

        assert_eq!(b.store.limits(human).await.unwrap(), vec![seconds(-10)], "{}", b.name);
        let filter = LedgerFilter { project, human: None, limit_type: None };
        let ledger = b.store.ledger(filter, Page { after: None, limit: 10 }).await.unwrap();
        let amounts: Vec<i64> = ledger.rows.iter().map(|row| row.amount).collect();
        assert_eq!(amounts, vec![10_000, -20_000], "{}", b.name);
        let again = b.store.report_usage(report(1, "huge")).await.unwrap();
        assert!(matches!(again, ReportOutcome::Recorded(_)), "{}: {again:?}", b.name);
        b.assert_ledger_identity().await;
    }
}

#[tokio::test]
async fn a_batch_sent_again_under_its_id_is_answered_as_committed_and_not_charged_twice() {
    for b in backends_joined("a_batch_sent_again", Some(RUN_TICK)).await {
        let project = b.project("acme").await;
        let (human, token) = b.mint(project, "ada", &[seconds(10)]).await;
        let (ended, open) = (b.admitted(token, "s1").await, b.admitted(token, "s2").await);
        let charge =
            |session, amount| Charge { session, human, limit_type: CONVERSATIONAL, amount };
        let batch = UsageBatch {
            id: Some(BatchId::random()),
            charges: vec![charge(ended, 2_000), charge(open, 3_000)],
            ends: vec![SessionEnd { session: ended, reason: EndReason::ClientClosed }],
            watch: vec![],
        };
        let first = b.store.record_usage(batch.clone(), NOW + 1000).await.unwrap();
        let again = b.store.record_usage(batch, NOW + 1000).await.unwrap();

        assert_eq!(first.pools[0].remaining, Some(5_000), "{}", b.name);
        assert_eq!(again.pools, first.pools, "{}", b.name);
        assert_eq!(again.ended, vec![(ended, 2_000)], "{}", b.name);
        assert_eq!(b.store.limits(human).await.unwrap(), vec![seconds(5)], "{}", b.name);
        let filter = LedgerFilter { project, human: None, limit_type: None };
        let ledger = b.store.ledger(filter, Page { after: None, limit: 10 }).await.unwrap();
        let amounts: Vec<i64> = ledger.rows.iter().map(|row| row.amount).collect();
        assert_eq!(amounts, vec![10_000, -2_000, -3_000], "{}", b.name);

        let next = UsageBatch { id: Some(BatchId::random()), ..UsageBatch::default() };
        let next = UsageBatch { charges: vec![charge(open, 1_000)], ..next };
        let recorded = b.store.record_usage(next, NOW + 2000).await.unwrap();
        assert_eq!(recorded.pools[0].remaining, Some(4_000), "{}", b.name);
        b.assert_ledger_identity().await;
    }
}

#[tokio::test]
async fn the_meter_charges_once_a_batch_whose_commits_answer_was_lost() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::Duration;
    use tokio::time::Instant;
    use tollgate::meter::{Health, MeterSettings, Registration, SessionUpdate, UsageEvents};

    for b in backends_joined("the_meter_charges_once", Some(RUN_TICK)).await {
        let project = b.project("acme").await;
        let (human, token) = b.mint(project, "ada", &[seconds(60)]).await;
        let Admission::Admitted { key, revocation_epoch, .. } = b.open(token, "s1", None).await
        else {
            panic!("{}: the session was refused", b.name);
        };
        let inner = b.store.clone();
        let lossy = Arc::new(lossy::LosesAnAnswer { inner, lose_next: AtomicBool::new(false) });
        let health = Health::new();
        let settings = MeterSettings { tick: Duration::from_millis(100), warn_millis: 0 };
        let (meter, task) = tollgate::meter::spawn(lossy.clone(), settings, health.clone());
        let (updates_tx, _updates_rx) = tokio::sync::watch::channel(SessionUpdate::default());
        let started = Instant::now();
        let registration = Registration {
            key,
            human,
            limit_type: CONVERSATIONAL,
            started,
            remaining: Some(60_000),
            revocation_epoch,
            events: UsageEvents::Off,
            updates_tx,
            span: tracing::Span::none(),
        };
        meter.open(registration).await;
        tokio::time::sleep(Duration::from_millis(800)).await;

        // The settle's batch is applied, its answer lost: the meter closes
        // the session, and records the rest once the batch is answered.
        lossy.lose_next.store(true, Ordering::SeqCst);
        assert!(!meter.settle(human).await, "{}: the commit did not fail", b.name);
        while !health.is_recording() {
            assert!(started.elapsed() < Duration::from_secs(10), "{}: never recovered", b.name);
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let ran = started.elapsed().as_millis() as i64;
        assert!(meter.shutdown().await, "{}", b.name);
        drop(meter);
        task.await.unwrap();

        let filter = SessionFilter { project, human: None, state: None };
        let listed = b.store.sessions(filter, Page { after: None, limit: 10 }).await.unwrap();
        let row = &listed.unwrap().rows[0];
        assert_eq!(row.end_reason.as_deref(), Some("internal"), "{}", b.name);
        // Each charge is rounded to the millisecond.
        let charged = row.charged;
        assert!((800..=ran + 2).contains(&charged), "{}: charged {charged} of {ran} ms", b.name);
        b.assert_ledger_identity().await;
    }
}

#[tokio::test]
async fn the_ends_of_a_batch_are_answered_in_the_batchs_order() {
    for b in backends("the_ends_of_a_batch_are_answered").await {
        let project = b.project("acme").await;
        let (human, token) = b.mint(project, "ada", &[seconds(10)]).await;
        let first = b.admitted(token, "s1").await;
        let second = b.admitted(token, "s2").await;
        assert!(first.0 < second.0, "{}", b.name);
        b.charge(human, first, 1_000).await;
        b.charge(human, second, 2_000).await;

        let reason = EndReason::ClientClosed;
        let ends =
            vec![SessionEnd { session: second, reason }, SessionEnd { session: first, reason }];
        let batch = UsageBatch { ends, ..UsageBatch::default() };
        let recorded = b.store.record_usage(batch, NOW + 2000).await.unwrap();
        assert_eq!(recorded.ended, vec![(second, 2_000), (first, 1_000)], "{}", b.name);
        b.assert_ledger_identity().await;
    }
}

#[tokio::test]
async fn a_charge_for_a_session_never_admitted_fails_and_not_as_unavailable() {
    for b in backends("a_charge_for_a_session_never_admitted").await {
        let project = b.project("acme").await;
        let (human, _) = b.mint(project, "ada", &[seconds(10)]).await;
        let charge = Charge {
            session: SessionKey(999_999),
            human,
            limit_type: CONVERSATIONAL,
            amount: -1000,
        };
        let batch = UsageBatch { id: None, charges: vec![charge], ..UsageBatch::default() };
        let failed = b.store.record_usage(batch, NOW + 1000).await;
        assert!(matches!(failed, Err(StoreError::Other(_))), "{}: {failed:?}", b.name);
        b.store.ping().await.unwrap();
    }
}

#[tokio::test]
async fn a_refund_gives_back_no_more_than_was_charged_since_the_limit_was_set() {
    for b in backends("a_refund_gives_back").await {
        let project = b.project("acme").await;
        let (human, token) = b.mint(project, "ada", &[seconds(10)]).await;
        let session = b.admitted(token, "s1").await;
        assert_eq!(b.charge(human, session, 4_000).await, Some(6_000));
        b.store
            .change_limits(project, "ada", vec![seconds(20)], ChangeMode::Set, NOW)
            .await
            .unwrap();
        assert_eq!(b.charge(human, session, 1_000).await, Some(19_000));
        assert_eq!(b.charge(human, session, -3_000).await, Some(20_000), "{}", b.name);
        b.assert_ledger_identity().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_debits_of_one_human_never_lose_an_update() {
    const ROUNDS: i64 = 25;
    for b in backends("concurrent_debits").await {
        let project = b.project("acme").await;
        let (human, token) = b.mint(project, "ada", &[seconds(1_000)]).await;
        let first = b.admitted(token, "s1").await;
        let second = b.admitted(token, "s2").await;
        let debit = |session, amount| {
            let store = b.store.clone();
            tokio::spawn(async move {
                for _ in 0..ROUNDS {
                    let charge = Charge { session, human, limit_type: CONVERSATIONAL, amount };
                    let batch =
                        UsageBatch { id: None, charges: vec![charge], ..UsageBatch::default() };
                    store.record_usage(batch, NOW + 1000).await.unwrap();
                }
            })
        };
        let reports = {
            let store = b.store.clone();
            tokio::spawn(async move {
                for n in 0..ROUNDS {
                    let report = NewReport {
                        project,
                        human: "ada".into(),
                        limit_type: CONVERSATIONAL,
                        amount: 100,
                        idempotency_key: format!("job-{n}"),
                        metadata: None,
                        now: NOW,
                    };
                    store.report_usage(report).await.unwrap();
                }
            })
        };
        let joined = tokio::join!(debit(first, 1_000), debit(second, 3_000), reports);
        for task in [joined.0, joined.1, joined.2] {
            task.unwrap();
        }

        let spent = ROUNDS * (1_000 + 3_000 + 100);
        let expected = vec![Limit { limit_type: CONVERSATIONAL, value: 1_000_000 - spent }];
        assert_eq!(b.store.limits(human).await.unwrap(), expected, "{}", b.name);
        b.assert_ledger_identity().await;
    }
}

#[tokio::test]
async fn a_report_is_recorded_once_under_its_key() {
    for b in backends("a_report_is_recorded_once").await {
        let project = b.project("acme").await;
        b.mint(project, "ada", &[tokens(500)]).await;
        let report = |amount| NewReport {
            project,
            human: "ada".into(),
            limit_type: LimitType::TokenCnt,
            amount,
            idempotency_key: "job-1".into(),
            metadata: Some(r#"{"job":1}"#.into()),
            now: NOW,
        };
        let first = b.store.report_usage(report(200)).await.unwrap();
        assert!(matches!(&first, ReportOutcome::Recorded(r) if r.remaining == Some(300)));
        let again = b.store.report_usage(report(200)).await.unwrap();
        assert!(matches!(again, ReportOutcome::Repeated(_)), "{}: {again:?}", b.name);
        let other = b.store.report_usage(report(300)).await.unwrap();
        assert!(matches!(other, ReportOutcome::KeyReused(_)), "{}: {other:?}", b.name);
        b.assert_ledger_identity().await;
    }
}

#[tokio::test]
async fn a_completion_holds_tokens_while_it_runs_and_is_debited_what_it_used() {
    for b in backends("a_completion_holds_tokens").await {
        let project = b.project("acme").await;
        let (human, token) = b.mint(project, "ada", &[tokens(1_000)]).await;
        let start = |id: &str| NewCompletion {
            human,
            token: Some(token.id),
            public_id: id.into(),
            model: "echo".into(),
            prompt_estimate: 100,
            wanted: 700,
            choices: 1,
            now: NOW,
        };
        let CompletionAdmission::Admitted { key, allowance } =
            b.store.start_completion(start("c1")).await.unwrap()
        else {
            panic!("{}: the first completion was refused", b.name);
        };
        assert_eq!(allowance, Some(700));
        let second = b.store.start_completion(start("c2")).await.unwrap();
        assert!(
            matches!(second, CompletionAdmission::Admitted { allowance: Some(100), .. }),
            "{}: {second:?}",
            b.name
        );
        let end = CompletionEnd {
            key,
            human,
            prompt_tokens: 90,
            completion_tokens: 10,
            source: UsageSource::Upstream,
            outcome: CompletionOutcome::Completed,
            now: NOW,
        };
        assert_eq!(b.store.end_completion(end).await.unwrap(), Some(900), "{}", b.name);
        assert_eq!(b.store.close_abandoned_completions(NOW).await.unwrap(), 1);
        assert_eq!(b.store.limits(human).await.unwrap(), vec![tokens(800)], "{}", b.name);
        b.assert_ledger_identity().await;
    }
}

#[tokio::test]
async fn sessions_a_dead_run_left_open_are_charged_to_its_last_tick_and_ended() {
    for b in backends("sessions_a_dead_run_left_open").await {
        let project = b.project("acme").await;
        let (human, token) = b.mint(project, "ada", &[seconds(10)]).await;
        let session = b.admitted(token, "s1").await;
        b.charge(human, session, 1_000).await;
        assert_eq!(b.store.close_abandoned_sessions().await.unwrap(), 1, "{}", b.name);
        let filter = SessionFilter { project, human: None, state: None };
        let listed = b.store.sessions(filter, Page { after: None, limit: 10 }).await.unwrap();
        let row = &listed.unwrap().rows[0];
        assert_eq!(row.end_reason.as_deref(), Some("server_restart"), "{}", b.name);
        assert_eq!(row.ended_at, Some(NOW + 1000), "{}", b.name);
        b.assert_ledger_identity().await;
    }
}

#[tokio::test]
async fn the_outbox_hands_out_due_events_and_records_each_attempt() {
    for b in backends("the_outbox_hands_out_due_events").await {
        let project = b.project("acme").await;
        let change = WebhookChange {
            project,
            url: "http://127.0.0.1:9/hook".into(),
            events: None,
            thresholds: vec![seconds(5)],
            secret: "whsec_test".into(),
            now: NOW,
        };
        let (_, created) = b.store.set_webhook(change).await.unwrap();
        assert!(created);
        let (human, token) = b.mint(project, "ada", &[seconds(10)]).await;
        let session = b.admitted(token, "s1").await;
        // Below the 5-second line, then at zero: two limit events.
        b.charge(human, session, 6_000).await;
        b.charge(human, session, 6_000).await;

        let due = b.store.due_events(NOW + 5000, vec![], 10, 10).await.unwrap();
        let kinds: Vec<String> = due
            .iter()
            .map(|event| serde_json::from_str::<serde_json::Value>(&event.body).unwrap())
            .map(|body| body["type"].as_str().unwrap().to_owned())
            .collect();
        let expected =
            ["realtime_session.state_changed", "usage.limit_low", "usage.limit_exhausted"];
        assert!(
            expected.iter().all(|kind| kinds.iter().any(|k| k == kind)),
            "{}: {kinds:?}",
            b.name
        );
        assert!(due.iter().all(|event| event.url.as_deref() == Some("http://127.0.0.1:9/hook")));
        assert_eq!(due[0].secrets, vec!["whsec_test".to_owned()]);

        // SQLite leaves out only the busy event; PostgreSQL has claimed
        // every event the first read handed out.
        let busy = vec![due[0].seq];
        let rest = b.store.due_events(NOW + 5000, busy, 10, 10).await.unwrap();
        let left = if b.name == "postgres" { 0 } else { due.len() - 1 };
        assert_eq!(rest.len(), left, "{}", b.name);

        b.store.record_attempt(due[0].seq, AttemptOutcome::Delivered, NOW + 6000).await.unwrap();
        let retry = AttemptOutcome::Failed { error: "503".into(), retry_at: Some(NOW + 60_000) };
        b.store.record_attempt(due[1].seq, retry, NOW + 6000).await.unwrap();
        let give_up = AttemptOutcome::Failed { error: "gone".into(), retry_at: None };
        b.store.record_attempt(due[2].seq, give_up, NOW + 6000).await.unwrap();

        let still_due = b.store.due_events(NOW + 7000, vec![], 10, 10).await.unwrap();
        assert!(still_due.iter().all(|event| event.seq > due[2].seq), "{}", b.name);
        let delivered = b.store.deliveries(project, Some(DeliveryStatus::Delivered), None, 10);
        assert_eq!(delivered.await.unwrap().len(), 1, "{}", b.name);
        let failed = b.store.deliveries(project, Some(DeliveryStatus::Failed), None, 10).await;
        let failed = failed.unwrap();
        assert_eq!((failed.len(), failed[0].attempts), (1, 1), "{}", b.name);
        let again = b.store.retry_delivery(project, &failed[0].id, NOW + 8000).await.unwrap();
        assert_eq!(again.unwrap().status, DeliveryStatus::Pending, "{}", b.name);
        b.assert_ledger_identity().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_postgres_two_servers_claim_disjoint_due_events_and_an_unrecorded_one_comes_back() {
    let Some(server) = postgres::server("on_postgres_two_servers_claim_disjoint") else {
        return;
    };
    let db = FreshDatabase::create(&server).await;
    let url = db.url.clone();
    let b = Backend {
        name: "postgres",
        store: Arc::new(PostgresStore::open(&url).await.unwrap()),
        rows: Rows::Postgres { db },
    };
    let other: Arc<dyn Store> = Arc::new(PostgresStore::open(&url).await.unwrap());
    let mut projects = Vec::new();
    for name in ["acme", "bolt", "cask"] {
        projects.push(outbox_with_sessions(&b, name, 6).await);
    }
    let all = pending_events(&url).await;
    assert_eq!(all.len(), 18);

    // A project's events being attempted take up its room.
    let claim_at = NOW + 5000;
    let acme = b.store.deliveries(projects[0], None, None, 10).await.unwrap();
    let first = b.store.due_events(claim_at, vec![acme[0].seq], 2, 256).await.unwrap();
    let of = |project| first.iter().filter(|event| event.project == project).count();
    let counts: Vec<usize> = projects.iter().map(|project| of(*project)).collect();
    assert_eq!(counts, vec![1, 2, 2]);
    assert!(first.iter().all(|event| event.seq != acme[0].seq));
    let mut handed: Vec<(String, i64)> =
        first.iter().map(|event| (event.id.clone(), event.seq)).collect();

    // Both claim at once, two of each project at a time, until nothing is
    // due: every event is handed out, and to one of them only.
    for round in 0.. {
        assert!(round < 10, "events are still due after {round} rounds");
        let (one, two) = tokio::join!(
            b.store.due_events(claim_at, vec![], 2, 256),
            other.due_events(claim_at, vec![], 2, 256)
        );
        let (one, two) = (one.unwrap(), two.unwrap());
        if one.is_empty() && two.is_empty() {
            break;
        }
        handed.extend(one.iter().chain(&two).map(|event| (event.id.clone(), event.seq)));
    }
    let mut ids: Vec<String> = handed.iter().map(|(id, _)| id.clone()).collect();
    ids.sort();
    assert_eq!(ids, all, "each due event is handed out exactly once");

    // A claimed event is not made due by a retry, and nothing is due until
    // the lease runs out without an outcome.
    let (project, (id, seq)) = (projects[0], handed[0].clone());
    let retried = b.store.retry_delivery(project, &id, claim_at + 1000).await.unwrap();
    assert_eq!(retried.unwrap().next_attempt_at, Some(claim_at + LEASE_MILLIS));
    assert!(
        other.due_events(claim_at + LEASE_MILLIS - 1, vec![], 10, 256).await.unwrap().is_empty()
    );

    // Then every one is due again, under its same id, to either server.
    let again = other.due_events(claim_at + LEASE_MILLIS, vec![], 10, 256).await.unwrap();
    let mut again_ids: Vec<String> = again.iter().map(|event| event.id.clone()).collect();
    again_ids.sort();
    assert_eq!(again_ids, all);
    assert!(again.iter().all(|event| event.attempts == 0));

    // An outcome recorded by the server that claimed it first still counts.
    b.store.record_attempt(seq, AttemptOutcome::Delivered, claim_at + 2000).await.unwrap();
    let delivered = b.store.deliveries(project, Some(DeliveryStatus::Delivered), None, 10).await;
    let delivered = delivered.unwrap();
    assert_eq!((delivered.len(), &delivered[0].id, delivered[0].attempts), (1, &id, 1));
}

/// [`DELIVERY_LEASE`] as the store's times count.
const LEASE_MILLIS: i64 = DELIVERY_LEASE.as_millis() as i64;

/// A project whose webhook takes every event, with `sessions` sessions
/// opened: one event each in the outbox.
async fn outbox_with_sessions(b: &Backend, name: &str, sessions: usize) -> ProjectId {
    let project = b.project(name).await;
    let change = WebhookChange {
        project,
        url: "http://127.0.0.1:9/hook".into(),
        events: None,
        thresholds: vec![],
        secret: "whsec_test".into(),
        now: NOW,
    };
    b.store.set_webhook(change).await.unwrap();
    let (_, token) = b.mint(project, "ada", &[seconds(60)]).await;
    for n in 0..sessions {
        b.admitted(token, &format!("{name}-{n}")).await;
    }
    project
}

/// The public ids of the outbox's pending events, sorted.
async fn pending_events(url: &str) -> Vec<String> {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(connection);
    let sql = "SELECT public_id FROM webhook_events WHERE status = 'pending'";
    let rows = client.query(sql, &[]).await.unwrap();
    let mut ids: Vec<String> = rows.iter().map(|row| row.get(0)).collect();
    ids.sort();
    ids
}

#[tokio::test]
async fn on_postgres_a_dropped_connection_is_replaced_and_a_refusing_database_is_unavailable() {
    let Some(server) = postgres::server("on_postgres_a_dropped_connection") else {
        return;
    };
    let db = FreshDatabase::create(&server).await;
    let store = PostgresStore::open(&db.url).await.unwrap();
    store.ping().await.unwrap();

    let (admin, connection) =
        tokio_postgres::connect(&server, tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(connection);
    let terminate = "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1";
    let name = db.url.rsplit('/').next().unwrap().to_owned();
    admin.execute(terminate, &[&name]).await.unwrap();

    // A call that finds its connection gone fails as unavailable; once the
    // pool has seen the close, it makes a new connection.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        match store.ping().await {
            Ok(()) => break,
            Err(StoreError::Unavailable(_)) => assert!(std::time::Instant::now() < deadline),
            Err(other) => panic!("{other:?}"),
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }

    let refuse = format!("ALTER DATABASE {name} ALLOW_CONNECTIONS false");
    admin.batch_execute(&refuse).await.unwrap();
    admin.execute(terminate, &[&name]).await.unwrap();
    for _ in 0..2 {
        let refused = store.has_projects().await;
        assert!(matches!(refused, Err(StoreError::Unavailable(_))), "{refused:?}");
    }
}

/// The tick of the runs the PostgreSQL cases below join as: short, so that
/// a run falls silent soon.
const RUN_TICK: std::time::Duration = std::time::Duration::from_millis(50);

/// Two runs on one fresh PostgreSQL database, the first as a backend to
/// test; `None` after saying why the case is skipped.
async fn two_runs(case: &str) -> Option<(Backend, PostgresStore)> {
    let server = postgres::server(case)?;
    let db = FreshDatabase::create(&server).await;
    let store_a = PostgresStore::open(&db.url).await.unwrap().join(RUN_TICK).await.unwrap();
    let store_b = PostgresStore::open(&db.url).await.unwrap().join(RUN_TICK).await.unwrap();
    let b = Backend { name: "postgres", store: Arc::new(store_a), rows: Rows::Postgres { db } };
    Some((b, store_b))
}

#[tokio::test]
async fn on_postgres_a_run_closed_out_as_silent_records_nothing_more() {
    let Some((b, store_b)) = two_runs("on_postgres_a_run_closed_out_as_silent").await else {
        return;
    };
    let project = b.project("acme").await;
    let (human, token) = b.mint(project, "ada", &[seconds(60)]).await;
    let session = b.admitted(token, "s1").await;
    let charge = |amount| Charge { session, human, limit_type: CONVERSATIONAL, amount };
    let batch = |charges, ends| UsageBatch {
        id: Some(BatchId::random()),
        charges,
        ends,
        ..UsageBatch::default()
    };
    b.store.record_usage(batch(vec![charge(1_000)], vec![]), NOW + 1_000).await.unwrap();
    // A tick of the meter's clock alone: the session was not due.
    b.store.record_usage(batch(vec![], vec![]), NOW + 31_000).await.unwrap();

    // A falls silent; B, up all along, closes it out once three of its
    // ticks have passed, charging its session up to A's clock.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        store_b.record_usage(UsageBatch::default(), NOW).await.unwrap();
        if store_b.close_out_lost().await.unwrap() == (1, 0) {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "A was never closed out");
        tokio::time::sleep(RUN_TICK / 2).await;
    }

    // A's next batch, charging the same half minute, changes nothing; nor
    // may A admit another session.
    let end = SessionEnd { session, reason: EndReason::Internal };
    let late = b.store.record_usage(batch(vec![charge(30_000)], vec![end]), NOW + 31_000).await;
    assert!(matches!(late, Err(StoreError::Superseded)), "{late:?}");
    assert_eq!(b.store.limits(human).await.unwrap(), vec![seconds(29)]);
    let filter = SessionFilter { project, human: None, state: None };
    let listed = b.store.sessions(filter, Page { after: None, limit: 10 }).await.unwrap();
    let row = &listed.unwrap().rows[0];
    assert_eq!((row.charged, row.end_reason.as_deref()), (31_000, Some("instance_lost")));
    let again = b.store.open_session(new_session(token, "s2")).await;
    assert!(matches!(again, Err(StoreError::Superseded)), "{again:?}");
    b.assert_ledger_identity().await;
}

#[tokio::test]
async fn on_postgres_a_run_closed_out_leaves_its_own_sessions_to_the_others() {
    let Some((b, store_b)) = two_runs("on_postgres_a_run_closed_out_leaves_its_own").await else {
        return;
    };
    let project = b.project("acme").await;
    let (_, token) = b.mint(project, "ada", &[seconds(60)]).await;
    let session = b.admitted(token, "s1").await;
    b.store.record_usage(UsageBatch::default(), NOW + 1_000).await.unwrap();
    // B has marked A lost and not yet ended A's sessions, when A, unaware,
    // looks for runs to close out itself.
    let Rows::Postgres { db } = &b.rows else { unreachable!("two_runs is PostgreSQL") };
    let (admin, connection) =
        tokio_postgres::connect(&db.url, tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(connection);
    let sql = "UPDATE instances SET lost = TRUE,
                   ended_at = (EXTRACT(EPOCH FROM clock_timestamp()) * 1000)::BIGINT
               WHERE id = (SELECT instance_id FROM sessions WHERE id = $1)";
    assert_eq!(admin.execute(sql, &[&session.0]).await.unwrap(), 1);

    assert_eq!(b.store.close_out_lost().await.unwrap(), (0, 0), "A wrote after it was lost");
    store_b.record_usage(UsageBatch::default(), NOW).await.unwrap();
    assert_eq!(store_b.close_out_lost().await.unwrap(), (1, 0));
    b.assert_ledger_identity().await;
}

#[tokio::test]
async fn on_postgres_a_silent_runs_many_sessions_are_closed_out_a_chunk_at_a_time() {
    let Some((b, store_b)) = two_runs("on_postgres_a_silent_runs_many_sessions").await else {
        return;
    };
    let project = b.project("acme").await;
    for human in 0..25 {
        let (human, token) = b.mint(project, &format!("h{human}"), &[seconds(60)]).await;
        for session in 0..10 {
            b.admitted(token, &format!("s{}-{session}", human.0)).await;
        }
    }
    b.store.record_usage(UsageBatch::default(), NOW + 1_000).await.unwrap();

    // B, up while A is silent, ends A's 250 sessions in steps of at most
    // 100, each charged up to A's last clock.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let mut ended = Vec::new();
    while ended.iter().sum::<u64>() < 250 {
        assert!(std::time::Instant::now() < deadline, "closed out only {ended:?}");
        store_b.record_usage(UsageBatch::default(), NOW).await.unwrap();
        let (sessions, _) = store_b.close_out_lost().await.unwrap();
        if sessions == 0 {
            tokio::time::sleep(RUN_TICK / 2).await;
        }
        ended.push(sessions);
    }
    assert!(ended.iter().all(|step| *step <= 100), "{ended:?}");
    let filter = SessionFilter { project, human: None, state: None };
    let listed = b.store.sessions(filter, Page { after: None, limit: 500 }).await.unwrap();
    let rows = listed.unwrap().rows;
    assert_eq!(rows.len(), 250);
    for row in &rows {
        assert_eq!((row.end_reason.as_deref(), row.charged), (Some("instance_lost"), 1_000));
    }
    b.assert_ledger_identity().await;
}

#[tokio::test]
async fn on_postgres_no_run_is_closed_out_while_the_one_looking_is_not_up_itself() {
    let Some((b, store_b)) = two_runs("on_postgres_no_run_is_closed_out_while").await else {
        return;
    };
    let project = b.project("acme").await;
    let (_, token) = b.mint(project, "ada", &[seconds(60)]).await;
    b.admitted(token, "s1").await;

    // Both fall silent, as an outage of the database silences every run;
    // then B commits again, and finds A silent, but B was not up meanwhile.
    tokio::time::sleep(RUN_TICK * 8).await;
    store_b.record_usage(UsageBatch::default(), NOW).await.unwrap();
    assert_eq!(store_b.close_out_lost().await.unwrap(), (0, 0));
    // A comes back within three ticks of B's return, and is not closed out.
    b.store.record_usage(UsageBatch::default(), NOW).await.unwrap();
    for _ in 0..6 {
        tokio::time::sleep(RUN_TICK / 2).await;
        store_b.record_usage(UsageBatch::default(), NOW).await.unwrap();
        b.store.record_usage(UsageBatch::default(), NOW).await.unwrap();
        assert_eq!(store_b.close_out_lost().await.unwrap(), (0, 0));
    }
}

#[tokio::test]
async fn on_postgres_a_batch_reports_the_pools_sessions_on_other_runs() {
    let Some((b, store_b)) = two_runs("on_postgres_a_batch_reports_the_pools_sessions").await
    else {
        return;
    };
    let project = b.project("acme").await;
    let voice = Limit { limit_type: LimitType::VoiceSynthesisSeconds, value: 30_000 };
    let (human, token) = b.mint(project, "ada", &[seconds(60), voice]).await;
    let on_a = b.admitted(token, "s1").await;
    let Ok(Admission::Admitted { key: on_b, .. }) =
        store_b.open_session(new_session(token, "s2")).await
    else {
        panic!("B's session was refused");
    };
    // B charges its session 2 s, up to NOW + 2 s.
    let charge = Charge { session: on_b, human, limit_type: CONVERSATIONAL, amount: 2_000 };
    let batch = UsageBatch { charges: vec![charge], ..UsageBatch::default() };
    store_b.record_usage(batch, NOW + 2_000).await.unwrap();

    // A charges its own and hears of B's: one session, unrecorded since
    // NOW + 2 s; and a pool it only watches comes back too.
    let charge = Charge { session: on_a, human, limit_type: CONVERSATIONAL, amount: 1_000 };
    let voice = (human, LimitType::VoiceSynthesisSeconds);
    let batch = UsageBatch { charges: vec![charge], watch: vec![voice], ..UsageBatch::default() };
    let recorded = b.store.record_usage(batch, NOW + 5_000).await.unwrap();
    let pool = recorded.pools.iter().find(|p| p.limit_type == CONVERSATIONAL).unwrap();
    assert_eq!(pool.remaining, Some(57_000));
    assert_eq!(pool.foreign, Foreign { sessions: 1, unrecorded: 3_000 });
    let watched = recorded.pools.iter().find(|p| p.limit_type == voice.1).unwrap();
    assert_eq!((watched.remaining, watched.foreign), (Some(30_000), Foreign::default()));

    // A batch of A's made before B's last one, committed after it: B's
    // session was recorded a second past A's moment, and that second,
    // already in the balance, counts back.
    let charge = Charge { amount: 0, ..charge };
    let batch = UsageBatch { charges: vec![charge], ..UsageBatch::default() };
    let recorded = b.store.record_usage(batch, NOW + 1_000).await.unwrap();
    assert_eq!(recorded.pools[0].foreign, Foreign { sessions: 1, unrecorded: -1_000 });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_postgres_an_admission_waiting_on_a_revocation_sees_the_token_revoked() {
    let Some(server) = postgres::server("on_postgres_an_admission_waiting_on_a_revocation") else {
        return;
    };
    let db = FreshDatabase::create(&server).await;
    let store = Arc::new(PostgresStore::open(&db.url).await.unwrap());
    let b = Backend { name: "postgres", store: store.clone(), rows: Rows::Postgres { db } };
    let project = b.project("acme").await;
    let (human, token) = b.mint(project, "ada", &[seconds(10)]).await;

    // A revocation on a connection of its own, its statements those of
    // `revoke`, held open while a session of the human is admitted.
    let Rows::Postgres { db } = &b.rows else { unreachable!() };
    let (mut admin, connection) =
        tokio_postgres::connect(&db.url, tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(connection);
    let revoking = admin.transaction().await.unwrap();
    let sql = "UPDATE usage_tokens SET revoked_at = $2 WHERE human_id = $1";
    revoking.execute(sql, &[&human.0, &NOW]).await.unwrap();
    let sql = "UPDATE humans SET revocation_epoch = revocation_epoch + 1 WHERE id = $1";
    revoking.execute(sql, &[&human.0]).await.unwrap();

    let session = new_session(token, "s1");
    let admitting = tokio::spawn(async move { store.open_session(session).await });
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert!(!admitting.is_finished(), "the admission did not wait for the human's row");
    revoking.commit().await.unwrap();

    let admission = admitting.await.unwrap().unwrap();
    assert_eq!(admission, Admission::TokenRevoked);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_postgres_the_meter_commits_while_every_handler_connection_is_busy() {
    let Some(server) = postgres::server("on_postgres_the_meter_commits_while") else {
        return;
    };
    let db = FreshDatabase::create(&server).await;
    let store = Arc::new(PostgresStore::open(&db.url).await.unwrap());
    let b = Backend { name: "postgres", store: store.clone(), rows: Rows::Postgres { db } };
    let project = b.project("acme").await;
    let (ada, ada_token) = b.mint(project, "ada", &[seconds(10)]).await;
    let (bob, bob_token) = b.mint(project, "bob", &[seconds(10)]).await;
    let session = b.admitted(bob_token, "s1").await;

    // Admissions of ada wait on her row, locked here, each holding one of
    // the handlers' connections, more of them than there are.
    let Rows::Postgres { db } = &b.rows else { unreachable!() };
    let (mut admin, connection) =
        tokio_postgres::connect(&db.url, tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(connection);
    let holding = admin.transaction().await.unwrap();
    let sql = "SELECT 1 FROM humans WHERE id = $1 FOR UPDATE";
    holding.execute(sql, &[&ada.0]).await.unwrap();
    let waiting: Vec<_> = (0..24)
        .map(|i| {
            let store = store.clone();
            let session = new_session(ada_token, &format!("a{i}"));
            tokio::spawn(async move { store.open_session(session).await })
        })
        .collect();
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    assert!(store.ping().await.is_err(), "the handlers' connections were not all busy");

    let charge = Charge { session, human: bob, limit_type: CONVERSATIONAL, amount: 1000 };
    let batch = UsageBatch { id: None, charges: vec![charge], ..UsageBatch::default() };
    // Under the two seconds a caller waits for one of the handlers'.
    let limit = std::time::Duration::from_millis(1900);
    let recorded = tokio::time::timeout(limit, store.record_usage(batch, NOW + 1000)).await;
    let recorded = recorded.expect("the meter waited for a handler's connection").unwrap();
    assert_eq!(recorded.pools[0].remaining, Some(9_000));

    holding.rollback().await.unwrap();
    for task in waiting {
        let _ = task.await.unwrap();
    }
}

#[tokio::test]
async fn on_postgres_the_ping_fails_while_the_database_takes_no_writes() {
    let Some(server) = postgres::server("on_postgres_the_ping_fails_while") else {
        return;
    };
    let db = FreshDatabase::create(&server).await;
    PostgresStore::open(&db.url).await.unwrap().ping().await.unwrap();

    let (client, connection) =
        tokio_postgres::connect(&db.url, tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(connection);
    let read_only = "DO $$ BEGIN EXECUTE format(
        'ALTER DATABASE %I SET default_transaction_read_only = on', current_database()); END $$";
    client.batch_execute(read_only).await.unwrap();

    // The setting holds for connections made from now on.
    let store = PostgresStore::open(&db.url).await.unwrap();
    let ping = store.ping().await;
    assert!(matches!(&ping, Err(StoreError::Unavailable(text)) if text.contains("read-only")));
}

#[tokio::test]
async fn on_postgres_the_urls_own_options_reach_the_server() {
    let Some(server) = postgres::server("on_postgres_the_urls_own_options") else {
        return;
    };
    let db = FreshDatabase::create(&server).await;
    let (client, connection) =
        tokio_postgres::connect(&db.url, tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(connection);
    client.batch_execute("CREATE SCHEMA metering").await.unwrap();

    let separator = if db.url.contains('?') { '&' } else { '?' };
    let url = format!("{}{separator}options=-c%20search_path%3Dmetering", db.url);
    PostgresStore::open(&url).await.unwrap().ping().await.unwrap();
    let sql = "SELECT to_regclass('metering.ledger')::TEXT";
    let ledger: Option<String> = client.query_one(sql, &[]).await.unwrap().get(0);
    assert!(ledger.is_some(), "the schema was not applied where search_path says");
}

/// `db`'s URL with its host `host` and `query` added.
fn url_with(db: &FreshDatabase, host: &str, query: &str) -> String {
    let url = db.url.replacen("127.0.0.1", host, 1);
    let separator = if url.contains('?') { '&' } else { '?' };
    format!("{url}{separator}{query}")
}

/// Opens a store on a fresh database with `query` added to its URL and
/// says, for each of its connections, whether it uses TLS.
async fn tls_of_connections(server: &str, host: &str, query: &str) -> anyhow::Result<Vec<bool>> {
    let db = FreshDatabase::create(server).await;
    let store = PostgresStore::open(&url_with(&db, host, query)).await?;
    store.ping().await?;
    let (admin, connection) =
        tokio_postgres::connect(&db.url, tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(connection);
    let sql = "SELECT s.ssl FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid)
               WHERE a.application_name = 'tollgate' AND a.datname = current_database()";
    let rows = admin.query(sql, &[]).await.unwrap();
    Ok(rows.iter().map(|row| row.get(0)).collect())
}

/// A PEM file holding a CA of its own, which signed nothing the test
/// server shows.
fn other_ca_file() -> tempfile::NamedTempFile {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = params.self_signed(&key).unwrap();
    let mut file = tempfile::NamedTempFile::new().unwrap();
    std::io::Write::write_all(&mut file, ca.pem().as_bytes()).unwrap();
    file
}

#[tokio::test]
async fn on_postgres_each_sslmode_connects_as_libpq_would() {
    let Some(server) = postgres::server("on_postgres_each_sslmode") else {
        return;
    };
    let Some(ca) = postgres::ca_file() else {
        postgres::say("skipped on_postgres_each_sslmode: the server has no CA of the tests'");
        return;
    };
    let ca = format!("sslrootcert={ca}");
    let verify_ca = format!("sslmode=verify-ca&{ca}");
    let verify_full = format!("sslmode=verify-full&{ca}");
    let (prefer_ca, require_ca) = (format!("sslmode=prefer&{ca}"), format!("sslmode=require&{ca}"));
    let cases = [
        ("127.0.0.1", "sslmode=disable", false),
        ("127.0.0.1", "sslmode=prefer", true),
        ("127.0.0.1", "sslmode=require", true),
        ("127.0.0.1", prefer_ca.as_str(), true),
        ("127.0.0.1", require_ca.as_str(), true),
        ("127.0.0.1", verify_ca.as_str(), true),
        ("localhost", verify_full.as_str(), true),
    ];
    for (host, query, tls) in cases {
        let used = tls_of_connections(&server, host, query).await.unwrap();
        assert!(!used.is_empty() && used.iter().all(|used| *used == tls), "{query}: {used:?}");
    }

    // The certificate names localhost, not 127.0.0.1; another CA, named
    // under prefer or require, is checked as libpq checks it; the system's
    // roots never signed it, and with them only verify-full is taken; the
    // verifying modes want the CA named; and a CA file that is not there
    // is said to be.
    let other_ca = other_ca_file();
    let other_ca = other_ca.path().display();
    let refused = [
        ("127.0.0.1", verify_full.clone(), "certificate"),
        ("127.0.0.1", format!("sslmode=require&sslrootcert={other_ca}"), "certificate"),
        ("127.0.0.1", format!("sslmode=prefer&sslrootcert={other_ca}"), "certificate"),
        ("localhost", "sslrootcert=system".into(), "certificate"),
        ("localhost", "sslmode=require&sslrootcert=system".into(), "sslrootcert=system"),
        ("localhost", "sslmode=verify-ca&sslrootcert=system".into(), "sslrootcert=system"),
        ("localhost", "sslmode=verify-ca".into(), "sslrootcert=/path/to/ca.pem"),
        ("localhost", "sslmode=verify-full".into(), "sslrootcert=/path/to/ca.pem"),
        ("localhost", "sslmode=verify-full&sslrootcert=/nowhere.pem".into(), "/nowhere.pem"),
    ];
    for (host, query, said) in refused {
        let error = tls_of_connections(&server, host, &query).await.unwrap_err();
        assert!(format!("{error:#}").contains(said), "{query}: {error:#}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_postgres_a_batch_sent_again_while_its_first_attempt_commits_is_applied_once() {
    let Some(server) = postgres::server("on_postgres_a_batch_sent_again_while") else {
        return;
    };
    let db = FreshDatabase::create(&server).await;
    let store = PostgresStore::open(&db.url).await.unwrap().join(RUN_TICK).await.unwrap();
    let store = Arc::new(store);
    let b = Backend { name: "postgres", store: store.clone(), rows: Rows::Postgres { db } };
    let project = b.project("acme").await;
    let (human, token) = b.mint(project, "ada", &[seconds(10)]).await;
    let session = b.admitted(token, "s1").await;

    // The first attempt, on a connection this side gave up on, is about to
    // commit: it has recorded the batch's id, and holds its run's row.
    let id = BatchId::random();
    let Rows::Postgres { db } = &b.rows else { unreachable!() };
    let (mut first, connection) =
        tokio_postgres::connect(&db.url, tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(connection);
    let attempt = first.transaction().await.unwrap();
    let sql = "UPDATE instances SET last_batch = $1";
    attempt.execute(sql, &[&id.0]).await.unwrap();
    let sql = "UPDATE limits SET balance = balance - 3000 WHERE human_id = $1";
    attempt.execute(sql, &[&human.0]).await.unwrap();
    let sql = "INSERT INTO ledger (human_id, limit_type, entry, amount, session_id, created_at,
                                   updated_at)
               VALUES ($1, 'conversational_seconds', 'debit', -3000, $2, 0, 0)";
    attempt.execute(sql, &[&human.0, &session.0]).await.unwrap();

    let charge = Charge { session, human, limit_type: CONVERSATIONAL, amount: 3_000 };
    let batch = UsageBatch { id: Some(id), charges: vec![charge], ..UsageBatch::default() };
    let again = tokio::spawn(async move { store.record_usage(batch, NOW + 1000).await });
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    attempt.commit().await.unwrap();

    let recorded = again.await.unwrap().unwrap();
    assert_eq!(recorded.pools[0].remaining, Some(7_000));
    assert_eq!(b.store.limits(human).await.unwrap(), vec![seconds(7)]);
    b.assert_ledger_identity().await;
}

#[tokio::test]
async fn on_postgres_a_database_of_version_4_is_upgraded_and_its_old_server_fenced_out() {
    let Some(server) = postgres::server("on_postgres_a_database_of_version_4") else {
        return;
    };
    let db = FreshDatabase::create(&server).await;
    let (client, connection) =
        tokio_postgres::connect(&db.url, tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(connection);
    // A database an older server uses: its lock's id in meter_clock, its
    // meter's clock at NOW + 5 s, and a session of a human with 60 s open
    // since NOW, last recorded at NOW + 1 s.
    client.batch_execute(include_str!("fixtures/schema.postgres.v4.sql")).await.unwrap();
    client
        .batch_execute(&format!(
            "INSERT INTO schema_version VALUES (4, 0);
             UPDATE meter_clock SET owner = 42, alive_at = {at};
             INSERT INTO projects (name, created_at) VALUES ('acme', 0);
             INSERT INTO humans (project_id, external_id, created_at) VALUES (1, 'ada', 0);
             INSERT INTO limits (human_id, limit_type, balance, limited, updated_at)
                 VALUES (1, 'conversational_seconds', 59000, TRUE, 0);
             INSERT INTO sessions (public_id, human_id, kind, started_at)
                 VALUES ('s1', 1, 'conversational', {NOW});
             INSERT INTO ledger (human_id, limit_type, entry, amount, created_at, updated_at)
                 VALUES (1, 'conversational_seconds', 'grant', 60000, 0, 0);
             INSERT INTO ledger (human_id, limit_type, entry, amount, session_id, created_at,
                                 updated_at)
                 VALUES (1, 'conversational_seconds', 'debit', -1000, 1, {NOW}, {late})",
            at = NOW + 5_000,
            late = NOW + 1_000,
        ))
        .await
        .unwrap();

    let store = PostgresStore::open(&db.url).await.unwrap().join(RUN_TICK).await.unwrap();
    let version = "SELECT MAX(version) FROM schema_version";
    let version: i64 = client.query_one(version, &[]).await.unwrap().get(0);
    assert_eq!(version, tollgate::store::postgres::POSTGRES_SCHEMA_VERSION);
    // The older server's next commit finds its id gone, and stops.
    let owner = "SELECT owner FROM meter_clock";
    assert_eq!(client.query_one(owner, &[]).await.unwrap().get::<_, Option<i64>>(0), None);
    // Its session is closed, charged up to its meter's clock.
    assert_eq!(store.close_abandoned_sessions().await.unwrap(), 1);
    let sql = "SELECT end_reason, charged FROM sessions";
    let row = client.query_one(sql, &[]).await.unwrap();
    assert_eq!((row.get::<_, String>(0), row.get::<_, i64>(1)), ("server_restart".into(), 5_000));
    let balance = "SELECT balance FROM limits";
    assert_eq!(client.query_one(balance, &[]).await.unwrap().get::<_, i64>(0), 55_000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_postgres_two_servers_starting_at_once_apply_the_schema_once() {
    let Some(server) = postgres::server("on_postgres_two_servers_starting_at_once") else {
        return;
    };
    let db = FreshDatabase::create(&server).await;
    let (first, second) = tokio::join!(PostgresStore::open(&db.url), PostgresStore::open(&db.url));
    first.unwrap();
    second.unwrap();

    let (client, connection) =
        tokio_postgres::connect(&db.url, tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(connection);
    let versions = client.query("SELECT version FROM schema_version", &[]).await.unwrap();
    let versions: Vec<i64> = versions.iter().map(|row| row.get(0)).collect();
    assert_eq!(versions, vec![tollgate::store::postgres::POSTGRES_SCHEMA_VERSION]);

    let newer = tollgate::store::postgres::POSTGRES_SCHEMA_VERSION + 1;
    let sql = "INSERT INTO schema_version (version, applied_at) VALUES ($1, 0)";
    client.execute(sql, &[&newer]).await.unwrap();
    let refused = PostgresStore::open(&db.url).await.err().expect("a newer schema is refused");
    assert!(refused.to_string().contains(&format!("schema version {newer}")), "{refused}");
}

#[tokio::test]
async fn keys_tokens_webhooks_and_listings_read_back_what_was_written() {
    for b in backends("keys_tokens_webhooks_and_listings").await {
        assert!(!b.store.has_projects().await.unwrap(), "{}", b.name);
        let key = Secret::generate(SecretKind::ApiKey);
        b.store.add_api_key("acme", key.hash()).await.unwrap();
        let project = b.store.find_api_key(key.hash()).await.unwrap().unwrap().project;
        assert!(b.store.revoke_api_key(key.hash()).await.unwrap());
        assert!(!b.store.revoke_api_key(key.hash()).await.unwrap(), "{}", b.name);
        assert!(b.store.find_api_key(key.hash()).await.unwrap().unwrap().revoked);

        let (human, token) = b.mint(project, "ada", &[seconds(10)]).await;
        assert_eq!(b.store.find_human(project, "ada").await.unwrap().unwrap().id, human);
        assert_eq!(b.store.find_human(project, "nobody").await.unwrap(), None);
        assert_eq!(b.store.newest_live_token(project, "ada", NOW).await.unwrap(), Some(NOW + HOUR));
        let moved = b.store.set_token_expiry(project, "ada", NOW, NOW + 2 * HOUR).await.unwrap();
        assert_eq!(moved, 1, "{}", b.name);
        assert_eq!(
            b.store.newest_live_token(project, "ada", NOW).await.unwrap(),
            Some(NOW + 2 * HOUR)
        );

        for id in ["s1", "s2", "s3"] {
            let session = b.admitted(token, id).await;
            b.charge(human, session, 1_000).await;
        }
        let filter = || SessionFilter { project, human: Some("ada".into()), state: None };
        let first = b.store.sessions(filter(), Page { after: None, limit: 2 }).await.unwrap();
        let first = first.unwrap();
        let ids: Vec<&str> = first.rows.iter().map(|row| row.public_id.as_str()).collect();
        assert_eq!((ids, first.has_more), (vec!["s1", "s2"], true), "{}", b.name);
        let rest = b.store.sessions(filter(), Page { after: Some("s2".into()), limit: 2 }).await;
        let rest = rest.unwrap().unwrap();
        assert_eq!((rest.rows.len(), rest.has_more, rest.rows[0].charged), (1, false, 1_000));
        let unknown = b.store.sessions(filter(), Page { after: Some("s9".into()), limit: 2 });
        assert!(unknown.await.unwrap().is_none(), "{}", b.name);

        let debits = LedgerFilter { project, human: None, limit_type: Some(CONVERSATIONAL) };
        let page = b.store.ledger(debits, Page { after: None, limit: 3 }).await.unwrap();
        let sessions: Vec<Option<&str>> = page.rows.iter().map(|r| r.session.as_deref()).collect();
        assert_eq!(sessions, vec![None, Some("s1"), Some("s2")], "{}", b.name);
        assert!(page.has_more);

        let change = WebhookChange {
            project,
            url: "http://127.0.0.1:9/hook".into(),
            events: Some(vec!["usage.limit_low".into()]),
            thresholds: vec![seconds(5)],
            secret: "whsec_one".into(),
            now: NOW,
        };
        b.store.set_webhook(change.clone()).await.unwrap();
        let changed = WebhookChange { url: "http://127.0.0.1:9/other".into(), ..change };
        let (webhook, created) = b.store.set_webhook(changed).await.unwrap();
        assert!(!created, "{}", b.name);
        assert_eq!(b.store.webhook(project).await.unwrap(), Some(webhook.clone()));
        assert_eq!(webhook.thresholds, vec![seconds(5)]);
        let rotated = b.store.rotate_webhook_secret(project, "whsec_two".into(), NOW + HOUR, NOW);
        assert!(rotated.await.unwrap(), "{}", b.name);
        assert!(b.store.delete_webhook(project).await.unwrap());
        assert_eq!(b.store.webhook(project).await.unwrap(), None, "{}", b.name);
        b.assert_ledger_identity().await;
    }
}

#[tokio::test]
async fn one_batch_charges_many_pools_each_cut_at_its_own_zero() {
    for b in backends("one_batch_charges_many_pools").await {
        let project = b.project("acme").await;
        let mut charges = Vec::new();
        let mut humans = Vec::new();
        for n in 0..20 {
            let (human, token) = b.mint(project, &format!("h{n}"), &[seconds(n + 1)]).await;
            for id in ["a", "b"] {
                let session = b.admitted(token, &format!("s{n}{id}")).await;
                charges.push(Charge { session, human, limit_type: CONVERSATIONAL, amount: 4_000 });
            }
            humans.push(human);
        }
        charges.reverse();
        let batch = UsageBatch { id: None, charges, ..UsageBatch::default() };
        let recorded = b.store.record_usage(batch, NOW + 1000).await.unwrap();
        assert_eq!(recorded.pools.len(), 20, "{}", b.name);
        for (n, human) in humans.into_iter().enumerate() {
            let pool = recorded.pools.iter().find(|pool| pool.human == human).unwrap();
            let left = ((n as i64 + 1) * 1000 - 8_000).max(0);
            assert_eq!(pool.remaining, Some(left), "{}: pool of h{n}", b.name);
        }
        b.assert_ledger_identity().await;
    }
}

/// A store that loses the answer to one commit of the meter's that charges
/// something, on a word: the batch is applied, and the meter is told it
/// failed, as when the connection breaks once COMMIT was sent.
mod lossy {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    use async_trait::async_trait;
    use tollgate::limits::{ChangeMode, Limit};
    use tollgate::secret::SecretHash;
    use tollgate::store::*;

    pub struct LosesAnAnswer {
        pub inner: Arc<dyn Store>,
        pub lose_next: AtomicBool,
    }

    #[async_trait]
    impl Store for LosesAnAnswer {
        fn is_shared(&self) -> bool {
            self.inner.is_shared()
        }

        async fn close_out_lost(&self) -> StoreResult<(u64, u64)> {
            self.inner.close_out_lost().await
        }

        async fn leave(&self) -> StoreResult<()> {
            self.inner.leave().await
        }

        async fn record_usage(
            &self,
            batch: UsageBatch,
            now: UnixMillis,
        ) -> StoreResult<UsageRecorded> {
            let charges = !batch.charges.is_empty();
            let recorded = self.inner.record_usage(batch, now).await?;
            if charges && self.lose_next.swap(false, Ordering::SeqCst) {
                return Err(StoreError::Unavailable("the answer to COMMIT was lost".into()));
            }
            Ok(recorded)
        }

        async fn ping(&self) -> StoreResult<()> {
            self.inner.ping().await
        }

        async fn add_api_key(&self, project: &str, key: SecretHash) -> StoreResult<()> {
            self.inner.add_api_key(project, key).await
        }

        async fn revoke_api_key(&self, key: SecretHash) -> StoreResult<bool> {
            self.inner.revoke_api_key(key).await
        }

        async fn has_projects(&self) -> StoreResult<bool> {
            self.inner.has_projects().await
        }

        async fn find_api_key(&self, key: SecretHash) -> StoreResult<Option<ApiKeyRecord>> {
            self.inner.find_api_key(key).await
        }

        async fn find_usage_token(
            &self,
            token: SecretHash,
        ) -> StoreResult<Option<UsageTokenRecord>> {
            self.inner.find_usage_token(token).await
        }

        async fn find_human(&self, project: ProjectId, name: &str) -> StoreResult<Option<Human>> {
            self.inner.find_human(project, name).await
        }

        async fn find_or_create_human(&self, project: ProjectId, name: &str) -> StoreResult<Human> {
            self.inner.find_or_create_human(project, name).await
        }

        async fn mint_token(&self, request: MintRequest) -> StoreResult<Vec<Limit>> {
            self.inner.mint_token(request).await
        }

        async fn limits(&self, human: HumanId) -> StoreResult<Vec<Limit>> {
            self.inner.limits(human).await
        }

        async fn change_limits(
            &self,
            project: ProjectId,
            human: &str,
            changes: Vec<Limit>,
            mode: ChangeMode,
            now: UnixMillis,
        ) -> StoreResult<Vec<Limit>> {
            self.inner.change_limits(project, human, changes, mode, now).await
        }

        async fn revoke(
            &self,
            project: ProjectId,
            human: &str,
            now: UnixMillis,
        ) -> StoreResult<Option<u64>> {
            self.inner.revoke(project, human, now).await
        }

        async fn newest_live_token(
            &self,
            project: ProjectId,
            human: &str,
            now: UnixMillis,
        ) -> StoreResult<Option<UnixMillis>> {
            self.inner.newest_live_token(project, human, now).await
        }

        async fn set_token_expiry(
            &self,
            project: ProjectId,
            human: &str,
            now: UnixMillis,
            expires_at: UnixMillis,
        ) -> StoreResult<u64> {
            self.inner.set_token_expiry(project, human, now, expires_at).await
        }

        async fn open_session(&self, session: NewSession) -> StoreResult<Admission> {
            self.inner.open_session(session).await
        }

        async fn close_abandoned_sessions(&self) -> StoreResult<u64> {
            self.inner.close_abandoned_sessions().await
        }

        async fn start_completion(
            &self,
            completion: NewCompletion,
        ) -> StoreResult<CompletionAdmission> {
            self.inner.start_completion(completion).await
        }

        async fn end_completion(&self, end: CompletionEnd) -> StoreResult<Option<i64>> {
            self.inner.end_completion(end).await
        }

        async fn close_abandoned_completions(&self, now: UnixMillis) -> StoreResult<u64> {
            self.inner.close_abandoned_completions(now).await
        }

        async fn report_usage(&self, report: NewReport) -> StoreResult<ReportOutcome> {
            self.inner.report_usage(report).await
        }

        async fn set_webhook(&self, change: WebhookChange) -> StoreResult<(Webhook, bool)> {
            self.inner.set_webhook(change).await
        }

        async fn webhook(&self, project: ProjectId) -> StoreResult<Option<Webhook>> {
            self.inner.webhook(project).await
        }

        async fn delete_webhook(&self, project: ProjectId) -> StoreResult<bool> {
            self.inner.delete_webhook(project).await
        }

        async fn rotate_webhook_secret(
            &self,
            project: ProjectId,
            secret: String,
            previous_until: UnixMillis,
            now: UnixMillis,
        ) -> StoreResult<bool> {
            self.inner.rotate_webhook_secret(project, secret, previous_until, now).await
        }

        async fn due_events(
            &self,
            now: UnixMillis,
            busy: Vec<i64>,
            per_project: u32,
            limit: u32,
        ) -> StoreResult<Vec<DueEvent>> {
            self.inner.due_events(now, busy, per_project, limit).await
        }

        async fn record_attempt(
            &self,
            seq: i64,
            outcome: AttemptOutcome,
            now: UnixMillis,
        ) -> StoreResult<()> {
            self.inner.record_attempt(seq, outcome, now).await
        }

        async fn deliveries(
            &self,
            project: ProjectId,
            status: Option<DeliveryStatus>,
            after: Option<i64>,
            limit: u32,
        ) -> StoreResult<Vec<Delivery>> {
            self.inner.deliveries(project, status, after, limit).await
        }

        async fn retry_delivery(
            &self,
            project: ProjectId,
            id: &str,
            now: UnixMillis,
        ) -> StoreResult<Option<Delivery>> {
            self.inner.retry_delivery(project, id, now).await
        }

        async fn ledger(
            &self,
            filter: LedgerFilter,
            page: Page<i64>,
        ) -> StoreResult<Listing<LedgerRow>> {
            self.inner.ledger(filter, page).await
        }

        async fn sessions(
            &self,
            filter: SessionFilter,
            page: Page<String>,
        ) -> StoreResult<Option<Listing<SessionRow>>> {
            self.inner.sessions(filter, page).await
        }
    }
}
