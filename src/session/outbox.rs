//! What a session sends one side of its relay goes through an outbox: a
//! queue bounded in messages and in bytes, drained by a task of its own, so
//! that a side that reads slowly never stalls the session loop and its
//! backlog never grows past the bounds. The session stops taking in what is
//! bound for a side while its outbox is full, and waits for room. A few
//! places past the bounds are kept for the session's own messages, and one
//! for the last frame, the close, which can also skip the backlog.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use futures::{FutureExt, Sink, SinkExt};
use tokio::sync::mpsc::error::TrySendError;
use tokio::sync::{Notify, mpsc, oneshot};
use tokio_util::task::AbortOnDropHandle;

/// Places kept past the bounds for the session's own messages (usage
/// events, pings), so that a queue kept full by relayed frames does not
/// hold them back. A tick adds at most two. Once these are taken too, the
/// session skips its own messages until the side reads again: they are
/// figures that the next ones supersede, and pings.
const OWN_PLACES: usize = 8;

/// Most queued messages the writer hands the socket before it flushes
/// them together, so that a run of small frames costs one write to the
/// socket rather than one each.
const WRITE_BATCH: usize = 32;

/// Why a message could not be queued.
#[derive(Debug)]
pub enum Refused {
    /// The queue is full: the other side is not keeping up.
    Full,
    /// The writer has stopped: the connection is gone.
    Gone,
}

/// What happens to what is still queued when the outbox is finished.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backlog {
    /// Send it, then the last frame: the other side closed, and what it
    /// said before it did still goes through.
    Send,
    /// Drop it and send the last frame at once: the session was stopped.
    Drop,
}

/// How much a message weighs in the byte bound.
pub trait Weight {
    fn weight(&self) -> usize;
}

pub struct Outbox<M> {
    /// Messages wait boxed: the channel allocates its places in blocks of
    /// a few dozen as soon as it is made, and an idle session, which
    /// queues nothing, would otherwise hold a block of whole messages.
    tx: mpsc::Sender<Box<M>>,
    last_tx: oneshot::Sender<M>,
    queued: Arc<Queued>,
    writer: AbortOnDropHandle<()>,
}

/// What is waiting in an outbox, shared with its writer.
struct Queued {
    bytes: AtomicUsize,
    max_bytes: usize,
    /// Told each time the writer has sent what it took from the queue.
    sent: Notify,
}

