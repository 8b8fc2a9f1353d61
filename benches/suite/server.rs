//! The `tollgate` binary as a child process: started on 127.0.0.1:0 with a
//! database of the run's own and otherwise its defaults, its API key read
//! from standard output, its output drained by threads, its memory and CPU
//! time read from `/proc`, and stopped with SIGTERM at the end. A second
//! server may share the first's database (PostgreSQL) and its key.

use std::collections::VecDeque;
use std::ffi::OsString;
use std::io::{BufRead, BufReader, Read};
use std::net::{Ipv4Addr, SocketAddr};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use rustix::process::{Pid, Signal, kill_process};
use tokio::time::{Instant, sleep};

use crate::suite::api::Api;
use crate::suite::procfs;

/// How long the server may take from its start to listening, a debug
/// build on a busy machine included.
const START_WAIT: Duration = Duration::from_secs(60);

/// How long the server may take to stop after SIGTERM: it closes every
/// session still open with 1001 and records their last usage first.
const STOP_WAIT: Duration = Duration::from_secs(60);

/// Lines of each stream kept to explain a failure; older ones are dropped.
const KEPT_LINES: usize = 200;

/// At `warn`, logging to a pipe costs the server next to nothing; at its
/// default `info` it writes two lines per session.
const LOG_FILTER: &str = "warn";

/// How the server is started, besides its defaults.
pub struct ServerOptions {
    /// `--db`: a SQLite file, or a PostgreSQL URL.
    pub db: OsString,
    /// Longer than any session of the run, so that none ends with 4004.
    pub max_session_seconds: u64,
}

pub struct Server {
    process: Process,
    pub pid: u32,
    pub addr: SocketAddr,
    pub api: Api,
    stderr: Output,
}

impl Server {
    /// Starts the server on a new database and waits until it listens and
    /// has printed its key.
    pub async fn start(options: &ServerOptions) -> Result<Server> {
        Server::launch(options, Ready::PrintedKey).await
    }

    /// Starts another server on the database `first` uses (a PostgreSQL
    /// one). It finds the project there and prints no key, so it is given
    /// `first`'s, and is ready once `/healthz` answers: it listens before
    /// it has opened the database.
    pub async fn start_beside(first: &Server, options: &ServerOptions) -> Result<Server> {
        Server::launch(options, Ready::Healthy(first.api.clone())).await
    }

    async fn launch(options: &ServerOptions, ready: Ready) -> Result<Server> {
        let mut process = Process::spawn(options)?;
        let stdout = Output::drain(process.0.stdout.take().context("no stdout")?);
        let stderr = Output::drain(process.0.stderr.take().context("no stderr")?);
        let (api, addr) = wait_until_ready(&mut process, ready, &stdout, &stderr).await?;
        let pid = process.0.id();
        Ok(Server { process, pid, addr, api, stderr })
    }

    pub fn rss_kib(&self) -> Result<u64> {
        procfs::rss_kib(self.pid)
    }

    pub fn cpu_time(&self) -> Result<Duration> {
        procfs::cpu_time(self.pid)
    }

    pub fn open_files_limit(&self) -> Result<u64> {
        procfs::open_files_limit(self.pid)
    }

    /// Whether the server has logged EMFILE (it cannot accept then).
    pub fn ran_out_of_files(&self) -> bool {
        self.stderr.0.lock().unwrap().out_of_files
    }

    /// Sends SIGTERM and waits for a clean exit.
    pub async fn stop(mut self) -> Result<()> {
        kill_process(Pid::from_child(&self.process.0), Signal::TERM)?;
        let deadline = Instant::now() + STOP_WAIT;
        let status = loop {
            if let Some(status) = self.process.0.try_wait()? {
                break status;
            }
            if Instant::now() > deadline {
                bail!("the server did not stop within {STOP_WAIT:?} of SIGTERM");
            }
            sleep(Duration::from_millis(20)).await;
        };
        if !status.success() {
            bail!("the server exited with {status}: {}", self.stderr.tail());
        }
        Ok(())
    }
}

/// The child process, killed if it is dropped still running.
struct Process(Child);

impl Process {
    fn spawn(options: &ServerOptions) -> Result<Process> {
        let mut command = Command::new(env!("CARGO_BIN_EXE_tollgate"));
        command
            .args(["serve", "--listen", "127.0.0.1:0", "--db"])
            .arg(&options.db)
            .args(["--max-session-seconds", &options.max_session_seconds.to_string()])
            .env("RUST_LOG", LOG_FILTER)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        // Settings of the caller's own server must not leak into this one.
        for (name, _) in std::env::vars_os() {
            if name.to_string_lossy().starts_with("TOLLGATE_") {
                command.env_remove(name);
            }
        }
        Ok(Process(command.spawn().context("cannot start the tollgate binary")?))
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// What shows that a server has started.
enum Ready {
    /// Its key on standard output (printed once the database is open).
    PrintedKey,
    /// `/healthz` answering with this API's key, which it shares.
    Healthy(Api),
}

/// Waits for the listening socket, then for what shows the server ready;
/// returns its API and address.
async fn wait_until_ready(
    process: &mut Process,
    ready: Ready,
    stdout: &Output,
    stderr: &Output,
) -> Result<(Api, SocketAddr)> {
    let deadline = Instant::now() + START_WAIT;
    loop {
        if let Some(status) = process.0.try_wait()? {
            bail!("the server exited with {status}: {}", stderr.tail());
        }
        if let Some(port) = procfs::listening_port(process.0.id())? {
            let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
            if let Some(api) = ready.api(addr, stdout).await? {
                return Ok((api, addr));
            }
        }
        if Instant::now() > deadline {
            bail!("the server was not ready within {START_WAIT:?}: {}", stderr.tail());
        }
        sleep(Duration::from_millis(20)).await;
    }
}

impl Ready {
    /// The server's API at `addr` once it is ready, `None` until then.
    async fn api(&self, addr: SocketAddr, stdout: &Output) -> Result<Option<Api>> {
        match self {
            Ready::PrintedKey => {
                let key = stdout.find(|line| line.starts_with("tgk_"));
                key.map(|key| Api::new(addr, key)).transpose()
            }
            Ready::Healthy(first) => {
                let api = first.at(addr)?;
                Ok(api.healthy().await.then_some(api))
            }
        }
    }
}

/// The last lines of one of the child's streams, read by a thread of its
/// own so that the child never blocks on a full pipe.
#[derive(Clone, Default)]
struct Output(Arc<Mutex<Lines>>);

#[derive(Default)]
struct Lines {
    kept: VecDeque<String>,
    out_of_files: bool,
}

impl Output {
    fn drain(stream: impl Read + Send + 'static) -> Output {
        let output = Output::default();
        let sink = output.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stream).lines() {
                let Ok(line) = line else { break };
                sink.push(line);
            }
        });
        output
    }

    fn push(&self, line: String) {
        let mut lines = self.0.lock().unwrap();
        lines.out_of_files |= line.contains("Too many open files");
        if lines.kept.len() == KEPT_LINES {
            lines.kept.pop_front();
        }
        lines.kept.push_back(line);
    }

    fn find(&self, matches: impl Fn(&str) -> bool) -> Option<String> {
        let lines = self.0.lock().unwrap();
        lines.kept.iter().map(|line| line.trim()).find(|line| matches(line)).map(str::to_owned)
    }

    fn tail(&self) -> String {
        let lines = self.0.lock().unwrap();
        let last: Vec<&str> = lines.kept.iter().rev().take(10).map(String::as_str).collect();
        last.into_iter().rev().collect::<Vec<_>>().join("\n")
    }
}
