//! Operating-system plumbing for the benchmark: a network namespace, child processes
//! that are always stopped, the kernel's BPF statistics switch, readiness probes.
//!
//! Every resource is a guard whose Drop undoes it, so an error or a panic halfway
//! leaves the machine as it was.

use std::fs::{self, File};
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::util;

const NETNS_DIR: &str = "/run/netns";

/// A named network namespace (`ip netns add`), deleted on drop.
pub struct NetNs {
    name: String,
    file: File,
}

impl NetNs {
    pub fn create(name: &str) -> Result<Self> {
        util::run_checked(
            Command::new("ip").args(["netns", "add", name]),
            "creating the benchmark's network namespace",
        )?;
        // From here on the namespace exists, so the guard owns it even if the rest fails.
        let path = Path::new(NETNS_DIR).join(name);
        let file = match File::open(&path) {
            Ok(file) => file,
            Err(err) => {
                delete_netns(name);
                return Err(err).with_context(|| format!("opening {}", path.display()));
            }
        };
        let ns = NetNs { name: name.to_owned(), file };
        util::run_checked(
            Command::new("ip").args(["-n", name, "link", "set", "lo", "up"]),
            "bringing lo up in the benchmark's namespace",
        )?;
        Ok(ns)
    }

    /// A command that runs in this namespace.
    ///
    /// It enters the namespace with setns(2) rather than through `ip netns exec`,
    /// because `ip netns exec` also remounts /sys, which hides /sys/kernel/tracing from
    /// the observer (its classic tracepoints need tracefs).
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let fd = self.file.as_raw_fd();
        let mut cmd = Command::new(program);
        // SAFETY: setns and prctl are plain system calls, safe between fork and exec; the
        // fd stays open in the child until exec because the parent holds it.
        unsafe {
            cmd.pre_exec(move || {
                if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // If xtask is killed outright (no guard runs), the observer and iperf3
                // must not outlive it; the namespace is swept by the next run.
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        cmd
    }

    /// Runs `f` on a thread that has entered this namespace, so sockets it opens live
    /// there; the calling thread stays where it was.
    pub fn run_in<T: Send>(&self, f: impl FnOnce() -> T + Send) -> Result<T> {
        thread::scope(|scope| {
            scope
                .spawn(move || {
                    self.enter_this_thread()?;
                    Ok(f())
                })
                .join()
                .map_err(|_| anyhow::anyhow!("a thread inside the benchmark namespace panicked"))?
        })
    }

    /// Moves the calling thread (only it) into this namespace: for threads that live
    /// there for a whole measurement, such as the load generator's.
    pub fn enter_this_thread(&self) -> Result<()> {
        // SAFETY: plain system call on an fd this struct keeps open; it only changes
        // the calling thread's namespace.
        if unsafe { libc::setns(self.file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return Err(std::io::Error::last_os_error()).context("entering the benchmark's network namespace");
        }
        Ok(())
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        delete_netns(&self.name);
    }
}

fn delete_netns(name: &str) {
    match Command::new("ip").args(["netns", "del", name]).status() {
        Ok(s) if s.success() => {}
        Ok(s) => eprintln!("xtask: warning: `ip netns del {name}` failed ({s})"),
        Err(e) => eprintln!("xtask: warning: could not run `ip netns del {name}`: {e}"),
    }
}

/// Deletes namespaces `<prefix><pid>` left by benchmark runs that were killed before
/// their guards ran (SIGKILL, a closed terminal).
pub fn sweep_stale_netns(prefix: &str) {
    let Ok(entries) = fs::read_dir(NETNS_DIR) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = name.strip_prefix(prefix).and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        if !is_running_xtask(&stat) {
            eprintln!("xtask: deleting stale namespace {name}");
            delete_netns(&name);
        }
    }
}

/// Whether a /proc/PID/stat line is a live (not zombie) xtask process: its pid may
/// have been reused by anything else since.
fn is_running_xtask(stat: &str) -> bool {
    let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
        return false;
    };
    let comm = &stat[open + 1..close];
    let state = stat[close + 1..].split_whitespace().next();
    comm == "xtask" && !matches!(state, Some("Z" | "X") | None)
}

/// A child process that is stopped (SIGTERM, then SIGKILL) when dropped.
pub struct Proc {
    what: String,
    child: Option<Child>,
    pub log: Option<PathBuf>,
}

impl Proc {
    /// Starts `cmd` with stdin closed and its output appended to `log` (or discarded).
    pub fn spawn(mut cmd: Command, what: &str, log: Option<&Path>) -> Result<Self> {
        let (out, err) = match log {
            Some(path) => {
                let file = fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .with_context(|| format!("opening {}", path.display()))?;
                (Stdio::from(file.try_clone()?), Stdio::from(file))
            }
            None => (Stdio::null(), Stdio::null()),
        };
        cmd.stdin(Stdio::null()).stdout(out).stderr(err);
        eprintln!("+ {} &", util::show(&cmd));
        let child = cmd.spawn().with_context(|| format!("starting {what}: `{}`", util::show(&cmd)))?;
        Ok(Proc { what: what.to_owned(), child: Some(child), log: log.map(Path::to_path_buf) })
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// The exit status if it has already exited.
    pub fn exited(&mut self) -> Result<Option<ExitStatus>> {
        match self.child.as_mut() {
            Some(child) => Ok(child.try_wait()?),
            None => bail!("{} was already stopped", self.what),
        }
    }

    /// SIGTERM, then SIGKILL after `grace`; returns how it ended.
    pub fn stop(&mut self, grace: Duration) -> Result<ExitStatus> {
        let Some(mut child) = self.child.take() else {
            bail!("{} was already stopped", self.what);
        };
        if let Some(status) = child.try_wait()? {
            return Ok(status);
        }
        // SAFETY: kill(2) on our own child's pid, which cannot have been reaped (and so
        // reused) because only this struct waits for it.
        unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if let Some(status) = child.try_wait()? {
                return Ok(status);
            }
            thread::sleep(Duration::from_millis(50));
        }
        eprintln!("xtask: warning: {} ignored SIGTERM for {grace:?}; killing it", self.what);
        child.kill()?;
        Ok(child.wait()?)
    }

