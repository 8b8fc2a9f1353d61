//! The client's connection as the session writes to it. tungstenite answers
//! every ping with a pong of its own, and keeps in its write buffer the
//! pongs the socket will not take; the upgrade bounds that buffer, so that
//! a client sending pings without reading costs a bounded amount. Once the
//! buffer is full, tungstenite refuses the session's next message. This
//! wrapper holds that message and hands it over again once the buffer has
//! drained: a full buffer then means waiting for the client to read, as a
//! full socket does, and the session's outbox fills and stalls as usual.

use std::pin::Pin;
use std::task::{Context, Poll, ready};

use axum::extract::ws::Message;
use futures::{Sink, Stream};
use tokio_tungstenite::tungstenite;

/// How a sink's error is read.
pub trait Refusal {
    /// Whether the sink refused a message only because its write buffer is
    /// full: it takes the message once it has flushed that buffer.
    fn is_full(&self) -> bool;
}

impl Refusal for axum::Error {
    fn is_full(&self) -> bool {
        let inner = std::error::Error::source(self);
        let inner = inner.and_then(|inner| inner.downcast_ref::<tungstenite::Error>());
        matches!(inner, Some(tungstenite::Error::WriteBufferFull(_)))
    }
}

/// A connection whose sink waits, rather than fails, while its write
/// buffer is full.
pub struct Patient<S> {
    inner: S,
    /// A message the connection refused as full, handed over again once
    /// it has flushed.
    held: Option<Message>,
}

impl<S> Patient<S>
where
    S: Sink<Message> + Unpin,
    S::Error: Refusal,
{
    pub fn new(inner: S) -> Patient<S> {
        Patient { inner, held: None }
    }

    /// Hands the connection the held message, if any, once it has flushed
    /// the buffer that refused it. A message refused by an empty buffer
    /// never fits: that refusal is an error.
    fn poll_held(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        if self.held.is_none() {
            return Poll::Ready(Ok(()));
        }
        ready!(Pin::new(&mut self.inner).poll_flush(cx))?;
        ready!(Pin::new(&mut self.inner).poll_ready(cx))?;
        let message = self.held.take().expect("a message is held");
        Poll::Ready(Pin::new(&mut self.inner).start_send(message))
    }
}

impl<S> Sink<Message> for Patient<S>
where
    S: Sink<Message> + Unpin,
    S::Error: Refusal,
{
    type Error = S::Error;

    fn poll_ready(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        let this = self.get_mut();
        ready!(this.poll_held(cx))?;
        Pin::new(&mut this.inner).poll_ready(cx)
    }

    fn start_send(self: Pin<&mut Self>, message: Message) -> Result<(), S::Error> {
        let this = self.get_mut();
        // The clone costs a reference count: the payloads are shared bytes.
        match Pin::new(&mut this.inner).start_send(message.clone()) {
            Err(refusal) if refusal.is_full() => {
                this.held = Some(message);
                Ok(())
            }
            sent => sent,
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        let this = self.get_mut();
        ready!(this.poll_held(cx))?;
        Pin::new(&mut this.inner).poll_flush(cx)
    }

    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        let this = self.get_mut();
        ready!(this.poll_held(cx))?;
        Pin::new(&mut this.inner).poll_close(cx)
    }
}

impl<S: Stream + Unpin> Stream for Patient<S> {
    type Item = S::Item;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<S::Item>> {
        Pin::new(&mut self.get_mut().inner).poll_next(cx)
    }
}
