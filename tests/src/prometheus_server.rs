//! A real Prometheus server (Debian's `prometheus` package) scraping the
//! observer, for tests that check the exposition the way production reads it:
//! through Prometheus' own parser, storage and PromQL engine.
//!
//! It runs inside the test's network namespace (only the network namespace is
//! switched, see [`NetNs::command_setns`]) with a private configuration and
//! storage directory, and is stopped on drop.

use std::fs::File;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, bail};

use crate::netns::NetNs;
use crate::scrape::Scraper;
use crate::util::{TempDir, run_with_timeout, terminate, wait_until};

/// Start-up includes creating the TSDB and replaying an empty WAL: a few
/// seconds at most on a busy CI machine.
pub const PROMETHEUS_READY_TIMEOUT: Duration = Duration::from_secs(30);

/// A running `prometheus` that scrapes one target every `interval`.
pub struct PrometheusServer {
    child: Option<Child>,
    addr: SocketAddr,
    api: Scraper,
    log_path: PathBuf,
    _tmp: TempDir,
}

/// `prometheus` from `$PATH` (Debian installs it in /usr/bin).
pub fn prometheus_bin() -> Result<PathBuf> {
    which("prometheus").context("prometheus is not installed (scripts/setup.sh installs Debian's package)")
}

/// `promtool`, shipped in the same package.
pub fn promtool_bin() -> Result<PathBuf> {
    which("promtool").context("promtool is not installed (scripts/setup.sh installs Debian's prometheus package)")
}

/// `promtool check metrics` on an exposition: `Ok` with an empty report when
/// it finds nothing, else the exit status and what it said.
pub fn promtool_check_metrics(exposition: &str) -> Result<()> {
    let tmp = TempDir::new("promtool")?;
    let file = tmp.path().join("metrics.txt");
    std::fs::write(&file, exposition)?;
    // promtool reads the exposition from stdin; a shell redirect keeps the
    // run bounded by run_with_timeout, which gives the child no stdin itself.
    let out = run_with_timeout(
        Command::new("sh").args(["-c", "exec \"$0\" check metrics < \"$1\""]).arg(promtool_bin()?).arg(&file),
        Duration::from_secs(30),
    )?;
    let report = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    if !out.status.success() || !report.trim().is_empty() {
        bail!("promtool check metrics: {}\n{report}", out.status);
    }
    Ok(())
}

fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).map(|d| d.join(name)).find(|p| p.is_file())
}

/// What a test's Prometheus does beyond scraping.
#[derive(Clone, Debug, Default)]
pub struct PrometheusOptions {
    /// `--enable-feature=native-histograms`: Prometheus asks for the protobuf
    /// exposition first and stores native histograms (Prometheus 2.40 to 2.x;
    /// a histogram with native buckets is stored as native only).
    pub native_histograms: bool,
    /// Rule files to load (`rule_files`), evaluated every scrape interval.
    pub rule_files: Vec<PathBuf>,
    /// Labels every sample of the target gets (as a ServiceMonitor's
    /// relabelling sets `node`).
    pub target_labels: Vec<(String, String)>,
}

impl PrometheusServer {
    /// Starts Prometheus in `ns` scraping `target` (an `http://target/metrics`
    /// endpoint) every `interval`, and waits until it is ready.
    pub fn start(ns: &NetNs, target: SocketAddr, interval: Duration) -> Result<Self> {
        Self::start_with(ns, target, interval, &PrometheusOptions::default())
    }

    /// [`PrometheusServer::start`] with options.
    pub fn start_with(ns: &NetNs, target: SocketAddr, interval: Duration, options: &PrometheusOptions) -> Result<Self> {
        let bin = prometheus_bin()?;
        let tmp = TempDir::new("prometheus")?;
        let config = tmp.path().join("prometheus.yml");
        let ms = interval.as_millis().max(100);
        // The scrape timeout must not exceed the interval; 90% of it leaves
        // Prometheus room to schedule the next one.
        let timeout_ms = ms * 9 / 10;
        let mut yaml = format!(
            "global:\n  scrape_interval: {ms}ms\n  evaluation_interval: {ms}ms\n\
             scrape_configs:\n  - job_name: observer\n    scrape_interval: {ms}ms\n    scrape_timeout: {timeout_ms}ms\n\
             \x20   static_configs:\n      - targets: ['{target}']\n"
        );
        if !options.target_labels.is_empty() {
            yaml.push_str("        labels:\n");
            for (k, v) in &options.target_labels {
                yaml.push_str(&format!("          {k}: '{v}'\n"));
            }
        }
        if !options.rule_files.is_empty() {
            yaml.push_str("rule_files:\n");
            for f in &options.rule_files {
                yaml.push_str(&format!("  - '{}'\n", f.display()));
            }
        }
        std::fs::write(&config, yaml).with_context(|| format!("writing {}", config.display()))?;
        let port = ns.free_port(Ipv4Addr::LOCALHOST.into())?;
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
        let log_path = tmp.path().join("prometheus.log");
        let log = File::create(&log_path)?;
        let mut cmd: Command = ns.command_setns(&bin);
        cmd.arg(format!("--config.file={}", config.display()))
            .arg(format!("--storage.tsdb.path={}", tmp.path().join("data").display()))
            .arg(format!("--web.listen-address={addr}"))
            .args(options.native_histograms.then_some("--enable-feature=native-histograms"))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        let child = cmd.spawn().with_context(|| format!("spawning {}", bin.display()))?;
        let mut server = Self { child: Some(child), addr, api: Scraper::new(ns, addr), log_path, _tmp: tmp };
        server.wait_ready()?;
        Ok(server)
    }

