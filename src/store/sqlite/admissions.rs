//! Admissions committed together. Every upgrade writes its session before
//! the client gets its 101; one transaction per upgrade had the writer
//! thread write the same few pages (the sessions table, its indexes, the
//! outbox) to the log again for each. The writer takes every admission
//! waiting in their queue, up to [`MAX_BATCH`], and records them in one
//! transaction, each under a savepoint of its own, so that a refused one
//! leaves the others as they were. No answer is sent until the whole
//! transaction has committed: a session is never admitted on a row that
//! could still be rolled back. Under the soak's load (BENCHMARKS.md) about
//! a dozen admissions share each commit; the upgrade figure moved by a few
//! points only, so the writer's commits were not the most of an upgrade's
//! cost.
//!
//! A session opened with a usage token has the token looked up here, in
//! its admission's transaction, which spares every upgrade a trip to a
//! reader thread first. The price: a made-up token of the right shape and
//! checksum, which anyone can make, now costs the writer a lookup and a
//! savepoint before it is refused, where it cost a reader before. The
//! limit on failed authentications bounds how many one address sends, but
//! counts them only once the writer has answered, so more of them are in
//! flight past its check; with the limit off (behind a proxy, as API.md
//! advises) a flood of them slows real admissions down.

use rusqlite::Connection;
use tokio::sync::{mpsc, oneshot};

use super::outbox::Hooks;
use super::room::{self, Cap};
use super::usage;
use crate::store::{Admission, NewSession, StoreError, StoreResult};

/// How many admissions one transaction takes at most: enough that a burst
/// of upgrades shares a few commits, few enough that one transaction ends
/// in a few milliseconds and the meter's next commit never waits long
/// behind it.
pub const MAX_BATCH: usize = 128;

/// One upgrade waiting to be admitted, and where its answer goes.
pub struct Admit {
    pub session: NewSession,
    pub reply: oneshot::Sender<StoreResult<Admission>>,
}

/// `first` and whatever else is already waiting in `rx`, up to
/// [`MAX_BATCH`]; never waits for more to arrive.
pub fn gather(first: Admit, rx: &mut mpsc::Receiver<Admit>) -> Vec<Admit> {
    let mut batch = vec![first];
    while batch.len() < MAX_BATCH {
        match rx.try_recv() {
            Ok(next) => batch.push(next),
            Err(_) => break,
        }
    }
    batch
}

/// Records `batch` in one transaction and then answers each admission:
/// with its own outcome once the transaction has committed, or with the
/// error that kept the transaction from committing.
pub fn admit_all(conn: &mut Connection, hooks: &Hooks, cap: Option<Cap>, batch: Vec<Admit>) {
    let (sessions, replies): (Vec<_>, Vec<_>) =
        batch.into_iter().map(|admit| (admit.session, admit.reply)).unzip();
    metrics::histogram!(crate::metrics::ADMISSIONS_PER_COMMIT).record(sessions.len() as f64);
    match record(conn, hooks, cap, &sessions) {
        Ok(answers) => {
            for (reply, answer) in replies.into_iter().zip(answers) {
                let _ = reply.send(answer);
            }
        }
        Err(error) => {
            for reply in replies {
                let _ = reply.send(Err(error.clone()));
            }
        }
    }
}

