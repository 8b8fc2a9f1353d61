//! A connection's reads, taken from the socket in large pieces while the
//! peer keeps it full, and in the reader's own small ones otherwise.
//!
//! A session's WebSocket reader keeps a small read buffer for the session's
//! whole life (see `api::realtime`), since that buffer is most of what an
//! idle session costs. Read directly, a client sending in bulk would then
//! cost a system call for every couple of KiB. This sits beneath the reader:
//! a read that fills the reader's buffer suggests more is waiting, so the
//! reads after it take up to [`READ_AHEAD_BYTES`] from the socket at once
//! into a buffer of this connection's, which the reader's small reads then
//! drain. That buffer is freed once they have drained it, and the reads go
//! straight to the reader's buffer again at the first that finds the socket
//! empty, so a connection holds one only while what it read ahead waits to
//! be taken. A reader whose own buffer is as large is always read directly.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The most one read ahead takes from the socket. A few hundred 20 ms
/// audio frames, or a burst of relayed messages; it is held only while
/// they are drained, and the session's queues allow megabytes anyway.
pub const READ_AHEAD_BYTES: usize = 64 * 1024;

pub struct ReadAhead<S> {
    inner: S,
    /// What was read ahead and not yet handed to the reader; unallocated
    /// once that is all taken.
    ahead: BytesMut,
    /// The last read found the socket with more than the reader asked for,
    /// and it has not been found empty since.
    busy: bool,
}

impl<S> ReadAhead<S> {
    pub fn new(inner: S) -> ReadAhead<S> {
        ReadAhead { inner, ahead: BytesMut::new(), busy: false }
    }

    #[cfg(test)]
    fn get_ref(&self) -> &S {
        &self.inner
    }

    /// Whether a buffer of read-ahead bytes is held.
    #[cfg(test)]
    fn holds_buffer(&self) -> bool {
        self.ahead.capacity() > 0
    }

    /// Moves what fits of the bytes read ahead into the reader's buffer,
    /// and frees the buffer once it is empty.
    fn hand_over(&mut self, buf: &mut ReadBuf<'_>) {
        let n = buf.remaining().min(self.ahead.len());
        buf.put_slice(&self.ahead[..n]);
        self.ahead.advance(n);
        if self.ahead.is_empty() {
            self.ahead = BytesMut::new();
        }
    }

    /// The socket had nothing more: back to the reader's own reads.
    fn let_go(&mut self) {
        self.busy = false;
        self.ahead = BytesMut::new();
    }
}

impl<S: AsyncRead + Unpin> ReadAhead<S> {
    /// Reads straight into the reader's buffer; notes whether it filled.
    fn poll_direct(&mut self, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let (before, room) = (buf.filled().len(), buf.remaining());
        ready!(Pin::new(&mut self.inner).poll_read(cx, buf))?;
        self.busy = room > 0 && buf.filled().len() - before == room;
        Poll::Ready(Ok(()))
    }

