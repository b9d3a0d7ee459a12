//! Running the `observer` binary under test.

use std::fs::File;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::netns::NetNs;
use crate::prom::Metrics;
use crate::scrape::{Response, Scraper};
use crate::util::{TempDir, run_with_timeout, scaled, signal, terminate, wait_child};

/// Bound on attaching programs; generous because BTF parsing and
/// verification can take seconds on a small, busy CI machine.
pub const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// Bound for one-shot commands such as `observer check`.
pub const CLI_TIMEOUT: Duration = Duration::from_secs(30);
/// How long [`ObserverProcess::stop`] waits after SIGTERM before giving up.
pub const STOP_TIMEOUT: Duration = Duration::from_secs(5);

/// The binary under test: `$OBSERVER_BIN`, else
/// `<workspace>/target/release/observer`.
///
/// Not built on demand: the binary embeds eBPF objects that need a nightly
/// toolchain and bpf-linker, which is the build system's job, not the
/// test's.
pub fn observer_bin() -> PathBuf {
    match std::env::var_os("OBSERVER_BIN") {
        Some(p) if !p.is_empty() => PathBuf::from(p),
        _ => crate::util::workspace_root().join("target/release/observer"),
    }
}

/// `$OBSERVER_TEST_PROBES` (`auto`, `fentry`, `kprobe`, `tracepoint`): the hook
/// tier every [`ObserverProcess`] is started with (`--probes`), unless the test
/// passes its own. Set by `cargo xtask kernels` to run the session tests once
/// per tier on other kernels.
pub fn forced_probes() -> Option<String> {
    std::env::var("OBSERVER_TEST_PROBES").ok().filter(|t| !t.is_empty())
}

fn checked_bin() -> Result<PathBuf> {
    let bin = observer_bin();
    if !bin.is_file() {
        bail!("observer binary not found at {} (build it in release mode, or set OBSERVER_BIN)", bin.display());
    }
    Ok(bin)
}

/// Runs `observer <args>` to completion in the current network namespace,
/// capturing its output, killed after [`CLI_TIMEOUT`].
pub fn run_observer_cli(args: &[&str]) -> Result<Output> {
    run_with_timeout(Command::new(checked_bin()?).args(args), CLI_TIMEOUT)
}

/// Whether `observer check`, in the tier the tests force (`auto` if none),
/// gives `concern` a hook: a test of what only that concern measures skips
/// where it has none (UDP sessions without `sock_calls` before 6.3 in the
/// tracepoint tier, for one).
pub fn concern_hooked(concern: &str) -> Result<bool> {
    let probes = forced_probes().unwrap_or_else(|| "auto".to_string());
    let out = run_observer_cli(&["check", "--probes", &probes])?;
    let text = String::from_utf8_lossy(&out.stdout);
    let prefix = format!("concern {concern} ");
    let line = text
        .lines()
        .find(|l| l.starts_with(&prefix))
        .with_context(|| format!("observer check names no concern {concern}:\n{text}"))?;
    Ok(line.ends_with("(chosen)"))
}

/// Like [`run_observer_cli`], inside `ns`.
pub fn run_observer_cli_in(ns: &NetNs, args: &[&str]) -> Result<Output> {
    run_with_timeout(ns.command_setns(checked_bin()?).args(args), CLI_TIMEOUT)
}

/// How a [`ObserverProcess::stop`] went.
#[derive(Clone, Copy, Debug)]
pub struct Stopped {
    pub status: ExitStatus,
    /// From sending SIGTERM to seeing the exit.
    pub elapsed: Duration,
}

