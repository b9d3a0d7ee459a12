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

    /// The raw samples of the one series `selector[range]` selects at `time`
    /// (Unix seconds), as (milliseconds, value): what a rule evaluated at
    /// `time` would have read, had every scrape before it been ingested.
    pub fn range_samples_at(&mut self, selector: &str, range: Duration, time: f64) -> Result<Vec<(i64, f64)>> {
        let promql = format!("{selector}[{}ms]", range.as_millis());
        let data = self.query_at(&promql, time)?;
        let [series] = data["result"].as_array().map(Vec::as_slice).unwrap_or_default() else {
            bail!("query {promql}: expected one series: {data}");
        };
        let values = series["values"].as_array().with_context(|| format!("query {promql}: {data}"))?;
        values
            .iter()
            .map(|v| {
                let at = v[0].as_f64().with_context(|| format!("query {promql}: sample {v}"))?;
                let value = v[1].as_str().and_then(|t| t.parse().ok());
                Ok(((at * 1000.0).round() as i64, value.with_context(|| format!("query {promql}: sample {v}"))?))
            })
            .collect()
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

/// PromQL's `rate(counter[range])` of one series' samples `(ms, value)`,
/// evaluated at `at_ms`: the increase (counter resets added back) extrapolated
/// to the range's ends the way Prometheus 2.x's `extrapolatedRate` does
/// (to the boundary when it is within 1.1 average sample intervals, else by
/// half an interval; never to before the counter's zero), per second.
/// `None` with fewer than two samples, as Prometheus returns nothing then.
pub fn counter_rate(samples: &[(i64, f64)], at_ms: i64, range: Duration) -> Option<f64> {
    let (&(first_t, first_v), &(last_t, last_v)) = (samples.first()?, samples.last()?);
    if samples.len() < 2 {
        return None;
    }
    let resets: f64 = samples.windows(2).filter(|w| w[1].1 < w[0].1).map(|w| w[0].1).sum();
    let increase = last_v - first_v + resets;
    let range_start = at_ms - range.as_millis() as i64;
    let mut to_start = (first_t - range_start) as f64 / 1000.0;
    let to_end = (at_ms - last_t) as f64 / 1000.0;
    let sampled = (last_t - first_t) as f64 / 1000.0;
    let average = sampled / (samples.len() - 1) as f64;
    if increase > 0.0 && first_v >= 0.0 {
        to_start = to_start.min(sampled * (first_v / increase));
    }
    let threshold = average * 1.1;
    let extrapolate = |d: f64| if d < threshold { d } else { average / 2.0 };
    let interval = sampled + extrapolate(to_start) + extrapolate(to_end);
    Some(increase * (interval / sampled) / range.as_secs_f64())
}

#[cfg(test)]
mod tests {
    #[test]
    fn percent_encoding_keeps_unreserved_only() {
        assert_eq!(super::percent_encode("a{b=\"c\"}[1m] +"), "a%7Bb%3D%22c%22%7D%5B1m%5D%20%2B");
    }

    /// Samples a Prometheus 2.42 server held in this test suite (a drop
    /// counter scraped every second, two scrapes failed), and the rates it
    /// computed at 1796627881.424: its recording rule, which ran while the
    /// last scrape was still being read, and a later query over all of them.
    #[test]
    fn counter_rate_is_prometheus_rate() {
        let raw = [(1796627875933, 2.0), (1796627877933, 7.0), (1796627878933, 12.0), (1796627879933, 12.0)];
        let range = std::time::Duration::from_secs(300);
        let rule = super::counter_rate(&raw, 1796627881424, range).unwrap();
        assert!((rule / 0.04555555555555556 - 1.0).abs() < 1e-12, "{rule}");
        let all = [&raw[..], &[(1796627880933, 12.0)]].concat();
        let query = super::counter_rate(&all, 1796627881424, range).unwrap();
        assert!((query / 0.04327333333333333 - 1.0).abs() < 1e-12, "{query}");
        assert_eq!(super::counter_rate(&raw[..1], 1796627881424, range), None);
        // A reset adds back the value before it.
        let reset = super::counter_rate(&[(0, 5.0), (1000, 8.0), (2000, 2.0)], 2000, range).unwrap();
        assert!((reset - 5.0 * (2.0 + 0.5 + 0.0) / 2.0 / 300.0).abs() < 1e-12, "{reset}");
    }
}
