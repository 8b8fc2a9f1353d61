//! The dispatcher: one task that delivers the outbox's events to their
//! projects' endpoints, at least once. Each attempt is a signed `POST` with
//! a 10-second timeout; a non-2xx answer, a timeout or a connection error is
//! retried with exponential backoff and jitter until a day after the event,
//! then the event is marked failed. Every attempt of one event carries the
//! same `webhook-id`. State lives in the store, so pending deliveries
//! survive a restart and resume.
//!
//! Attempts run in tasks of their own, at most a few per endpoint at once,
//! and each read of the outbox takes only the oldest few of each project,
//! so that a slow or dead receiver holds up only its own project's events,
//! and never the meter or the API, which only write rows to the outbox.
//! Events of one project may arrive out of order (a few are in flight at
//! once, and retries come later); each carries the time it happened.
//!
//! Servers sharing a PostgreSQL database share its outbox: the store hands
//! each due event to one dispatcher at a time, claimed for
//! [`DELIVERY_LEASE`], and an event whose server died mid-attempt is
//! attempted again by another once the lease runs out. An attempt is kept
//! well inside its lease ([`LONGEST_ATTEMPT`]).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::http::{HeaderValue, Method, Request, header};
use http_body_util::Full;
use tokio::task::{JoinHandle, JoinSet};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::signature::{self, WebhookSecret};
use crate::outbound::HttpsClient;
use crate::store::{AttemptOutcome, DELIVERY_LEASE, DueEvent, Store, UnixMillis};

/// How the dispatcher paces itself.
#[derive(Clone, Copy, Debug)]
pub struct DispatchSettings {
    /// How often the outbox is read for due events. A new event waits at
    /// most this long for its first attempt.
    pub poll: Duration,
    /// How long one attempt waits for the endpoint's answer; at most
    /// [`LONGEST_ATTEMPT`].
    pub attempt_timeout: Duration,
    /// The wait after the first failure; each further one doubles it.
    pub first_retry: Duration,
    pub longest_retry: Duration,
    /// How long after the event it is still retried.
    pub give_up_after: Duration,
    /// Attempts in flight for one endpoint at once.
    pub per_endpoint: usize,
}

impl DispatchSettings {
    /// These settings with the attempt timeout cut to [`LONGEST_ATTEMPT`].
    fn within_lease(self) -> DispatchSettings {
        if self.attempt_timeout <= LONGEST_ATTEMPT {
            return self;
        }
        warn!(
            asked = ?self.attempt_timeout,
            used = ?LONGEST_ATTEMPT,
            "the webhook attempt timeout is cut to fit the delivery lease"
        );
        DispatchSettings { attempt_timeout: LONGEST_ATTEMPT, ..self }
    }
}

impl Default for DispatchSettings {
    fn default() -> DispatchSettings {
        DispatchSettings {
            poll: Duration::from_millis(250),
            attempt_timeout: Duration::from_secs(10),
            first_retry: Duration::from_secs(1),
            longest_retry: Duration::from_secs(3600),
            give_up_after: Duration::from_secs(24 * 3600),
            per_endpoint: 4,
        }
    }
}

/// How many due events one read of the outbox takes.
const BATCH: u32 = 256;

/// The longest attempt timeout the dispatcher uses; a longer one set is cut
/// to this. Half the lease, so that the claim, the attempt and the record
/// of its outcome all end before another server may claim the event again.
pub const LONGEST_ATTEMPT: Duration = Duration::from_secs(DELIVERY_LEASE.as_secs() / 2);

/// The longest error text kept for an attempt.
const MAX_ERROR_CHARS: usize = 500;

/// Starts the dispatcher; it stops when `shutdown` is cancelled, leaving
/// attempts in flight to be made again at the next start (on PostgreSQL,
/// by whichever server claims them once their lease has run out).
pub fn spawn(
    store: Arc<dyn Store>,
    client: HttpsClient,
    settings: DispatchSettings,
    shutdown: CancellationToken,
) -> JoinHandle<()> {
    let settings = settings.within_lease();
    let dispatcher =
        Dispatcher { store, client, settings, in_flight: HashMap::new(), tasks: HashMap::new() };
    tokio::spawn(dispatcher.run(shutdown))
}

struct Dispatcher {
    store: Arc<dyn Store>,
    client: HttpsClient,
    settings: DispatchSettings,
    /// Events being attempted, and their project.
    in_flight: HashMap<i64, i64>,
    /// The event each attempt's task is for.
    tasks: HashMap<tokio::task::Id, i64>,
}