    /// The last lines of its log, for error messages.
    pub fn log_tail(&self, lines: usize) -> String {
        let Some(path) = &self.log else {
            return String::new();
        };
        let text = fs::read_to_string(path).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        let tail = all[all.len().saturating_sub(lines)..].join("\n");
        format!("last lines of {}:\n{tail}", path.display())
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if self.child.is_some()
            && let Err(err) = self.stop(Duration::from_secs(5))
        {
            eprintln!("xtask: warning: stopping {}: {err:#}", self.what);
        }
    }
}

const BPF_STATS: &str = "/proc/sys/kernel/bpf_stats_enabled";

/// kernel.bpf_stats_enabled=1 while it lives; the previous value is put back on drop.
///
/// The previous value is also kept in a file until it is restored: a run killed outright
/// leaves 1 behind, and the next run must not take that 1 for the machine's setting.
pub struct BpfStats {
    previous: String,
    stash: PathBuf,
}

impl BpfStats {
    pub fn enable(stash: &Path) -> Result<Self> {
        Self::restore_stale(stash)?;
        let previous = Self::current()?;
        fs::write(stash, &previous).with_context(|| format!("writing {}", stash.display()))?;
        fs::write(BPF_STATS, "1").with_context(|| format!("writing 1 to {BPF_STATS}"))?;
        Ok(BpfStats { previous, stash: stash.to_path_buf() })
    }

    /// Puts back the value a run killed while it held the switch left in `stash`.
    pub fn restore_stale(stash: &Path) -> Result<()> {
        if let Ok(stashed) = fs::read_to_string(stash) {
            fs::write(BPF_STATS, stashed.trim()).with_context(|| format!("restoring {BPF_STATS}"))?;
            fs::remove_file(stash).with_context(|| format!("removing {}", stash.display()))?;
        }
        Ok(())
    }

    /// Whether the host has the statistics switched on.
    pub fn on() -> Result<bool> {
        Ok(Self::current()? != "0")
    }

