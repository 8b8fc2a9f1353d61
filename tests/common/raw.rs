//! A WebSocket client that writes frames byte by byte over a plain TCP
//! socket after a real upgrade, for input no WebSocket library would send:
//! frames over the size limit, unmasked frames, text that is not UTF-8,
//! frames after a close, floods of pings.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::time::Instant;

use super::Api;

pub const CONTINUATION: u8 = 0x0;
pub const TEXT: u8 = 0x1;
pub const BINARY: u8 = 0x2;
pub const CLOSE: u8 = 0x8;
pub const PING: u8 = 0x9;
pub const PONG: u8 = 0xa;

/// The masking key of every masked frame written here.
const MASK: [u8; 4] = [0x5a, 0x13, 0xc7, 0x88];

/// The client's socket buffers, both ways: small, so that what the server
/// holds for a client that does not read stays in the server rather than
/// in this socket, and so that a write is done only once the server has
/// read nearly all of it.
const SOCKET_BUFFER: u32 = 64 * 1024;

/// How long a read waits for the server.
const READ_TIMEOUT: Duration = Duration::from_secs(20);

/// One frame from the server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub opcode: u8,
    pub fin: bool,
    pub payload: Vec<u8>,
}

impl Frame {
    /// The code and reason of a close frame.
    pub fn close(&self) -> Option<(u16, String)> {
        let code = u16::from_be_bytes([*self.payload.first()?, *self.payload.get(1)?]);
        Some((code, String::from_utf8_lossy(&self.payload[2..]).into_owned()))
    }
}

/// A frame as a client writes it: masked unless `masked` is false.
pub fn frame(opcode: u8, fin: bool, masked: bool, payload: &[u8]) -> Vec<u8> {
    let mut bytes = vec![u8::from(fin) << 7 | opcode];
    let mask_bit = u8::from(masked) << 7;
    match payload.len() {
        len @ 0..=125 => bytes.push(mask_bit | len as u8),
        len @ 126..=0xffff => {
            bytes.push(mask_bit | 126);
            bytes.extend((len as u16).to_be_bytes());
        }
        len => {
            bytes.push(mask_bit | 127);
            bytes.extend((len as u64).to_be_bytes());
        }
    }
    if !masked {
        bytes.extend(payload);
        return bytes;
    }
    bytes.extend(MASK);
    bytes.extend(payload.iter().enumerate().map(|(i, byte)| byte ^ MASK[i % 4]));
    bytes
}

/// A whole, masked message in one frame.
pub fn message(opcode: u8, payload: &[u8]) -> Vec<u8> {
    frame(opcode, true, true, payload)
}

/// A masked close frame with a code and a reason.
pub fn close_frame(code: u16, reason: &str) -> Vec<u8> {
    let mut payload = code.to_be_bytes().to_vec();
    payload.extend(reason.as_bytes());
    message(CLOSE, &payload)
}

pub struct RawClient {
    tcp: TcpStream,
    /// Read from the socket, not yet taken as frames.
    read: Vec<u8>,
    /// When the upgrade's answer came.
    pub opened: Instant,
}

impl RawClient {
    /// Upgrades `path_and_query` by hand; panics unless the answer is 101.
    pub async fn upgrade(api: &Api, path_and_query: &str) -> RawClient {
        let addr = api.base.trim_start_matches("http://").to_owned();
        let socket = TcpSocket::new_v4().unwrap();
        socket.set_recv_buffer_size(SOCKET_BUFFER).unwrap();
        socket.set_send_buffer_size(SOCKET_BUFFER).unwrap();
        let mut tcp = socket.connect(addr.parse().unwrap()).await.unwrap();
        let request = format!(
            "GET {path_and_query} HTTP/1.1\r\nHost: {addr}\r\nConnection: Upgrade\r\n\
             Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
        );
        tcp.write_all(request.as_bytes()).await.unwrap();
        let mut client = RawClient { tcp, read: Vec::new(), opened: Instant::now() };
        let end = loop {
            if let Some(end) = client.read.windows(4).position(|w| w == b"\r\n\r\n") {
                break end + 4;
            }
            assert!(client.fill().await, "the connection ended during the upgrade");
        };
        let head = String::from_utf8_lossy(&client.read[..end]).into_owned();
        assert!(head.starts_with("HTTP/1.1 101"), "the upgrade was refused: {head}");
        client.read.drain(..end);
        client.opened = Instant::now();
        client
    }

    pub async fn send(&mut self, bytes: &[u8]) {
        self.tcp.write_all(bytes).await.unwrap();
    }

    /// The next frame, or `None` once the connection has ended.
    pub async fn next_frame(&mut self) -> Option<Frame> {
        let header = self.take(2).await?;
        assert_eq!(header[1] & 0x80, 0, "the server masked a frame");
        let len = match header[1] & 0x7f {
            126 => u16::from_be_bytes(self.take(2).await?.try_into().unwrap()) as usize,
            127 => u64::from_be_bytes(self.take(8).await?.try_into().unwrap()) as usize,
            len => len as usize,
        };
        let payload = self.take(len).await?;
        Some(Frame { opcode: header[0] & 0x0f, fin: header[0] & 0x80 != 0, payload })
    }

    async fn take(&mut self, count: usize) -> Option<Vec<u8>> {
        while self.read.len() < count {
            if !self.fill().await {
                return None;
            }
        }
        Some(self.read.drain(..count).collect())
    }

    /// Reads more from the socket; false once it has ended.
    async fn fill(&mut self) -> bool {
        let mut chunk = [0u8; 16 * 1024];
        let read = tokio::time::timeout(READ_TIMEOUT, self.tcp.read(&mut chunk)).await;
        match read.expect("the server sent nothing for 20 s") {
            Ok(0) | Err(_) => false,
            Ok(count) => {
                self.read.extend(&chunk[..count]);
                true
            }
        }
    }
}
