//! HAProxy in TCP mode as an independent reference for session timing and
//! byte counts.
//!
//! Semantics of the log fields used (HAProxy 2.6 configuration.txt, 8.2.2
//! "TCP log format", 8.2.6 "Custom log format", 8.4 "Timing events"):
//! - `%U` "bytes_uploaded": bytes received from the client and forwarded to
//!   the server; `%B` "bytes_read": bytes sent from the server to the
//!   client. Both are application payload (no TCP/IP headers), counted on
//!   the proxy, so they equal what the client sent/received.
//! - `%Tt`: milliseconds from accept on the frontend until BOTH sides are
//!   closed, i.e. the whole session as the proxy saw it. `%Tw` (queue) and
//!   `%Tc` (server connect) are `-1` when never reached.
//! - `%bi:%bp`: the proxy's own source address on the server connection
//!   (the "backend source"), `%si:%sp`: the server's address.
//! - `%ci:%cp` / `%fi:%fp`: client and the listening (frontend) address.
//!
//! Gotchas seen with 2.6:
//! - the line is written when the session ENDS (no `option logasap`), so a
//!   session shows up only after both sides closed: use
//!   [`Haproxy::wait_sessions`];
//! - in TCP mode the server connection is opened at accept time, before
//!   any client data;
//! - `option tcplog` together with a custom `log-format` in the same section
//!   only produces a "'log-format' overrides previous 'option tcplog'"
//!   warning, so the generated config uses the `log-format` alone;
//! - IPs are printed bare (IPv6 without brackets), so fields are emitted as
//!   separate `key=value` words instead of `ip:port`.

use std::fs::File;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, bail};

use crate::netns::NetNs;
use crate::util::{TempDir, terminate, wait_until};

const MARKER: &str = "obs-haproxy-session";
const START_TIMEOUT: Duration = Duration::from_secs(15);

/// One proxied TCP session, as logged by HAProxy when it ended.
#[derive(Clone, Debug, PartialEq)]
pub struct HaproxySession {
    /// `%ci:%cp`: the client's address (accepted connection).
    pub client: SocketAddr,
    /// `%fi:%fp`: the frontend (listening) address the client connected to.
    pub frontend: SocketAddr,
    /// `%bi:%bp`: HAProxy's source address for the server connection;
    /// `None` if it never connected.
    pub backend_source: Option<SocketAddr>,
    /// `%si:%sp`: the server's address; `None` if no server was reached.
    pub server: Option<SocketAddr>,
    /// `%Ts` and `%ms`: accept time, Unix epoch milliseconds.
    pub accepted_unix_ms: u64,
    /// `%Tw`: ms waiting in queues, -1 if never queued.
    pub queue_ms: i64,
    /// `%Tc`: ms to connect to the server, -1 if it never connected.
    pub connect_ms: i64,
    /// `%Tt`: ms from accept until both sides were closed.
    pub total_ms: i64,
    /// `%U`: payload bytes from client to server.
    pub bytes_from_client: u64,
    /// `%B`: payload bytes from server to client.
    pub bytes_to_client: u64,
    /// `%ts`: termination state, `--` for a normal close.
    pub termination_state: String,
}

impl HaproxySession {
    /// Parses one log line; `None` for lines that are not session logs
    /// (HAProxy's own notices and warnings share the output).
    pub fn parse_line(line: &str) -> Option<Result<Self>> {
        let rest = line.trim().strip_prefix(MARKER)?;
        Some(Self::parse_fields(rest).with_context(|| format!("parsing haproxy log line {line:?}")))
    }

    fn parse_fields(rest: &str) -> Result<Self> {
        let mut kv = std::collections::HashMap::new();
        for w in rest.split_whitespace() {
            let (k, v) = w.split_once('=').with_context(|| format!("word {w:?} is not key=value"))?;
            kv.insert(k, v);
        }
        let get = |k: &str| kv.get(k).copied().with_context(|| format!("missing {k}"));
        let num = |k: &str| -> Result<i64> {
            let v = get(k)?;
            v.trim_start_matches('+').parse().with_context(|| format!("{k}={v:?}"))
        };
        let unum = |k: &str| -> Result<u64> {
            let v = get(k)?;
            v.trim_start_matches('+').parse().with_context(|| format!("{k}={v:?}"))
        };
        let addr = |ip: &str, port: &str| -> Result<Option<SocketAddr>> {
            let (i, p) = (get(ip)?, get(port)?);
            if i == "-" || p == "-" {
                return Ok(None);
            }
            let i: IpAddr = i.parse().with_context(|| format!("{ip}={i:?}"))?;
            let p: u16 = p.parse().with_context(|| format!("{port}={p:?}"))?;
            Ok(Some(SocketAddr::new(i, p)))
        };
        Ok(Self {
            client: addr("ci", "cp")?.context("no client address")?,
            frontend: addr("fi", "fp")?.context("no frontend address")?,
            backend_source: addr("bi", "bp")?,
            server: addr("si", "sp")?,
            accepted_unix_ms: unum("Ts")? * 1000 + unum("ms")?,
            queue_ms: num("Tw")?,
            connect_ms: num("Tc")?,
            total_ms: num("Tt")?,
            bytes_from_client: unum("U")?,
            bytes_to_client: unum("B")?,
            termination_state: get("ts")?.to_string(),
        })
    }
}

/// A foreground `haproxy -db` in a network namespace, killed on drop.
pub struct Haproxy {
    _ns: NetNs,
    child: Option<Child>,
    listen: SocketAddr,
    backend: SocketAddr,
    log_path: PathBuf,
    cfg_path: PathBuf,
    _tmp: TempDir,
}