    /// The switch's value now.
    fn current() -> Result<String> {
        Ok(fs::read_to_string(BPF_STATS).with_context(|| format!("reading {BPF_STATS}"))?.trim().to_owned())
    }
}

impl Drop for BpfStats {
    fn drop(&mut self) {
        match fs::write(BPF_STATS, &self.previous) {
            Ok(()) => {
                let _ = fs::remove_file(&self.stash);
            }
            Err(err) => eprintln!("xtask: warning: could not restore {BPF_STATS} to {}: {err}", self.previous),
        }
    }
}

/// Whether a /proc/net/tcp or tcp6 table has a socket listening on `port`.
pub fn tcp_table_listens(table: &str, port: u16) -> bool {
    const LISTEN: &str = "0A";
    table.lines().skip(1).any(|line| {
        let mut cols = line.split_whitespace();
        let local = cols.nth(1);
        let state = cols.nth(1);
        let local_port = local.and_then(|l| l.rsplit_once(':')).and_then(|(_, p)| u16::from_str_radix(p, 16).ok());
        local_port == Some(port) && state == Some(LISTEN)
    })
}

/// Waits until `proc` (in its own namespace, as /proc/PID/net shows it) listens on TCP
/// `port`, without connecting: a stray connection would be taken for a test by iperf3.
pub fn wait_listening(proc: &mut Proc, port: u16, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    let net = Path::new("/proc").join(proc.pid().to_string()).join("net");
    loop {
        if let Some(status) = proc.exited()? {
            bail!("{} exited ({status}) before listening on port {port}", proc.what);
        }
        let listens = ["tcp", "tcp6"]
            .iter()
            .any(|t| fs::read_to_string(net.join(t)).is_ok_and(|table| tcp_table_listens(&table, port)));
        if listens {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!("{} did not listen on port {port} within {timeout:?}", proc.what);
        }
        check_interrupted()?;
        thread::sleep(Duration::from_millis(50));
    }
}

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// Turns SIGINT and SIGTERM into a flag that the benchmark loop checks, so an
/// interrupted run still goes through the guards' cleanup (namespace, sysctl).
pub fn catch_interrupts() {
    for sig in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
        unsafe { libc::signal(sig, on_signal as *const () as libc::sighandler_t) };
    }
}

pub fn check_interrupted() -> Result<()> {
    if INTERRUPTED.load(Ordering::SeqCst) {
        bail!("interrupted");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stale_namespace_owner_check() {
        assert!(is_running_xtask("9557 (xtask) S 1 9557 9557 0 -1 4194560"));
        assert!(!is_running_xtask("9557 (xtask) Z 1 9557 9557 0 -1 4194560"));
        assert!(!is_running_xtask("9557 (bash) S 1 9557 9557 0 -1 4194560"));
        assert!(!is_running_xtask("9557 (x) (xtask) S 1"));
        assert!(!is_running_xtask(""));
        let own = fs::read_to_string("/proc/self/stat").unwrap();
        // The test binary is named xtask-<hash>, not xtask.
        assert!(!is_running_xtask(&own));
    }

    #[test]
    fn finds_listening_sockets_in_proc_net_tcp() {
        let table = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n\
   0: 0100007F:1451 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1234 1 0000000000000000 100 0 0 10 0\n\
   1: 0100007F:A2C4 0100007F:1451 01 00000000:00000000 00:00000000 00000000     0        0 1235 1 0000000000000000 20 4 30 10 -1\n";
        assert!(tcp_table_listens(table, 5201));
        // An established connection to the port is not a listener.
        assert!(!tcp_table_listens(table, 41668));
        assert!(!tcp_table_listens(table, 80));
        assert!(!tcp_table_listens("", 5201));
    }

    #[test]
    fn proc_guard_stops_its_child() {
        let mut cmd = Command::new("sleep");
        cmd.arg("30");
        let mut p = Proc::spawn(cmd, "sleep", None).unwrap();
        assert!(p.exited().unwrap().is_none());
        let status = p.stop(Duration::from_secs(5)).unwrap();
        assert!(!status.success());
        assert!(p.stop(Duration::from_secs(1)).is_err());
    }
}
