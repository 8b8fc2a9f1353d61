//! The baseline: a plain tokio-tungstenite echo server, with no
//! authentication and no metering. It runs inside the suite's process on a
//! 2-worker runtime of its own, so that it shares the machine with the
//! clients as the Tollgate child process does. Like Tollgate's, its
//! sockets keep Nagle's algorithm on (only the clients set TCP_NODELAY),
//! and it keeps tungstenite's default buffers.

use std::net::{Ipv4Addr, SocketAddr};

use anyhow::{Context, Result};
use futures::{StreamExt, TryStreamExt, future};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::runtime::Runtime;

/// Tollgate's worker count on this machine's two cores (tokio's default).
const WORKERS: usize = 2;

/// Pending connections the kernel may queue, as Tollgate's listener asks
/// for: with 128, a burst of upgrades would be slowed by SYN retries here
/// and not there.
const LISTEN_BACKLOG: u32 = 4096;

pub struct Baseline {
    addr: SocketAddr,
    runtime: Option<Runtime>,
}

impl Baseline {
    pub fn start() -> Result<Baseline> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(WORKERS)
            .thread_name("baseline")
            .enable_all()
            .build()?;
        let listener = {
            // The listener must belong to the baseline's runtime, not the
            // clients' one this is called from.
            let _context = runtime.enter();
            bind().context("the baseline cannot listen")?
        };
        let addr = listener.local_addr()?;
        runtime.spawn(accept(listener));
        Ok(Baseline { addr, runtime: Some(runtime) })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for Baseline {
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

fn bind() -> std::io::Result<TcpListener> {
    let socket = TcpSocket::new_v4()?;
    socket.set_reuseaddr(true)?;
    socket.bind(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)))?;
    socket.listen(LISTEN_BACKLOG)
}

async fn accept(listener: TcpListener) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => drop(tokio::spawn(echo(stream))),
            // Out of file descriptors, say: the clients see it as a
            // connection that never completes.
            Err(_) => tokio::time::sleep(std::time::Duration::from_millis(50)).await,
        }
    }
}

/// Upgrades any request and sends every data message back. Forwarding
/// flushes whenever nothing more is ready to read, as a relay should.
async fn echo(stream: TcpStream) {
    let Ok(ws) = tokio_tungstenite::accept_async(stream).await else { return };
    let (sink, stream) = ws.split();
    let data = stream.try_filter(|message| future::ready(message.is_binary() || message.is_text()));
    let _ = data.forward(sink).await;
}