impl std::fmt::Debug for Haproxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Haproxy")
            .field("listen", &self.listen)
            .field("backend", &self.backend)
            .field("log", &self.log_path)
            .finish()
    }
}

impl Haproxy {
    /// Proxies `127.0.0.1:listen_port` to `backend` inside `ns`.
    pub fn start(ns: &NetNs, listen_port: u16, backend: SocketAddr) -> Result<Self> {
        Self::start_on(ns, SocketAddr::new(Ipv4Addr::LOCALHOST.into(), listen_port), backend)
    }

    /// Proxies `listen` (IPv4 or IPv6) to `backend` inside `ns`, and returns
    /// once the listener is bound. Readiness is checked without connecting,
    /// since a probe connection would be a logged, observed session.
    pub fn start_on(ns: &NetNs, listen: SocketAddr, backend: SocketAddr) -> Result<Self> {
        let tmp = TempDir::new("haproxy")?;
        let cfg_path = tmp.path().join("haproxy.cfg");
        let log_path = tmp.path().join("haproxy.log");
        std::fs::write(&cfg_path, config(listen, backend))
            .with_context(|| format!("writing {}", cfg_path.display()))?;
        let log = File::create(&log_path)?;
        let child = ns
            .command_setns("haproxy")
            .arg("-f")
            .arg(&cfg_path)
            .arg("-db")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("spawning haproxy (is it installed?)")?;
        let mut h = Self { _ns: ns.clone(), child: Some(child), listen, backend, log_path, cfg_path, _tmp: tmp };
        let waited =
            wait_until(&format!("haproxy to listen on {listen}"), START_TIMEOUT, Duration::from_millis(20), || {
                if let Some(st) = h.child.as_mut().map(|c| c.try_wait()).transpose()?.flatten() {
                    bail!("haproxy exited ({st})");
                }
                Ok(ns.is_listening(listen)?.then_some(()))
            });
        if let Err(e) = waited {
            bail!("{e:#}\n----- haproxy log -----\n{}\n----- config -----\n{}", h.log(), h.config());
        }
        Ok(h)
    }

    pub fn listen_addr(&self) -> SocketAddr {
        self.listen
    }

    pub fn backend_addr(&self) -> SocketAddr {
        self.backend
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Sessions logged so far (i.e. already ended), in log order.
    pub fn sessions(&self) -> Result<Vec<HaproxySession>> {
        self.log().lines().filter_map(HaproxySession::parse_line).collect()
    }

    /// Waits (bounded) until at least `n` sessions have been logged.
    pub fn wait_sessions(&self, n: usize, timeout: Duration) -> Result<Vec<HaproxySession>> {
        wait_until(&format!("{n} haproxy session log lines"), timeout, Duration::from_millis(10), || {
            let s = self.sessions()?;
            Ok((s.len() >= n).then_some(s))
        })
        .with_context(|| format!("haproxy log so far:\n{}", self.log()))
    }

    /// The whole stdout/stderr of haproxy.
    pub fn log(&self) -> String {
        std::fs::read(&self.log_path).map(|b| String::from_utf8_lossy(&b).into_owned()).unwrap_or_default()
    }

    pub fn config(&self) -> String {
        std::fs::read_to_string(&self.cfg_path).unwrap_or_default()
    }

    pub fn config_path(&self) -> &Path {
        &self.cfg_path
    }
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            terminate(&mut c, Duration::from_secs(3));
        }
        if std::thread::panicking() {
            eprintln!("----- haproxy log -----\n{}\n----- end of haproxy log -----", self.log().trim_end());
        }
    }
}

/// The generated configuration. Timeouts are long enough for paced test
/// sessions, short enough that a forgotten connection cannot outlive a run.
fn config(listen: SocketAddr, backend: SocketAddr) -> String {
    format!(
        "global
    log stdout format raw local0
    nbthread 1

defaults
    mode tcp
    log global
    log-format \"{MARKER} ci=%ci cp=%cp fi=%fi fp=%fp bi=%bi bp=%bp si=%si sp=%sp Ts=%Ts ms=%ms Tw=%Tw Tc=%Tc Tt=%Tt U=%U B=%B ts=%ts\"
    timeout connect 5s
    timeout client 120s
    timeout server 120s

frontend fe
    bind {listen}
    default_backend be

backend be
    server s1 {backend}
"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_log_lines() {
        let l = "obs-haproxy-session ci=127.0.0.1 cp=40820 fi=127.0.0.1 fp=15000 bi=::1 bp=48256 si=::1 sp=15001 \
                 Ts=1700000000 ms=042 Tw=1 Tc=0 Tt=300 U=100 B=5000 ts=--";
        let s = HaproxySession::parse_line(l).unwrap().unwrap();
        assert_eq!(s.client, "127.0.0.1:40820".parse().unwrap());
        assert_eq!(s.backend_source, Some("[::1]:48256".parse().unwrap()));
        assert_eq!(s.server, Some("[::1]:15001".parse().unwrap()));
        assert_eq!(s.accepted_unix_ms, 1_700_000_000_042);
        assert_eq!((s.total_ms, s.bytes_from_client, s.bytes_to_client), (300, 100, 5000));
        assert_eq!(s.termination_state, "--");
        assert!(HaproxySession::parse_line("[NOTICE]   (7031) : haproxy version is 2.6.12").is_none());
        let aborted = "obs-haproxy-session ci=127.0.0.1 cp=1 fi=127.0.0.1 fp=2 bi=- bp=- si=- sp=- \
                       Ts=1 ms=000 Tw=-1 Tc=-1 Tt=5 U=0 B=0 ts=CC";
        let a = HaproxySession::parse_line(aborted).unwrap().unwrap();
        assert_eq!((a.backend_source, a.server, a.connect_ms), (None, None, -1));
    }
}
