//! The `tollgate` binary as a child process, for what only a real process
//! shows: signals, `kill -9`, standard output and every log line.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub struct Process {
    child: Child,
    pub base: String,
    pub ws_base: String,
    stdout: Arc<Mutex<Vec<String>>>,
    stderr: Arc<Mutex<Vec<String>>>,
}

/// Starts `tollgate serve` on 127.0.0.1:0 with the database `db` and the
/// extra arguments, and waits until it logs the address it listens on.
pub fn spawn(db: &Path, args: &[&str], rust_log: &str) -> Process {
    spawn_with_env(db, args, rust_log, &[])
}

/// As [`spawn`], with these environment variables set.
pub fn spawn_with_env(db: &Path, args: &[&str], rust_log: &str, env: &[(&str, &str)]) -> Process {
    let mut child = Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .args(["serve", "--listen", "127.0.0.1:0", "--db"])
        .arg(db)
        .args(args)
        .env("RUST_LOG", rust_log)
        .envs(env.iter().copied())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the binary starts");
    let stdout = collect(child.stdout.take().unwrap());
    let stderr = collect(child.stderr.take().unwrap());
    let addr = wait_for_address(&stderr, &mut child);
    Process {
        child,
        base: format!("http://{addr}"),
        ws_base: format!("ws://{addr}"),
        stdout,
        stderr,
    }
}

impl Process {
    /// The API key printed on standard output by a first start. Standard
    /// output is read on a thread of its own, so the key may arrive a little
    /// after the address was logged: this waits up to five seconds for it.
    pub fn api_key(&self) -> String {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            if let Some(key) = self.printed_key() {
                return key;
            }
            assert!(Instant::now() < deadline, "no API key printed: {:?}", self.stdout());
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// The API key printed on standard output, if this start printed one.
    pub fn printed_key(&self) -> Option<String> {
        let lines = self.stdout.lock().unwrap();
        lines.iter().map(|l| l.trim()).find(|l| l.starts_with("tgk_")).map(str::to_owned)
    }

    pub fn stdout(&self) -> Vec<String> {
        self.stdout.lock().unwrap().clone()
    }

    pub fn stderr(&self) -> Vec<String> {
        self.stderr.lock().unwrap().clone()
    }

    /// Waits up to `within` for a line of standard error that contains
    /// `text`, as one logged a moment after what a test saw happen may come
    /// later; every line so far if none does.
    pub fn logged(&self, text: &str, within: Duration) -> Result<(), String> {
        let deadline = Instant::now() + within;
        loop {
            let lines = self.stderr();
            if lines.iter().any(|line| line.contains(text)) {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(lines.join("\n"));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn signal(&self, name: &str) {
        let pid = self.child.id().to_string();
        let status = Command::new("kill").args(["-s", name, &pid]).status().unwrap();
        assert!(status.success(), "kill -s {name} failed");
    }

    /// `kill -9`: no chance to record anything.
    pub fn kill(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    /// Waits for the process to exit on its own, at most `limit`.
    pub fn wait(mut self, limit: Duration) -> (ExitStatus, Vec<String>) {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                // Let the readers drain what was written last.
                std::thread::sleep(Duration::from_millis(100));
                return (status, self.stderr());
            }
            assert!(Instant::now() < deadline, "the server did not exit within {limit:?}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs `tollgate` with `args` to completion, killing it after 20 s:
/// (status, stdout, stderr).
pub fn run_binary(args: &[&str], db: &PathBuf) -> (ExitStatus, String, String) {
    run_binary_with_env(args, db, &[])
}

/// As [`run_binary`], with these environment variables set.
pub fn run_binary_with_env(
    args: &[&str],
    db: &PathBuf,
    env: &[(&str, &str)],
) -> (ExitStatus, String, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .args(args)
        .arg("--db")
        .arg(db)
        .envs(env.iter().copied())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the binary runs");
    let deadline = Instant::now() + Duration::from_secs(20);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let output = child.wait_with_output().unwrap();
    let text = |bytes: Vec<u8>| String::from_utf8(bytes).unwrap();
    (output.status, text(output.stdout), text(output.stderr))
}

fn collect(stream: impl std::io::Read + Send + 'static) -> Arc<Mutex<Vec<String>>> {
    let lines = Arc::new(Mutex::new(Vec::new()));
    let sink = lines.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(stream).lines() {
            let Ok(line) = line else { break };
            sink.lock().unwrap().push(line);
        }
    });
    lines
}

fn wait_for_address(stderr: &Arc<Mutex<Vec<String>>>, child: &mut Child) -> String {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let found = stderr.lock().unwrap().iter().find_map(|line| {
            let (_, rest) = line.split_once("listening address=")?;
            Some(rest.split_whitespace().next()?.to_owned())
        });
        if let Some(addr) = found {
            return addr;
        }
        if let Some(status) = child.try_wait().unwrap() {
            panic!("the server exited with {status}: {:?}", stderr.lock().unwrap());
        }
        assert!(Instant::now() < deadline, "the server never said where it listens");
        std::thread::sleep(Duration::from_millis(10));
    }
}
