//! What a session sends one side of its relay goes through an outbox: a
//! bounded queue drained by a task of its own, so that a side that reads
//! slowly never stalls the session loop, and its backlog never grows past
//! the bound.

use std::time::Duration;

use futures::{Sink, SinkExt};
use tokio::sync::mpsc;
use tokio::sync::mpsc::error::TrySendError;
use tokio::task::JoinHandle;

/// Why a message could not be queued.
#[derive(Debug, PartialEq, Eq)]
pub enum Refused {
    /// The queue is full: the other side is not keeping up.
    Full,
    /// The writer has stopped: the connection is gone.
    Gone,
}

pub struct Outbox<M> {
    tx: mpsc::Sender<M>,
    writer: JoinHandle<()>,
}

impl<M: Send + 'static> Outbox<M> {
    /// Starts the task that writes what is queued, at most `capacity`
    /// messages ahead, to `sink`.
    pub fn spawn<S>(mut sink: S, capacity: usize) -> Outbox<M>
    where
        S: Sink<M> + Unpin + Send + 'static,
    {
        let (tx, mut rx) = mpsc::channel(capacity);
        let writer = tokio::spawn(async move {
            while let Some(message) = rx.recv().await {
                if sink.send(message).await.is_err() {
                    return;
                }
            }
            let _ = sink.close().await;
        });
        Outbox { tx, writer }
    }

    /// Whether one more message would be taken.
    pub fn has_room(&self) -> bool {
        self.tx.capacity() > 0
    }

    pub fn push(&self, message: M) -> Result<(), Refused> {
        self.tx.try_send(message).map_err(|error| match error {
            TrySendError::Full(_) => Refused::Full,
            TrySendError::Closed(_) => Refused::Gone,
        })
    }

    /// Queues `last` (a close frame) if there is room, lets the writer send
    /// what is queued, and waits for it at most `limit`.
    pub async fn finish(self, last: Option<M>, limit: Duration) {
        if let Some(last) = last {
            let _ = self.tx.try_send(last);
        }
        drop(self.tx);
        let mut writer = self.writer;
        if tokio::time::timeout(limit, &mut writer).await.is_err() {
            writer.abort();
        }
    }
}