/// A running `observer run`, inside a network namespace, with its metrics
/// endpoint reachable through one keep-alive [`Scraper`] connection.
///
/// Started with only the network namespace switched (see
/// [`NetNs::command_setns`]): `ip netns exec` would hide tracefs and bpffs,
/// which the tracepoint probes need.
///
/// On drop: SIGTERM, SIGKILL after 3 s; if the thread is panicking, the
/// observer's log is printed so the failing test shows it.
pub struct ObserverProcess {
    ns: NetNs,
    child: Option<Child>,
    pid: u32,
    addr: SocketAddr,
    scraper: Scraper,
    log_path: PathBuf,
    command: String,
    _tmp: TempDir,
}

impl std::fmt::Debug for ObserverProcess {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ObserverProcess")
            .field("pid", &self.pid)
            .field("netns", &self.ns.name())
            .field("addr", &self.addr)
            .field("command", &self.command)
            .field("log", &self.log_path)
            .finish()
    }
}

impl ObserverProcess {
    /// Spawns `observer run --listen 127.0.0.1:<free port> <args>` in `ns`
    /// and waits (up to [`READY_TIMEOUT`]) for `/readyz` to answer 200.
    ///
    /// The readiness poll already uses the scraper's keep-alive connection,
    /// so that one connection is the only one a test's scrapes ever make
    /// (unless the observer closes it; see [`Scraper::connections_opened`]).
    /// `args` must not contain `--listen`.
    pub fn start(ns: &NetNs, args: &[&str]) -> Result<Self> {
        let mut p = Self::spawn(ns, args)?;
        p.wait_ready(READY_TIMEOUT)?;
        Ok(p)
    }

    /// Spawns without waiting for readiness: for tests that expect the
    /// observer to fail, or want to time start-up themselves.
    pub fn spawn(ns: &NetNs, args: &[&str]) -> Result<Self> {
        Self::spawn_bin(ns, &checked_bin()?, args)
    }

    /// [`ObserverProcess::spawn`] with an explicit binary (another build, or
    /// a stand-in when testing this harness).
    pub fn spawn_bin(ns: &NetNs, bin: &Path, args: &[&str]) -> Result<Self> {
        let port = ns.free_port(Ipv4Addr::LOCALHOST.into())?;
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
        let tmp = TempDir::new("observer")?;
        let log_path = tmp.path().join("observer.log");
        let log = File::create(&log_path).with_context(|| format!("creating {}", log_path.display()))?;
        let mut args: Vec<&str> = args.to_vec();
        let forced = forced_probes();
        if let Some(tier) = forced.as_deref()
            && !args.contains(&"--probes")
        {
            args.extend(["--probes", tier]);
        }
        // No state kept across tests: one test's pinned tables would be the
        // next one's sessions. Tests of restarts give their own directory.
        if !args.contains(&"--state-dir") {
            args.extend(["--state-dir", ""]);
        }
        let mut cmd = ns.command_setns(bin);
        cmd.arg("run").arg("--listen").arg(addr.to_string()).args(&args);
        let command = format!("{} run --listen {addr} {}", bin.display(), args.join(" "));
        cmd.stdin(Stdio::null()).stdout(log.try_clone()?).stderr(log);
        if std::env::var_os("RUST_BACKTRACE").is_none() {
            cmd.env("RUST_BACKTRACE", "1");
        }
        let child = cmd.spawn().with_context(|| format!("spawning {command}"))?;
        Ok(Self {
            ns: ns.clone(),
            pid: child.id(),
            child: Some(child),
            addr,
            scraper: Scraper::new(ns, addr),
            log_path,
            command,
            _tmp: tmp,
        })
    }

