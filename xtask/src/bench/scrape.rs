//! Reading the observer while it runs: its /metrics over one kept-alive connection,
//! and its process's CPU time and memory from /proc.
//!
//! One connection for all of a measurement's scrapes: a new connection per scrape
//! would itself be a session the observer counts (two, on loopback).

use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use anyhow::{Context, Result, bail};

use super::sys::NetNs;

pub struct Scraper {
    reader: BufReader<TcpStream>,
    addr: SocketAddr,
}

impl Scraper {
    pub fn connect(ns: &NetNs, addr: SocketAddr) -> Result<Self> {
        let stream = ns
            .run_in(|| TcpStream::connect_timeout(&addr, Duration::from_secs(5)))?
            .with_context(|| format!("connecting to the observer at {addr}"))?;
        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
        Ok(Scraper { reader: BufReader::new(stream), addr })
    }

    /// The body of `GET /metrics` (HTTP/1.1, the connection kept).
    pub fn metrics(&mut self) -> Result<String> {
        let request = format!("GET /metrics HTTP/1.1\r\nHost: {}\r\n\r\n", self.addr);
        self.reader.get_mut().write_all(request.as_bytes())?;
        let mut line = String::new();
        self.reader.read_line(&mut line)?;
        if super::sys::parse_status_line(&line) != Some(200) {
            bail!("GET /metrics answered {:?}", line.trim_end());
        }
        let mut length = None;
        loop {
            line.clear();
            self.reader.read_line(&mut line)?;
            let header = line.trim_end();
            if header.is_empty() {
                break;
            }
            if let Some((name, value)) = header.split_once(':')
                && name.eq_ignore_ascii_case("content-length")
            {
                length = value.trim().parse::<usize>().ok();
            }
        }
        let length = length.context("the /metrics answer has no Content-Length")?;
        let mut body = vec![0; length];
        self.reader.read_exact(&mut body)?;
        String::from_utf8(body).context("the /metrics answer is not UTF-8")
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
