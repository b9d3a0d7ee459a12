//! Reading the observer while it runs: its /metrics over one kept-alive connection,
//! and its process's CPU time and memory from /proc.
//!
//! One connection for all of a measurement's scrapes: a new connection per scrape
//! would itself be a session the observer counts (two, on loopback). ureq's agent
//! keeps the connection between requests; each request runs on a thread inside the
//! benchmark's namespace, so that a connection it opens is opened there.

use std::fs;
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, Result};

use super::sys::NetNs;

/// Bound on one request, connecting included: a scrape of 200,000 open sessions
/// takes a fraction of a second.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Larger than any /metrics answer of the benchmark (about 1 MiB with 10,000 series).
const MAX_BODY: u64 = 64 << 20;

/// An HTTP client for the observer: ureq's, with bounded timeouts, answering every
/// status (the caller judges it) and keeping one idle connection.
pub fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .timeout_global(Some(REQUEST_TIMEOUT))
        .timeout_connect(Some(CONNECT_TIMEOUT))
        .http_status_as_error(false)
        .max_idle_connections_per_host(1)
        .build()
        .new_agent()
}

/// The status and body of `GET path` with `agent`, from the calling thread.
pub fn get(agent: &ureq::Agent, addr: SocketAddr, path: &str) -> Result<(u16, String)> {
    let mut answer = agent.get(format!("http://{addr}{path}")).call().with_context(|| format!("GET {addr}{path}"))?;
    let body = answer.body_mut().with_config().limit(MAX_BODY).read_to_string();
    Ok((answer.status().as_u16(), body.with_context(|| format!("reading the answer to GET {addr}{path}"))?))
}

pub struct Scraper<'a> {
    ns: &'a NetNs,
    agent: ureq::Agent,
    addr: SocketAddr,
}

impl<'a> Scraper<'a> {
    /// A scraper of the observer at `addr` in `ns`; it connects at its first scrape.
    pub fn new(ns: &'a NetNs, addr: SocketAddr) -> Self {
        Scraper { ns, agent: agent(), addr }
    }

    /// The body of `GET /metrics` (the connection kept).
    pub fn metrics(&mut self) -> Result<String> {
        let (status, body) = self.ns.run_in(|| get(&self.agent, self.addr, "/metrics"))??;
        anyhow::ensure!(status == 200, "GET /metrics answered {status}: {}", body.trim());
        Ok(body)
    }
}

/// The sum of the samples of `name` whose labels include every pair of `labels`.
pub fn sample(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let (metric, rest) = match series.split_once('{') {
                Some((m, rest)) => (m, rest.trim_end_matches('}')),
                None => (series, ""),
            };
            let wanted = labels.iter().all(|(k, v)| rest.split(',').any(|pair| pair == format!("{k}=\"{v}\"")));
            (metric == name && wanted).then(|| value.parse::<f64>().ok())?
        })
        .sum()
}

/// User plus system CPU seconds a process has used (/proc/PID/stat).
pub fn cpu_seconds(pid: u32) -> Result<f64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).with_context(|| format!("reading /proc/{pid}/stat"))?;
    parse_cpu_ticks(&stat)
        .map(|ticks| ticks as f64 / clock_ticks_per_second())
        .with_context(|| format!("no utime/stime in /proc/{pid}/stat"))
}

/// utime + stime, in clock ticks, from a /proc/PID/stat line (fields 14 and 15; the
/// command name in parentheses may contain spaces, so count after its `)`).
fn parse_cpu_ticks(stat: &str) -> Option<u64> {
    let after = &stat[stat.rfind(')')? + 1..];
    let mut fields = after.split_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime + stime)
}

fn clock_ticks_per_second() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if hz > 0 { hz as f64 } else { 100.0 }
}

/// Resident memory of a process in bytes (VmRSS of /proc/PID/status).
pub fn rss_bytes(pid: u32) -> Result<u64> {
    let status =
        fs::read_to_string(format!("/proc/{pid}/status")).with_context(|| format!("reading /proc/{pid}/status"))?;
    parse_vm_rss(&status).with_context(|| format!("no VmRSS in /proc/{pid}/status"))
}

fn parse_vm_rss(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = "# HELP observer_sessions_total x\n\
        # TYPE observer_sessions_total counter\n\
        observer_sessions_total{protocol=\"tcp\"} 4000\n\
        observer_sessions_total{protocol=\"udp\"} 2\n\
        observer_events_lost_total{source=\"session_ring_full\"} 3\n\
        observer_events_lost_total{source=\"session_table_full\"} 1\n\
        observer_build_info{version=\"0.1.0\",commit=\"abc\"} 1\n\
        process_resident_memory_bytes 1.2e7\n";

    #[test]
    fn samples_by_name_and_labels() {
        assert_eq!(sample(TEXT, "observer_sessions_total", &[("protocol", "tcp")]), 4000.0);
        assert_eq!(sample(TEXT, "observer_sessions_total", &[]), 4002.0);
        assert_eq!(sample(TEXT, "observer_events_lost_total", &[]), 4.0);
        assert_eq!(sample(TEXT, "observer_events_lost_total", &[("source", "session_ring_full")]), 3.0);
        assert_eq!(sample(TEXT, "observer_build_info", &[("commit", "abc")]), 1.0);
        assert_eq!(sample(TEXT, "process_resident_memory_bytes", &[]), 1.2e7);
        assert_eq!(sample(TEXT, "observer_sessions", &[]), 0.0);
    }

    /// One connection for both requests, whatever the status; the body whole.
    #[test]
    fn gets_over_one_kept_connection() {
        use std::io::{BufRead, BufReader, Write};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let server = std::thread::spawn(move || {
            let (conn, _) = listener.accept().unwrap();
            let mut reader = BufReader::new(conn.try_clone().unwrap());
            let mut requests = Vec::new();
            for answer in [
                "HTTP/1.1 503 Service Unavailable\r\nContent-Length: 9\r\n\r\nnot ready",
                "HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nup\n",
            ] {
                let mut line = String::new();
                reader.read_line(&mut line).unwrap();
                requests.push(line.trim_end().to_owned());
                while line != "\r\n" {
                    line.clear();
                    reader.read_line(&mut line).unwrap();
                }
                (&conn).write_all(answer.as_bytes()).unwrap();
            }
            requests
        });
        let agent = agent();
        assert_eq!(get(&agent, addr, "/readyz").unwrap(), (503, "not ready".to_owned()));
        assert_eq!(get(&agent, addr, "/metrics").unwrap(), (200, "up\n".to_owned()));
        assert_eq!(server.join().unwrap(), ["GET /readyz HTTP/1.1", "GET /metrics HTTP/1.1"]);
    }

    #[test]
    fn cpu_ticks_and_rss_from_proc() {
        let stat = "123 (a b) c) S 1 123 123 0 -1 4194560 100 0 0 0 250 75 0 0 20 0 4";
        assert_eq!(parse_cpu_ticks(stat), Some(325));
        assert_eq!(parse_cpu_ticks("garbage"), None);
        assert_eq!(parse_vm_rss("Name:\tx\nVmRSS:\t   10240 kB\n"), Some(10 << 20));
        assert!(cpu_seconds(std::process::id()).is_ok());
        assert!(rss_bytes(std::process::id()).unwrap() > 0);
    }
}