impl Dispatcher {
    async fn run(mut self, shutdown: CancellationToken) {
        let mut attempts: JoinSet<i64> = JoinSet::new();
        let mut poll = tokio::time::interval(self.settings.poll);
        poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                Some(done) = attempts.join_next_with_id() => {
                    // A panicked attempt frees its slot too; its event is
                    // still pending, and is tried again.
                    let task = match &done {
                        Ok((task, _)) => *task,
                        Err(error) => error.id(),
                    };
                    if let Some(seq) = self.tasks.remove(&task) {
                        self.in_flight.remove(&seq);
                    }
                    // A slot is free: fill it now rather than at the next
                    // poll, so that a quick receiver is not held to a few
                    // events per poll.
                    self.start_due(&mut attempts).await;
                }
                _ = poll.tick() => self.start_due(&mut attempts).await,
            }
        }
        attempts.abort_all();
    }

    /// Starts an attempt for each due event whose endpoint has room. On
    /// PostgreSQL the store hands out no more than there is room for, since
    /// an event handed out is claimed and one left here would wait out its
    /// lease.
    async fn start_due(&mut self, attempts: &mut JoinSet<i64>) {
        let busy: Vec<i64> = self.in_flight.keys().copied().collect();
        let per_project = self.settings.per_endpoint as u32;
        let now = crate::clock::now_millis();
        let due = match self.store.due_events(now, busy, per_project, BATCH).await {
            Ok(due) => due,
            Err(error) => {
                warn!(%error, "the webhook outbox cannot be read");
                return;
            }
        };
        for event in due {
            let project_busy = self.in_flight.values().filter(|p| **p == event.project.0).count();
            if project_busy >= self.settings.per_endpoint {
                continue;
            }
            self.in_flight.insert(event.seq, event.project.0);
            let attempt = Attempt {
                store: self.store.clone(),
                client: self.client.clone(),
                settings: self.settings,
                lease_ends: now + DELIVERY_LEASE.as_millis() as i64,
            };
            let seq = event.seq;
            let task = attempts.spawn(attempt.run(event)).id();
            self.tasks.insert(task, seq);
        }
    }
}

/// One attempt at one event.
struct Attempt {
    store: Arc<dyn Store>,
    client: HttpsClient,
    settings: DispatchSettings,
    /// When the event's claim runs out (PostgreSQL's; SQLite claims
    /// nothing, and its attempts end long before this anyway).
    lease_ends: UnixMillis,
}

impl Attempt {
    async fn run(self, event: DueEvent) -> i64 {
        let outcome = match self.send(&event).await {
            Ok(()) => AttemptOutcome::Delivered,
            Err(error) => {
                debug!(event = %event.id, %error, "a webhook delivery failed");
                let error: String = error.chars().take(MAX_ERROR_CHARS).collect();
                AttemptOutcome::Failed { error, retry_at: self.retry_at(&event) }
            }
        };
        let now = crate::clock::now_millis();
        if now >= self.lease_ends && matches!(outcome, AttemptOutcome::Failed { .. }) {
            // Another server may have claimed the event since; a failure
            // recorded now would cut that claim short. Unrecorded, the
            // event is due again as the lease left it.
            warn!(event = %event.id, "a webhook attempt outlived its lease; failure dropped");
            return event.seq;
        }
        let recorded = self.store.record_attempt(event.seq, outcome, now);
        if let Err(error) = recorded.await {
            warn!(%error, event = %event.id, "a webhook attempt could not be recorded");
        }
        event.seq
    }

    async fn send(&self, event: &DueEvent) -> Result<(), String> {
        let url = event.url.as_deref().ok_or("the project has no webhook")?;
        let request = signed_request(url, event)?;
        let sent =
            tokio::time::timeout(self.settings.attempt_timeout, self.client.request(request));
        let response = match sent.await {
            Err(_) => return Err(format!("no answer within {:?}", self.settings.attempt_timeout)),
            Ok(Err(error)) => return Err(format!("cannot reach the endpoint: {error}")),
            Ok(Ok(response)) => response,
        };
        let status = response.status();
        if status.is_success() { Ok(()) } else { Err(format!("the endpoint answered {status}")) }
    }

    /// When to try again after the attempt that failed: exponential
    /// backoff from `first_retry`, capped, with up to half again of jitter
    /// either way, so that many events failed together do not come back
    /// together. `None` once that would be past `give_up_after`.
    fn retry_at(&self, event: &DueEvent) -> Option<UnixMillis> {
        let doublings = event.attempts.clamp(0, 30) as u32;
        let backoff = self.settings.first_retry.saturating_mul(1 << doublings.min(20));
        let backoff = backoff.min(self.settings.longest_retry).as_millis() as f64;
        let jittered = backoff * (0.5 + rand::random::<f64>());
        let at = crate::clock::now_millis() + jittered as i64;
        let deadline = event.created_at + self.settings.give_up_after.as_millis() as i64;
        (at <= deadline).then_some(at)
    }
}

/// The `POST` of an event, signed with every secret it has.
fn signed_request(url: &str, event: &DueEvent) -> Result<Request<Full<Bytes>>, String> {
    let secrets: Vec<WebhookSecret> =
        event.secrets.iter().filter_map(|text| WebhookSecret::parse(text)).collect();
    if secrets.is_empty() {
        return Err("the webhook has no usable secret".into());
    }
    let secrets: Vec<&WebhookSecret> = secrets.iter().collect();
    let timestamp = crate::clock::now_millis() / 1000;
    let signed = signature::sign(&secrets, &event.id, timestamp, event.body.as_bytes());
    let mut request = Request::builder()
        .method(Method::POST)
        .uri(url)
        .header(header::CONTENT_TYPE, HeaderValue::from_static("application/json"))
        .header(header::USER_AGENT, HeaderValue::from_static("tollgate-webhooks"))
        .body(Full::new(Bytes::from(event.body.clone())))
        .map_err(|error| format!("the webhook URL cannot be used: {error}"))?;
    signed.insert_into(request.headers_mut()).map_err(|error| error.to_string())?;
    Ok(request)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_attempt_timeout_past_half_the_lease_is_cut_to_half_the_lease() {
        let long = DispatchSettings { attempt_timeout: DELIVERY_LEASE, ..Default::default() };
        assert_eq!(long.within_lease().attempt_timeout, LONGEST_ATTEMPT);
        let default = DispatchSettings::default();
        assert_eq!(default.within_lease().attempt_timeout, default.attempt_timeout);
    }
}