impl<M: Weight + Send + 'static> Outbox<M> {
    /// Starts the task that writes what is queued to `sink`, at most
    /// `max_messages` and `max_bytes` ahead.
    pub fn spawn<S>(sink: S, max_messages: usize, max_bytes: usize) -> Outbox<M>
    where
        S: Sink<M> + Unpin + Send + 'static,
    {
        let (tx, rx) = mpsc::channel(max_messages + OWN_PLACES + 1);
        let (last_tx, last_rx) = oneshot::channel();
        let queued =
            Arc::new(Queued { bytes: AtomicUsize::new(0), max_bytes, sent: Notify::new() });
        let writer = tokio::spawn(write(sink, rx, last_rx, queued.clone()));
        Outbox { tx, last_tx, queued, writer: AbortOnDropHandle::new(writer) }
    }

    /// Whether one more message would be taken by [`Outbox::push`].
    pub fn has_room(&self) -> bool {
        // Past `max_messages`, the channel holds the places kept for the
        // session's own messages and the last frame's.
        self.tx.capacity() > OWN_PLACES + 1
            && self.queued.bytes.load(Ordering::Relaxed) < self.queued.max_bytes
    }

    /// Whether the writer has stopped: the connection is gone.
    pub fn is_gone(&self) -> bool {
        self.tx.is_closed()
    }

    /// Resolves once there is room; never while the outbox stays full.
    pub async fn room(&self) {
        loop {
            let sent = self.queued.sent.notified();
            if self.has_room() || self.tx.is_closed() {
                return;
            }
            sent.await;
        }
    }

    /// Queues a message within the bounds.
    pub fn push(&self, message: M) -> Result<(), Refused> {
        if self.tx.is_closed() {
            return Err(Refused::Gone);
        }
        if !self.has_room() {
            return Err(Refused::Full);
        }
        self.enqueue(message)
    }

    /// Queues one of the session's own messages, in a place kept for them
    /// if the bounds are reached.
    pub fn push_own(&self, message: M) -> Result<(), Refused> {
        if self.tx.is_closed() {
            return Err(Refused::Gone);
        }
        // The last place stays the last frame's.
        if self.tx.capacity() <= 1 {
            return Err(Refused::Full);
        }
        self.enqueue(message)
    }

    fn enqueue(&self, message: M) -> Result<(), Refused> {
        let weight = message.weight();
        self.queued.bytes.fetch_add(weight, Ordering::Relaxed);
        self.tx.try_send(Box::new(message)).map_err(|error| {
            self.queued.bytes.fetch_sub(weight, Ordering::Relaxed);
            match error {
                TrySendError::Full(_) => Refused::Full,
                TrySendError::Closed(_) => Refused::Gone,
            }
        })
    }

    /// Hands the writer the last frame, if any, and waits until it has sent
    /// it (and, with [`Backlog::Send`], what was queued before). Dropping
    /// this future stops the writer.
    pub async fn finish(self, last: Option<M>, backlog: Backlog) {
        let Outbox { tx, last_tx, writer, .. } = self;
        match (last, backlog) {
            (Some(last), Backlog::Drop) => {
                let _ = last_tx.send(last);
            }
            // The place kept free takes it.
            (Some(last), Backlog::Send) => {
                let _ = tx.try_send(Box::new(last));
            }
            (None, _) => {}
        }
        drop(tx);
        let _ = writer.await;
    }
}

/// The writer: sends what is queued, in order, until the queue closes; a
/// last frame that skips the backlog ends it at once.
async fn write<M, S>(
    mut sink: S,
    mut rx: mpsc::Receiver<Box<M>>,
    mut last_rx: oneshot::Receiver<M>,
    queued: Arc<Queued>,
) where
    M: Weight,
    S: Sink<M> + Unpin,
{
    let mut skipping_open = true;
    loop {
        tokio::select! {
            biased;
            last = &mut last_rx, if skipping_open => match last {
                Ok(last) => {
                    let _ = sink.send(last).await;
                    break;
                }
                Err(_) => skipping_open = false,
            },
            message = rx.recv() => {
                let Some(message) = message else { break };
                if !write_run(&mut sink, &mut rx, *message, &queued).await {
                    return;
                }
            }
        }
    }
    let _ = sink.close().await;
}

/// Writes `first` and what is queued behind it, up to [`WRITE_BATCH`]
/// messages and as long as the sink takes them without waiting, with one
/// flush; then tells the session there is room. Returns whether the sink
/// took them.
async fn write_run<M, S>(
    sink: &mut S,
    rx: &mut mpsc::Receiver<Box<M>>,
    first: M,
    queued: &Queued,
) -> bool
where
    M: Weight,
    S: Sink<M> + Unpin,
{
    let mut weight = first.weight();
    let mut written = sink.feed(first).await.is_ok();
    let mut fed = 1;
    while written && fed < WRITE_BATCH && ready_now(sink) {
        let Ok(message) = rx.try_recv() else { break };
        weight += message.weight();
        written = sink.start_send_unpin(*message).is_ok();
        fed += 1;
    }
    written = written && sink.flush().await.is_ok();
    queued.bytes.fetch_sub(weight, Ordering::Relaxed);
    queued.sent.notify_waiters();
    written
}

/// Whether the sink takes a message without waiting. One that would wait
/// gets what it has flushed first: a last frame that skips the backlog
/// then waits for that flush only, not for more of the backlog.
fn ready_now<M, S: Sink<M> + Unpin>(sink: &mut S) -> bool {
    let ready = std::future::poll_fn(|cx| sink.poll_ready_unpin(cx)).now_or_never();
    matches!(ready, Some(Ok(())))
}

