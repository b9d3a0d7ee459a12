//! Small shared pieces: bounded waiting, bounded child processes, temp dirs.
//!
//! Every wait in this crate goes through [`wait_until`] or [`wait_child`] so
//! that a hung observer or proxy turns into a test failure with a message
//! instead of a CI job that never ends.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};

/// Polls `probe` every `interval` until it yields `Some`, fails, or `timeout`
/// passes.
///
/// `what` names the awaited condition so a timeout reads as a sentence in the
/// test output. `probe` errors end the wait at once: they mean the thing being
/// waited on is broken, not just slow.
///
/// Where the tests run slower than real hardware ([`time_scale`] > 1, the
/// qemu matrix), the pause grows by half after each miss, up to `interval`
/// times the scale: a probe is often a whole scrape, which costs the emulated
/// machine tens of milliseconds of the CPU that the awaited work needs.
pub fn wait_until<T>(
    what: &str,
    timeout: Duration,
    interval: Duration,
    mut probe: impl FnMut() -> Result<Option<T>>,
) -> Result<T> {
    let deadline = Instant::now() + timeout;
    let longest = interval * time_scale();
    let mut pause = interval;
    loop {
        if let Some(v) = probe().with_context(|| format!("while waiting for {what}"))? {
            return Ok(v);
        }
        let now = Instant::now();
        if now >= deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        thread::sleep(pause.min(deadline - now));
        pause = (pause * 3 / 2).min(longest);
    }
}

/// How many times slower than real hardware this machine runs the tests:
/// `OBSERVER_TEST_TIME_SCALE`, which `cargo xtask kernels` sets in its VMs
/// (software emulation runs code 5 to 20 times slower); 1 when unset.
pub fn time_scale() -> u32 {
    std::env::var("OBSERVER_TEST_TIME_SCALE").ok().and_then(|v| v.parse().ok()).filter(|&n| n > 0).unwrap_or(1)
}

/// A timing bound of a test, `d` on real hardware, stretched by [`time_scale`].
/// Exact assertions (bytes, counts) are never scaled.
pub fn scaled(d: Duration) -> Duration {
    d * time_scale()
}

/// Waits for `child` to exit, at most `timeout`; `Ok(None)` if still running.
///
/// std offers no timed wait, and a blocking `wait()` on a stuck process would
/// hang the test run, so this polls `try_wait` at a short interval.
pub fn wait_child(child: &mut Child, timeout: Duration) -> Result<Option<ExitStatus>> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(st) = child.try_wait().context("waitpid")? {
            return Ok(Some(st));
        }
        if Instant::now() >= deadline {
            return Ok(None);
        }
        thread::sleep(Duration::from_millis(5));
    }
}

/// Sends `sig` to `pid`. Errors (e.g. the process is already gone) are
/// returned, not hidden, so callers can decide whether they matter.
pub fn signal(pid: u32, sig: libc::c_int) -> std::io::Result<()> {
    let pid = libc::pid_t::try_from(pid).map_err(|_| std::io::Error::other(format!("pid {pid} out of range")))?;
    // SAFETY: kill(2) has no memory-safety preconditions.
    if unsafe { libc::kill(pid, sig) } == 0 { Ok(()) } else { Err(std::io::Error::last_os_error()) }
}

/// Stops `child`: SIGTERM, then SIGKILL if it is still alive after `grace`.
///
/// Used from `Drop` impls, so it never fails; it returns the exit status if
/// it saw one, for callers that want to report it.
pub fn terminate(child: &mut Child, grace: Duration) -> Option<ExitStatus> {
    if let Ok(Some(st)) = child.try_wait() {
        return Some(st);
    }
    let _ = signal(child.id(), libc::SIGTERM);
    if let Ok(Some(st)) = wait_child(child, grace) {
        return Some(st);
    }
    let _ = child.kill();
    wait_child(child, Duration::from_secs(5)).ok().flatten()
}

/// Runs `cmd` to completion with captured stdout/stderr, killing it if it
/// takes longer than `timeout`.
///
/// Output is drained on separate threads while we poll for exit, otherwise a
/// chatty child could fill its pipe and deadlock against our timed wait.
pub fn run_with_timeout(cmd: &mut Command, timeout: Duration) -> Result<Output> {
    let desc = format!("{cmd:?}");
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("spawning {desc}"))?;
    let drain = |r: Option<Box<dyn Read + Send>>| {
        thread::spawn(move || {
            let mut buf = Vec::new();
            if let Some(mut r) = r {
                let _ = r.read_to_end(&mut buf);
            }
            buf
        })
    };
    let out_t = drain(child.stdout.take().map(|s| Box::new(s) as Box<dyn Read + Send>));
    let err_t = drain(child.stderr.take().map(|s| Box::new(s) as Box<dyn Read + Send>));
    let status = match wait_child(&mut child, timeout)? {
        Some(st) => st,
        None => {
            let _ = child.kill();
            let _ = wait_child(&mut child, Duration::from_secs(5));
            // Grandchildren may still hold the pipes; do not join the drains.
            bail!("{desc} did not finish within {timeout:?}; killed");
        }
    };
    let stdout = out_t.join().unwrap_or_default();
    let stderr = err_t.join().unwrap_or_default();
    Ok(Output { status, stdout, stderr })
}

/// A private scratch directory, removed on drop.
///
/// Set `OBS_TEST_KEEP_TMP=1` to keep it (its path is printed) when debugging
/// a failure after the fact. Hand-rolled to avoid a `tempfile` dependency for
/// twenty lines.
#[derive(Debug)]
pub struct TempDir {
    path: PathBuf,
}

impl TempDir {
    /// Creates `$TMPDIR/observer-tests-<tag>-<pid>-<seq>-<nanos>`.
    pub fn new(tag: &str) -> Result<Self> {
        static SEQ: AtomicU64 = AtomicU64::new(0);
        let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.subsec_nanos()).unwrap_or(0);
        let path = std::env::temp_dir().join(format!(
            "observer-tests-{tag}-{}-{}-{nanos}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&path).with_context(|| format!("creating {}", path.display()))?;
        Ok(Self { path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if std::env::var_os("OBS_TEST_KEEP_TMP").is_some() {
            eprintln!("keeping {}", self.path.display());
            return;
        }
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// Whether the test process may create namespaces, load BPF, etc.
pub fn is_root() -> bool {
    // SAFETY: geteuid(2) cannot fail and touches no memory.
    unsafe { libc::geteuid() == 0 }
}

/// The workspace root, derived from this crate's manifest dir at compile time
/// (the tests crate lives directly under it).
pub fn workspace_root() -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    dir.parent().map(Path::to_path_buf).unwrap_or_else(|| dir.to_path_buf())
}