    /// Reads as much as the socket has, up to [`READ_AHEAD_BYTES`], and
    /// hands over what fits.
    fn poll_ahead(&mut self, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        // Uninitialised: the read does not clear it first.
        self.ahead = BytesMut::with_capacity(READ_AHEAD_BYTES);
        let read = tokio_util::io::poll_read_buf(Pin::new(&mut self.inner), cx, &mut self.ahead);
        match read {
            Poll::Ready(Ok(0)) => self.let_go(),
            Poll::Ready(Ok(_)) => self.hand_over(buf),
            Poll::Ready(Err(error)) => {
                self.let_go();
                return Poll::Ready(Err(error));
            }
            Poll::Pending => {
                self.let_go();
                return Poll::Pending;
            }
        }
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for ReadAhead<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.ahead.is_empty() {
            this.hand_over(buf);
            return Poll::Ready(Ok(()));
        }
        if this.busy && buf.remaining() < READ_AHEAD_BYTES {
            this.poll_ahead(cx, buf)
        } else {
            this.poll_direct(cx, buf)
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for ReadAhead<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};

    use super::*;

    /// A connected pair of loopback sockets, the far end's and ours.
    async fn pair() -> (TcpStream, ReadAhead<TcpStream>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let far = TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
        let (near, _) = listener.accept().await.unwrap();
        (far, ReadAhead::new(near))
    }

    /// Bytes that differ from one position to the next, so that a byte
    /// lost, repeated or out of order shows.
    fn pattern(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i % 251) as u8).collect()
    }

    /// Reads exactly `len` bytes in reads of at most `chunk`.
    async fn read_in_chunks(near: &mut ReadAhead<TcpStream>, len: usize, chunk: usize) -> Vec<u8> {
        let mut got = Vec::with_capacity(len);
        let mut piece = vec![0; chunk];
        while got.len() < len {
            let n = near.read(&mut piece).await.unwrap();
            assert_ne!(n, 0, "the stream ended after {} of {len} bytes", got.len());
            got.extend_from_slice(&piece[..n]);
        }
        got
    }

    #[tokio::test]
    async fn a_burst_read_in_small_pieces_comes_through_whole_and_in_order() {
        let (mut far, mut near) = pair().await;
        let sent = pattern(3 * READ_AHEAD_BYTES + 1234);
        let writer = {
            let sent = sent.clone();
            tokio::spawn(async move { far.write_all(&sent).await.map(|_| far) })
        };
        let got = read_in_chunks(&mut near, sent.len(), 2048).await;
        assert!(got == sent, "the bytes read differ from those sent");
        drop(writer.await.unwrap().unwrap());
        let mut rest = [0; 16];
        assert_eq!(near.read(&mut rest).await.unwrap(), 0, "the end of the stream is passed on");
    }

    #[tokio::test]
    async fn a_burst_is_read_ahead_and_the_buffer_let_go_once_drained() {
        let (mut far, mut near) = pair().await;
        far.write_all(&pattern(20_000)).await.unwrap();
        // Wait for the whole burst to be in the socket.
        while near.get_ref().peek(&mut vec![0; 20_000]).await.unwrap() < 20_000 {}
        let mut piece = [0; 2048];
        assert_eq!(near.read(&mut piece).await.unwrap(), 2048);
        assert!(!near.holds_buffer(), "a read straight into the reader's buffer holds nothing");
        assert_eq!(near.read(&mut piece).await.unwrap(), 2048);
        assert!(near.holds_buffer(), "a full read is followed by one ahead");
        read_in_chunks(&mut near, 20_000 - 4096, 2048).await;
        assert!(!near.holds_buffer(), "the buffer outlived what it held");
        // Nothing is left in the socket: the next read finds it empty.
        let empty =
            tokio::time::timeout(std::time::Duration::from_millis(50), near.read(&mut piece));
        assert!(empty.await.is_err(), "nothing more was sent");
        assert!(!near.holds_buffer(), "the buffer outlived the burst");
        far.write_all(b"later").await.unwrap();
        assert_eq!(near.read(&mut piece).await.unwrap(), 5);
        assert!(!near.holds_buffer(), "a small read after the burst is read straight");
    }

    #[tokio::test]
    async fn a_reader_with_a_buffer_as_large_is_read_straight() {
        // An in-memory pipe holds all that is written at once, so that each
        // read finds more waiting than it asks for.
        let (mut far, near) = tokio::io::duplex(8 * READ_AHEAD_BYTES);
        let mut near = ReadAhead::new(near);
        let sent = pattern(5 * READ_AHEAD_BYTES);
        far.write_all(&sent).await.unwrap();
        drop(far);
        let mut got = Vec::new();
        let mut piece = vec![0; 2 * READ_AHEAD_BYTES];
        loop {
            let n = near.read(&mut piece).await.unwrap();
            if n == 0 {
                break;
            }
            let left = sent.len() - got.len();
            assert_eq!(n, left.min(piece.len()), "a read took less than was there");
            assert!(!near.holds_buffer(), "read ahead for a reader with a buffer this large");
            got.extend_from_slice(&piece[..n]);
        }
        assert!(got == sent, "the bytes read differ from those sent");
    }
}