impl Queued {
    #[cfg(test)]
    fn bytes(&self) -> usize {
        self.bytes.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::StreamExt;
    use futures::channel::mpsc as futures_mpsc;

    impl Weight for Vec<u8> {
        fn weight(&self) -> usize {
            self.len()
        }
    }

    /// An outbox writing into a channel whose other end the test holds,
    /// bounded so that a test that does not read stalls the writer.
    fn outbox(
        max_messages: usize,
        max_bytes: usize,
    ) -> (Outbox<Vec<u8>>, futures_mpsc::Receiver<Vec<u8>>) {
        let (sink, read) = futures_mpsc::channel(0);
        (Outbox::spawn(sink, max_messages, max_bytes), read)
    }

    #[tokio::test]
    async fn a_full_outbox_refuses_but_keeps_a_place_for_the_last_frame() {
        let (outbox, mut read) = outbox(2, 1 << 20);
        // One message is taken by the stalled writer, two wait.
        let mut taken = 0;
        while outbox.push(vec![1]).is_ok() {
            taken += 1;
            tokio::task::yield_now().await;
        }
        assert!(taken <= 4, "took {taken}");
        assert!(matches!(outbox.push(vec![1]), Err(Refused::Full)));

        let finishing = tokio::spawn(outbox.finish(Some(vec![9]), Backlog::Send));
        let mut received = Vec::new();
        while let Some(message) = read.next().await {
            received.push(message);
        }
        finishing.await.unwrap();
        assert_eq!(received.last(), Some(&vec![9]), "{received:?}");
        assert_eq!(received.len(), taken + 1);
    }

    #[tokio::test]
    async fn own_messages_get_past_a_full_queue_but_not_into_the_last_place() {
        let (outbox, mut read) = outbox(2, 1 << 20);
        while outbox.push(vec![1]).is_ok() {
            tokio::task::yield_now().await;
        }
        let mut own = 0;
        while outbox.push_own(vec![2]).is_ok() {
            own += 1;
        }
        assert_eq!(own, OWN_PLACES);

        let finishing = tokio::spawn(outbox.finish(Some(vec![9]), Backlog::Send));
        let mut received = Vec::new();
        while let Some(message) = read.next().await {
            received.push(message);
        }
        finishing.await.unwrap();
        assert_eq!(received.last(), Some(&vec![9]), "{received:?}");
        assert_eq!(received.iter().filter(|m| **m == vec![2]).count(), OWN_PLACES);
    }

    #[tokio::test]
    async fn a_last_frame_that_skips_the_backlog_goes_out_next() {
        let (outbox, mut read) = outbox(8, 1 << 20);
        for _ in 0..4 {
            outbox.push(vec![1]).unwrap();
        }
        let first = read.next().await.unwrap();
        let finishing = tokio::spawn(outbox.finish(Some(vec![9]), Backlog::Drop));
        let mut received = vec![first];
        while let Some(message) = read.next().await {
            received.push(message);
        }
        finishing.await.unwrap();
        // Whatever the writer had in hand when the close came, then the close.
        assert_eq!(received.last(), Some(&vec![9]));
        assert!(received.len() <= 3, "the backlog was sent: {received:?}");
    }

    #[tokio::test]
    async fn bytes_bound_the_queue_as_well_as_messages() {
        let (outbox, mut read) = outbox(100, 1000);
        outbox.push(vec![0; 600]).unwrap();
        tokio::task::yield_now().await;
        outbox.push(vec![0; 600]).unwrap();
        assert!(matches!(outbox.push(vec![0; 10]), Err(Refused::Full)));
        assert!(outbox.queued.bytes() >= 1000);

        read.next().await.unwrap();
        read.next().await.unwrap();
        tokio::time::timeout(std::time::Duration::from_secs(1), outbox.room()).await.unwrap();
        assert!(outbox.has_room());
    }
}