/// The transaction: each session checked and, if admitted, written under
/// a savepoint of its own; later sessions of the batch see the earlier
/// ones, so a per-human cap holds within a batch as across batches. Each
/// is first checked for room below the cap, so that a batch cannot spend
/// the pages kept for the meter; those refused for it are answered
/// [`StoreError::Full`] and the others still committed.
fn record(
    conn: &mut Connection,
    hooks: &Hooks,
    cap: Option<Cap>,
    sessions: &[NewSession],
) -> StoreResult<Vec<StoreResult<Admission>>> {
    let mut tx = super::write_transaction(conn)?;
    let mut answers = Vec::with_capacity(sessions.len());
    for session in sessions {
        if let Err(full) = room::check(cap, &tx) {
            answers.push(Err(full));
            continue;
        }
        let savepoint = tx.savepoint()?;
        let answer = usage::admit(&savepoint, hooks, session);
        if matches!(answer, Ok(Admission::Admitted { .. })) {
            savepoint.commit()?;
        } else {
            // A refusal writes nothing, and an error leaves no
            // half-written session: rolled back as the savepoint drops.
            drop(savepoint);
        }
        // Some errors (SQLITE_FULL, an I/O error) make SQLite roll back
        // the whole transaction, not only the statement: then nothing of
        // the batch is recorded, and a savepoint begun now would start a
        // transaction of its own.
        if let Err(error) = &answer
            && tx.is_autocommit()
        {
            return Err(error.clone());
        }
        answers.push(answer);
    }
    tx.commit().map_err(StoreError::from)?;
    Ok(answers)
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::limits::{ChangeMode, Limit, LimitType, SessionKind};
    use crate::secret::{Secret, SecretKind};
    use crate::store::sqlite::SqliteStore;
    use crate::store::{Human, HumanId, ProjectId, SessionCaller, Store};

    const SECONDS: LimitType = LimitType::ConversationalSeconds;

    /// A store with one project, and a human of it given `millis`.
    async fn store_with_human(path: &Path, millis: i64) -> (SqliteStore, ProjectId, HumanId) {
        let (store, _threads) = SqliteStore::open(path).unwrap();
        let key = Secret::generate(SecretKind::ApiKey);
        store.add_api_key("p", key.hash()).await.unwrap();
        let project = store.find_api_key(key.hash()).await.unwrap().unwrap().project;
        let limit = Limit { limit_type: SECONDS, value: millis };
        store.change_limits(project, "rich", vec![limit], ChangeMode::Set, 0).await.unwrap();
        let human = store.find_human(project, "rich").await.unwrap().unwrap().id;
        (store, project, human)
    }

    /// A session of the human `id` opened with an API key. The admission
    /// reads only the id of the human it is given.
    fn session(id: HumanId, n: usize, cap: Option<u32>) -> NewSession {
        let human = Human { id, project: ProjectId(0), name: String::new(), revocation_epoch: 0 };
        NewSession {
            caller: SessionCaller::Human(human),
            kind: SessionKind::Conversational,
            public_id: format!("ses_{n}"),
            max_sessions_per_human: cap,
            now: 1,
        }
    }

    fn sessions_of(conn: &Connection, human: HumanId) -> Vec<String> {
        let mut stmt =
            conn.prepare("SELECT public_id FROM sessions WHERE human_id = ?1 ORDER BY id").unwrap();
        stmt.query_map([human.0], |row| row.get(0)).unwrap().map(Result::unwrap).collect()
    }

    /// Admits `sessions` as one batch on `conn` and returns their answers.
    fn admit_batch(
        conn: &mut Connection,
        cap: Option<Cap>,
        sessions: Vec<NewSession>,
    ) -> Vec<StoreResult<Admission>> {
        let hooks = Hooks::load(conn).unwrap();
        let (batch, answers): (Vec<_>, Vec<_>) = sessions
            .into_iter()
            .map(|session| {
                let (reply, answer) = oneshot::channel();
                (Admit { session, reply }, answer)
            })
            .unzip();
        admit_all(conn, &hooks, cap, batch);
        answers.into_iter().map(|mut answer| answer.try_recv().unwrap()).collect()
    }

    fn page_count(conn: &Connection) -> i64 {
        conn.pragma_query_value(None, "page_count", |row| row.get(0)).unwrap()
    }

    #[tokio::test]
    async fn one_transaction_answers_each_admission_with_its_own_outcome() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.db");
        let (store, project, rich) = store_with_human(&path, 60_000).await;
        let limit = Limit { limit_type: SECONDS, value: 0 };
        store.change_limits(project, "broke", vec![limit], ChangeMode::Set, 0).await.unwrap();
        let broke = store.find_human(project, "broke").await.unwrap().unwrap().id;
        drop(store);

        let mut conn = Connection::open(&path).unwrap();
        let humans = [rich, broke, rich, rich];
        let caps = [None, None, Some(2), Some(2)];
        let sessions = (0..4).map(|n| session(humans[n], n, caps[n])).collect();
        let answers = admit_batch(&mut conn, None, sessions);

        assert!(matches!(answers[0], Ok(Admission::Admitted { remaining: Some(60_000), .. })));
        assert!(matches!(answers[1], Ok(Admission::LimitExhausted)), "{:?}", answers[1]);
        // The cap of 2 counts the first session of the same transaction.
        assert!(matches!(answers[2], Ok(Admission::Admitted { .. })), "{:?}", answers[2]);
        assert!(matches!(answers[3], Ok(Admission::TooManySessions)), "{:?}", answers[3]);
        assert_eq!(sessions_of(&conn, rich), ["ses_0", "ses_2"]);
        assert!(sessions_of(&conn, broke).is_empty());
    }

    #[tokio::test]
    async fn a_database_full_mid_batch_leaves_exactly_the_admitted_sessions() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.db");
        let (store, _, rich) = store_with_human(&path, 60_000).await;
        drop(store);

        // No room for a single new page, and sessions whose ids fill pages
        // fast: SQLite fails the batch part-way with SQLITE_FULL.
        let mut conn = Connection::open(&path).unwrap();
        conn.pragma_update(None, "max_page_count", page_count(&conn)).unwrap();
        let sessions = (0..40)
            .map(|n| NewSession {
                public_id: format!("ses_{n}_{}", "x".repeat(1500)),
                ..session(rich, n, None)
            })
            .collect();
        let answers = admit_batch(&mut conn, None, sessions);

        let mut admitted = Vec::new();
        let mut full = 0;
        for (n, answer) in answers.into_iter().enumerate() {
            match answer {
                Ok(Admission::Admitted { .. }) => admitted.push(n),
                Err(StoreError::Full) => full += 1,
                other => panic!("unexpected answer {other:?}"),
            }
        }
        assert!(full > 0, "the database never filled");
        let rows: Vec<usize> = sessions_of(&conn, rich)
            .iter()
            .map(|id| id.split('_').nth(1).unwrap().parse().unwrap())
            .collect();
        assert_eq!(rows, admitted, "the rows are not the admitted sessions");
    }

    #[tokio::test]
    async fn a_database_near_its_cap_refuses_admissions_and_writes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.db");
        let (store, _, rich) = store_with_human(&path, 60_000).await;
        drop(store);

        let mut conn = Connection::open(&path).unwrap();
        // Room for these sessions, but less than the pages kept for the
        // meter: they are refused for it.
        let cap = Cap::apply(&conn, (page_count(&conn) as u64 + 10) * 4096).unwrap();
        let sessions = (0..3).map(|n| session(rich, n, None)).collect();

        for answer in admit_batch(&mut conn, Some(cap), sessions) {
            assert!(matches!(answer, Err(StoreError::Full)));
        }
        assert!(sessions_of(&conn, rich).is_empty());
    }

    #[tokio::test]
    async fn admissions_queued_behind_a_write_are_committed_together_and_capped() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.db");
        let (store, _, rich) = store_with_human(&path, 60_000).await;

        // Hold the writer in a job until every admission is queued behind it.
        let (started_tx, started_rx) = oneshot::channel();
        let (release_tx, release_rx) = std::sync::mpsc::channel::<()>();
        let writer = store.clone();
        let held = tokio::spawn(async move {
            let hold = move |_: &mut super::super::Writer| {
                let _ = started_tx.send(());
                let _ = release_rx.recv();
                Ok(())
            };
            writer.write(hold).await
        });
        started_rx.await.unwrap();
        let admits: Vec<_> = (0..6)
            .map(|n| {
                let store = store.clone();
                tokio::spawn(async move { store.open_session(session(rich, n, Some(2))).await })
            })
            .collect();
        let tx = &store.admissions_tx;
        while tx.max_capacity() - tx.capacity() < 6 {
            tokio::task::yield_now().await;
        }
        release_tx.send(()).unwrap();
        held.await.unwrap().unwrap();

        let mut admitted = 0;
        for admit in admits {
            match admit.await.unwrap().unwrap() {
                Admission::Admitted { .. } => admitted += 1,
                Admission::TooManySessions => {}
                other => panic!("unexpected answer {other:?}"),
            }
        }
        assert_eq!(admitted, 2);
        let conn = Connection::open(&path).unwrap();
        assert_eq!(sessions_of(&conn, rich).len(), 2);
    }

    #[test]
    fn gather_takes_what_waits_up_to_the_largest_batch_and_never_waits() {
        let (tx, mut rx) = mpsc::channel(MAX_BATCH * 2);
        let admit =
            |n| Admit { session: session(HumanId(1), n, None), reply: oneshot::channel().0 };
        for n in 0..MAX_BATCH + 3 {
            tx.try_send(admit(n)).ok().unwrap();
        }
        assert_eq!(gather(admit(999), &mut rx).len(), MAX_BATCH);
        assert_eq!(gather(admit(999), &mut rx).len(), 5);
        assert_eq!(gather(admit(999), &mut rx).len(), 1);
    }
}