    /// Polls `/readyz` over the scraper connection until 200, failing early
    /// (with the log) if the process exits.
    pub fn wait_ready(&mut self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        let mut last;
        loop {
            if let Some(st) = self.try_status()? {
                bail!("observer exited ({st}) before becoming ready.\n{}", self.log_banner());
            }
            match self.scraper.get("/readyz") {
                Ok(r) if r.status == 200 => return Ok(()),
                Ok(r) => last = format!("/readyz answered {}: {}", r.status, r.text().trim()),
                Err(e) => {
                    last = format!("{e:#}");
                    self.scraper.disconnect();
                }
            }
            if Instant::now() >= deadline {
                bail!("observer not ready after {timeout:?} (last: {last}).\n{}", self.log_banner());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The exit status if it has exited, without waiting.
    pub fn try_status(&mut self) -> Result<Option<ExitStatus>> {
        match self.child.as_mut() {
            Some(c) => Ok(c.try_wait()?),
            None => bail!("observer already reaped"),
        }
    }

    /// Waits up to `timeout` for the process to exit on its own.
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<Option<ExitStatus>> {
        match self.child.as_mut() {
            Some(c) => wait_child(c, timeout),
            None => bail!("observer already reaped"),
        }
    }

    /// SIGTERM, then wait up to [`STOP_TIMEOUT`] ([`scaled`] under emulation,
    /// where a `--shutdown-timeout` given by the test is scaled too). The scrape connection is
    /// deliberately left open: Prometheus keeps its connections open too, and
    /// shutdown must not wait on them.
    pub fn stop(&mut self) -> Result<Stopped> {
        self.stop_with(libc::SIGTERM)
    }

    /// Like [`ObserverProcess::stop`] with another signal (e.g. SIGINT).
    pub fn stop_with(&mut self, sig: libc::c_int) -> Result<Stopped> {
        let Some(child) = self.child.as_mut() else { bail!("observer already stopped") };
        if let Some(st) = child.try_wait()? {
            bail!("observer had already exited ({st}) before the signal.\n{}", self.log_banner());
        }
        let t0 = Instant::now();
        signal(self.pid, sig).context("signalling observer")?;
        let limit = scaled(STOP_TIMEOUT);
        match wait_child(child, limit)? {
            Some(status) => Ok(Stopped { status, elapsed: t0.elapsed() }),
            None => {
                let _ = terminate(child, Duration::ZERO);
                bail!("observer did not exit within {limit:?} of signal {sig}; killed.\n{}", self.log_banner())
            }
        }
    }

    /// The listen address of the metrics endpoint.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    pub fn ns(&self) -> &NetNs {
        &self.ns
    }

    /// The one keep-alive connection to the metrics endpoint.
    pub fn scraper(&mut self) -> &mut Scraper {
        &mut self.scraper
    }

    /// `GET path` over the scraper connection.
    pub fn get(&mut self, path: &str) -> Result<Response> {
        self.scraper.get(path)
    }

    /// Scrapes and parses `/metrics` (status must be 200).
    pub fn metrics(&mut self) -> Result<Metrics> {
        let text = self.scraper.get_ok_text("/metrics")?;
        Metrics::parse(&text).context("parsing /metrics")
    }

    /// Scrapes until `f` holds (counters read at scrape time may need one
    /// more scrape for the kernel's last increments), up to `timeout`, and
    /// returns that scrape; on timeout, panics with the last exposition.
    pub fn scrape_until(&mut self, what: &str, timeout: Duration, f: impl Fn(&Metrics) -> bool) -> Metrics {
        let found = crate::util::wait_until(what, timeout, Duration::from_millis(50), || {
            let m = self.metrics()?;
            Ok(f(&m).then_some(m))
        });
        found.unwrap_or_else(|e| panic!("{e:#}\n{}", self.metrics().map(|m| m.raw().to_string()).unwrap_or_default()))
    }

    /// Everything the observer wrote to stdout and stderr so far.
    pub fn log(&self) -> String {
        std::fs::read(&self.log_path).map(|b| String::from_utf8_lossy(&b).into_owned()).unwrap_or_default()
    }

    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    fn log_banner(&self) -> String {
        format!("----- {} -----\n{}\n----- end of observer log -----", self.command, self.log().trim_end())
    }
}

impl Drop for ObserverProcess {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            terminate(&mut c, Duration::from_secs(3));
        }
        if std::thread::panicking() {
            eprintln!("{}", self.log_banner());
        }
    }
}
