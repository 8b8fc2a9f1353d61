//! A webhook receiver written for the tests: an HTTP server on 127.0.0.1
//! that records every delivery (headers and raw body) and answers with the
//! statuses it is told, in turn, or never answers at all.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use serde_json::Value;
use tokio::net::TcpListener;

/// One delivery as the receiver got it.
#[derive(Clone, Debug)]
pub struct Delivered {
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Delivered {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap()
    }

    pub fn header(&self, name: &str) -> &str {
        self.headers.get(name).and_then(|v| v.to_str().ok()).unwrap_or_default()
    }
}

#[derive(Default)]
struct Shared {
    got: Mutex<Vec<Delivered>>,
    /// Statuses to answer with, first first; 200 once they run out.
    script: Mutex<Vec<u16>>,
    hang: std::sync::atomic::AtomicBool,
}

pub struct Receiver {
    pub url: String,
    shared: Arc<Shared>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Receiver {
    /// A receiver that answers 200 to everything.
    pub async fn start() -> Receiver {
        Receiver::on(TcpListener::bind("127.0.0.1:0").await.unwrap())
    }

    /// A receiver on a given listener, so that a test can bring one up on
    /// an address it gave out earlier.
    pub fn on(listener: TcpListener) -> Receiver {
        let url = format!("http://{}/hook", listener.local_addr().unwrap());
        let shared = Arc::new(Shared::default());
        let app = Router::new().fallback(receive).with_state(shared.clone());
        let task = tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        Receiver { url, shared, task }
    }

    /// Answers the next deliveries with these statuses, then 200.
    pub fn answer_with(&self, statuses: &[u16]) {
        *self.shared.script.lock().unwrap() = statuses.to_vec();
    }

    /// Takes deliveries and never answers them.
    pub fn hang(&self) {
        self.shared.hang.store(true, std::sync::atomic::Ordering::SeqCst);
    }

    pub fn got(&self) -> Vec<Delivered> {
        self.shared.got.lock().unwrap().clone()
    }

    /// The bodies of every delivery so far, as JSON.
    pub fn events(&self) -> Vec<Value> {
        self.got().iter().map(Delivered::json).collect()
    }

    /// Waits until `done` holds for the deliveries so far, for up to 20 s.
    pub async fn until(&self, done: impl Fn(&[Value]) -> bool) -> Vec<Value> {
        self.until_within(Duration::from_secs(20), done).await
    }

    /// Waits until `done` holds for the deliveries so far, for up to `wait`.
    pub async fn until_within(
        &self,
        wait: Duration,
        done: impl Fn(&[Value]) -> bool,
    ) -> Vec<Value> {
        let deadline = tokio::time::Instant::now() + wait;
        while tokio::time::Instant::now() < deadline {
            let events = self.events();
            if done(&events) {
                return events;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("the deliveries never got there: {:#?}", self.events());
    }
}

async fn receive(State(shared): State<Arc<Shared>>, headers: HeaderMap, body: Bytes) -> StatusCode {
    shared.got.lock().unwrap().push(Delivered { headers, body });
    if shared.hang.load(std::sync::atomic::Ordering::SeqCst) {
        std::future::pending::<()>().await;
    }
    let mut script = shared.script.lock().unwrap();
    let status = if script.is_empty() { 200 } else { script.remove(0) };
    StatusCode::from_u16(status).unwrap()
}

/// The events of one type.
pub fn of_type<'a>(events: &'a [Value], kind: &str) -> Vec<&'a Value> {
    events.iter().filter(|event| event["type"] == kind).collect()
}