    fn wait_ready(&mut self) -> Result<()> {
        let r = wait_until("prometheus /-/ready", PROMETHEUS_READY_TIMEOUT, Duration::from_millis(200), || {
            if let Some(c) = self.child.as_mut()
                && let Some(st) = c.try_wait()?
            {
                bail!("prometheus exited ({st})");
            }
            match self.api.get("/-/ready") {
                Ok(r) => Ok((r.status == 200).then_some(())),
                Err(_) => {
                    self.api.disconnect();
                    Ok(None)
                }
            }
        });
        r.map_err(|e| anyhow::anyhow!("{e:#}\n{}", self.log_banner()))
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// An instant PromQL query through `/api/v1/query`; the raw JSON `data`
    /// (an error status from Prometheus is an error here).
    pub fn query(&mut self, promql: &str) -> Result<serde_json::Value> {
        self.get_data(&format!("/api/v1/query?query={}", percent_encode(promql)), promql)
    }

    /// The same query evaluated at `time` (Unix seconds).
    pub fn query_at(&mut self, promql: &str, time: f64) -> Result<serde_json::Value> {
        self.get_data(&format!("/api/v1/query?query={}&time={time}", percent_encode(promql)), promql)
    }

    /// The series whose names match `selector` (`/api/v1/series`), as label maps.
    pub fn series(&mut self, selector: &str) -> Result<Vec<serde_json::Value>> {
        let data = self.get_data(&format!("/api/v1/series?match%5B%5D={}", percent_encode(selector)), selector)?;
        Ok(data.as_array().cloned().unwrap_or_default())
    }

    /// `data` of a successful API answer.
    fn get_data(&mut self, path: &str, promql: &str) -> Result<serde_json::Value> {
        let r = self.api.get(path)?;
        let v: serde_json::Value =
            serde_json::from_slice(&r.body).with_context(|| format!("query {promql}: not JSON: {}", r.text()))?;
        if r.status != 200 || v["status"] != "success" {
            bail!("query {promql}: status {}: {v}", r.status);
        }
        Ok(v["data"].clone())
    }

    /// The value of a query whose result is one sample (a vector of one
    /// element, or a scalar); `None` for an empty vector.
    pub fn query_value(&mut self, promql: &str) -> Result<Option<f64>> {
        let data = self.query(promql)?;
        let value = match data["resultType"].as_str() {
            Some("vector") => match data["result"].as_array().map(Vec::as_slice) {
                Some([]) => return Ok(None),
                Some([one]) => one["value"][1].clone(),
                _ => bail!("query {promql}: expected at most one series: {data}"),
            },
            Some("scalar") => data["result"][1].clone(),
            _ => bail!("query {promql}: unexpected result {data}"),
        };
        let text = value.as_str().with_context(|| format!("query {promql}: value {value}"))?;
        Ok(Some(text.parse().with_context(|| format!("query {promql}: value {text}"))?))
    }

    /// The scrape health of the observer target as Prometheus last saw it:
    /// `(health, last error)`.
    pub fn target_health(&mut self) -> Result<(String, String)> {
        let r = self.api.get("/api/v1/targets")?;
        let v: serde_json::Value = serde_json::from_slice(&r.body)?;
        let t = &v["data"]["activeTargets"][0];
        Ok((t["health"].as_str().unwrap_or("").into(), t["lastError"].as_str().unwrap_or("").into()))
    }

    pub fn log(&self) -> String {
        std::fs::read(&self.log_path).map(|b| String::from_utf8_lossy(&b).into_owned()).unwrap_or_default()
    }

    fn log_banner(&self) -> String {
        format!("----- prometheus log -----\n{}\n----- end of prometheus log -----", self.log().trim_end())
    }
}

impl Drop for PrometheusServer {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            terminate(&mut c, Duration::from_secs(5));
        }
        if std::thread::panicking() {
            eprintln!("{}", self.log_banner());
        }
    }
}

/// Percent-encodes a query-string value (RFC 3986 unreserved characters kept).
pub fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len() * 3);
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn percent_encoding_keeps_unreserved_only() {
        assert_eq!(super::percent_encode("a{b=\"c\"}[1m] +"), "a%7Bb%3D%22c%22%7D%5B1m%5D%20%2B");
    }
}
