//! What the kernel says about a process under `/proc`: its resident memory,
//! the CPU time it has used, its open files and their limit, the TCP port
//! it listens on, its name, its parent and its children.

use std::fs;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, bail};

fn read(pid: u32, file: &str) -> Result<String> {
    let path = PathBuf::from(format!("/proc/{pid}/{file}"));
    fs::read_to_string(&path).with_context(|| format!("cannot read {}", path.display()))
}

/// Resident set size in KiB (`VmRSS` of `/proc/<pid>/status`).
pub fn rss_kib(pid: u32) -> Result<u64> {
    let status = read(pid, "status")?;
    let line = status.lines().find_map(|line| line.strip_prefix("VmRSS:"));
    let Some(line) = line else { bail!("process {pid} has no VmRSS") };
    let kib = line.trim().trim_end_matches("kB").trim();
    kib.parse().with_context(|| format!("VmRSS of {pid} is {line:?}"))
}

/// User plus system CPU time (`utime` and `stime` of `/proc/<pid>/stat`).
/// The kernel counts it in clock ticks, usually 10 ms each, so a share of
/// CPU over a window of a few seconds is only good to a few tenths of a
/// percent.
pub fn cpu_time(pid: u32) -> Result<Duration> {
    clock_ticks(&stat(pid)?, &[14, 15])
}

/// [`cpu_time`], and that of the process's children that have ended and
/// been waited for (`cutime` and `cstime`), which the kernel adds to the
/// parent's as it reaps each one.
pub fn cpu_time_with_reaped(pid: u32) -> Result<Duration> {
    clock_ticks(&stat(pid)?, &[14, 15, 16, 17])
}

/// The parent's pid (`ppid` of `/proc/<pid>/stat`).
pub fn parent(pid: u32) -> Result<u32> {
    Ok(field(&stat(pid)?, 4)?.try_into()?)
}

/// The command's name (`/proc/<pid>/comm`), such as `postgres`.
pub fn command(pid: u32) -> Result<String> {
    Ok(read(pid, "comm")?.trim_end().to_owned())
}

/// The processes whose parent is `pid`, as they are listed at this
/// instant: one may end before it is looked at.
pub fn children(pid: u32) -> Result<Vec<u32>> {
    let entries = fs::read_dir("/proc").context("cannot list /proc")?;
    let pids = entries.filter_map(|entry| entry.ok()?.file_name().to_str()?.parse().ok());
    Ok(pids.filter(|&child: &u32| parent(child).is_ok_and(|ppid| ppid == pid)).collect())
}

/// The fields of `/proc/<pid>/stat` from field 3 (the state) on. The
/// command name before them, in parentheses, may itself hold spaces.
fn stat(pid: u32) -> Result<Vec<String>> {
    let stat = read(pid, "stat")?;
    let Some((_, rest)) = stat.rsplit_once(')') else { bail!("cannot parse {stat:?}") };
    Ok(rest.split_whitespace().map(str::to_owned).collect())
}

/// Field `number` of `/proc/<pid>/stat`, counted from 1 as proc(5) does.
fn field(fields: &[String], number: usize) -> Result<u64> {
    let text = fields.get(number - 3).context("/proc/<pid>/stat is too short")?;
    Ok(text.parse()?)
}

/// The sum of the fields `numbers`, each a count of clock ticks.
fn clock_ticks(fields: &[String], numbers: &[usize]) -> Result<Duration> {
    let mut ticks = 0;
    for &number in numbers {
        ticks += field(fields, number)?;
    }
    let per_second = rustix::param::clock_ticks_per_second();
    Ok(Duration::from_secs_f64(ticks as f64 / per_second as f64))
}

/// The soft limit on open files (`Max open files` of `/proc/<pid>/limits`).
pub fn open_files_limit(pid: u32) -> Result<u64> {
    let limits = read(pid, "limits")?;
    let line = limits.lines().find_map(|line| line.strip_prefix("Max open files"));
    let Some(soft) = line.and_then(|rest| rest.split_whitespace().next()) else {
        bail!("process {pid} shows no open-files limit")
    };
    if soft == "unlimited" {
        return Ok(u64::MAX);
    }
    soft.parse().with_context(|| format!("open-files limit of {pid} is {soft:?}"))
}

/// How many files the process holds open (the entries of `/proc/<pid>/fd`).
pub fn open_fds(pid: u32) -> Result<u64> {
    let dir = format!("/proc/{pid}/fd");
    let entries = fs::read_dir(&dir).with_context(|| format!("cannot list {dir}"))?;
    Ok(entries.count() as u64)
}

/// The port of a TCP socket of the process in the LISTEN state, if it has
/// one yet.
pub fn listening_port(pid: u32) -> Result<Option<u16>> {
    let inodes = socket_inodes(pid)?;
    let table = read(pid, "net/tcp")?;
    for line in table.lines().skip(1) {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let (Some(local), Some(state), Some(inode)) = (fields.get(1), fields.get(3), fields.get(9))
        else {
            continue;
        };
        if *state == LISTEN && inodes.iter().any(|ours| ours == inode) {
            let port = local.rsplit_once(':').map(|(_, port)| port).unwrap_or_default();
            return Ok(Some(u16::from_str_radix(port, 16)?));
        }
    }
    Ok(None)
}

/// The state column of `/proc/net/tcp` for a listening socket.
const LISTEN: &str = "0A";

/// The inodes of the process's sockets, from the `socket:[inode]` links of
/// its file descriptors.
fn socket_inodes(pid: u32) -> Result<Vec<String>> {
    let dir = format!("/proc/{pid}/fd");
    let entries = fs::read_dir(&dir).with_context(|| format!("cannot list {dir}"))?;
    let links = entries.filter_map(|entry| fs::read_link(entry.ok()?.path()).ok());
    let inodes = links.filter_map(|link| {
        let link = link.to_str()?.to_owned();
        Some(link.strip_prefix("socket:[")?.strip_suffix(']')?.to_owned())
    });
    Ok(inodes.collect())
}
