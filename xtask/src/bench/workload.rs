//! The benchmark's workloads: what iperf3 runs, what figure is taken from it, and the
//! target that figure is judged against. Each has its own section in BENCHMARKS.md.

use anyhow::{Result, bail};

use super::{iperf, shortconn};

/// `--workload`: one workload, or all of them in turn.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Selection {
    Bulk,
    TcpSmall,
    UdpSmall,
    ShortConn,
    /// /metrics latency with 10,000 series (scrape_latency.rs); not an on/off workload.
    Scrape,
    /// Only the observer's own footprint (footprint.rs), which `all` also measures.
    Footprint,
    All,
}

impl Selection {
    pub fn workloads(self) -> Vec<Workload> {
        match self {
            Selection::Bulk => vec![Workload::Bulk],
            Selection::TcpSmall => vec![Workload::TcpSmall],
            Selection::UdpSmall => vec![Workload::UdpSmall],
            Selection::ShortConn => vec![Workload::ShortConn],
            Selection::Scrape => vec![],
            Selection::Footprint => Vec::new(),
            Selection::All => Workload::ALL.to_vec(),
        }
    }

    /// Whether the scrape-latency measurement runs.
    pub fn scrape(self) -> bool {
        matches!(self, Selection::Scrape | Selection::All)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Workload {
    /// TCP bulk throughput, iperf3's defaults (128 KiB sends).
    Bulk,
    /// TCP with 1 KiB sends, TCP_NODELAY, as fast as they go.
    TcpSmall,
    /// UDP with 1 KiB datagrams, no rate limit.
    UdpSmall,
    /// Short TCP connections (connect, send 64 bytes, close) from xtask's own load
    /// generator, as many as it makes.
    ShortConn,
}

/// Message size of the small-message workloads (`iperf3 -l`).
pub const SMALL_MSG_BYTES: u32 = 1024;
/// The per-call hooks: one run per send(2) or recv(2) of any socket.
pub const PER_CALL_HOOKS: [&str; 2] = ["obs_send", "obs_recv"];

impl Workload {
    pub const ALL: [Workload; 4] = [Workload::Bulk, Workload::TcpSmall, Workload::UdpSmall, Workload::ShortConn];

    pub fn name(self) -> &'static str {
        match self {
            Workload::Bulk => "bulk",
            Workload::TcpSmall => "tcp-small",
            Workload::UdpSmall => "udp-small",
            Workload::ShortConn => "short-conn",
        }
    }

    /// The level-2 heading of its section in BENCHMARKS.md.
    pub fn heading(self) -> &'static str {
        match self {
            Workload::Bulk => "## TCP bulk throughput (iperf3, loopback)",
            Workload::TcpSmall => "## TCP small messages (iperf3 -l 1024 -N, loopback)",
            Workload::UdpSmall => "## UDP small datagrams (iperf3 -u -b 0 -l 1024, loopback)",
            Workload::ShortConn => "## Short TCP connections (connect, send 64 B, close; loopback)",
        }
    }

    /// Its name in the targets table.
    pub fn title(self) -> &'static str {
        match self {
            Workload::Bulk => "TCP bulk throughput",
            Workload::TcpSmall => "TCP small messages",
            Workload::UdpSmall => "UDP small datagrams",
            Workload::ShortConn => "short TCP connections",
        }
    }

    /// iperf3 client arguments beyond `-c`, `-p`, `-t`, `-J` and `-A`.
    pub fn client_args(self) -> &'static [&'static str] {
        match self {
            Workload::Bulk | Workload::ShortConn => &[],
            Workload::TcpSmall => &["-l", "1024", "-N"],
            Workload::UdpSmall => &["-u", "-b", "0", "-l", "1024"],
        }
    }

    /// The figure of one finished client run (`iperf3 -J` output), in `unit()`s.
    pub fn figure(self, json: &str) -> Result<f64> {
        match self {
            Workload::Bulk => iperf::received_bps(json),
            Workload::TcpSmall => Ok(iperf::received_bps(json)? / f64::from(SMALL_MSG_BYTES * 8)),
            Workload::UdpSmall => iperf::received_datagrams_per_sec(json),
            Workload::ShortConn => bail!("the short-connection workload does not run iperf3"),
        }
    }

    /// The figure, as shown in the report (in `display_unit()`).
    pub fn show(self, figure: f64) -> String {
        match self {
            Workload::Bulk => format!("{:.2}", figure / 1e9),
            Workload::TcpSmall | Workload::UdpSmall | Workload::ShortConn => {
                format!("{:.1}", figure / 1e3)
            }
        }
    }

    pub fn display_unit(self) -> &'static str {
        match self {
            Workload::Bulk => "Gbit/s",
            Workload::TcpSmall | Workload::UdpSmall => "k msg/s",
            Workload::ShortConn => "k conn/s",
        }
    }

    /// The acceptance bar: the figure with the observer on, relative to off.
    pub fn target_ratio(self) -> f64 {
        match self {
            Workload::Bulk => 0.99,
            Workload::TcpSmall | Workload::UdpSmall | Workload::ShortConn => 0.97,
        }
    }

    /// The bar for ns per run of each of `PER_CALL_HOOKS`, where this workload has one.
    pub fn target_hook_ns(self) -> Option<f64> {
        match self {
            // Issue 8: at most 50 ns per hot-path hook call. The small-message
            // workloads are where those calls dominate (once per KiB).
            Workload::TcpSmall | Workload::UdpSmall => Some(50.0),
            Workload::Bulk | Workload::ShortConn => None,
        }
    }

    /// What the workload shows, and its target; one paragraph of markdown.
    pub fn intro(self) -> String {
        let ratio = self.target_ratio();
        match self {
            Workload::Bulk => format!(
                "What a running observer costs TCP bulk throughput. Target: throughput with \
                 the observer on is at least {ratio} of off (median of the per-round on/off \
                 ratios)."
            ),
            Workload::TcpSmall => format!(
                "What a running observer costs a TCP stream of 1 KiB messages, as fast as they go: \
                 the per-call hooks (`obs_send`, `obs_recv`) run once per KiB rather than once per \
                 128 KiB as in bulk. Targets: messages per second on / off at least {ratio} (median of \
                 the per-round ratios), and each run of `obs_send` and `obs_recv` at most {} ns.",
                self.target_hook_ns().unwrap_or_default()
            ),
            Workload::UdpSmall => format!(
                "What a running observer costs a UDP flow of 1 KiB datagrams, as fast as they go: the \
                 per-call hooks run once per datagram. Targets: datagrams received per second on / off \
                 at least {ratio} (median of the per-round ratios), and each run of `obs_send` and \
                 `obs_recv` at most {} ns.",
                self.target_hook_ns().unwrap_or_default()
            ),
            Workload::ShortConn => format!(
                "What a running observer costs a host that opens and closes many short TCP \
                 connections, and whether it keeps up: each connection is two sessions, each one \
                 ring-buffer record. Targets: connections per second on / off at least {ratio} at {} or \
                 more per second with no session lost; the observer under {}% of a core at 10,000 closed \
                 sessions per second and under {} MiB with {} connections open.",
                shortconn::TARGET_RATE,
                shortconn::TARGET_CORE_SHARE * 100.0,
                shortconn::TARGET_RSS_BYTES >> 20,
                shortconn::HOLD_CONNECTIONS
            ),
        }
    }

    /// How the workload's figure is made from the client run; part of the method text.
    pub fn figure_method(self) -> &'static str {
        match self {
            Workload::Bulk => "its figure is `end.sum_received.bits_per_second`.",
            Workload::TcpSmall => {
                "`-N` (TCP_NODELAY) sends each message at once; the figure is messages per second, \
                 `end.sum_received.bits_per_second` / 8192."
            }
            Workload::ShortConn => "its figure is connections per second.",
            Workload::UdpSmall => {
                "the sender outruns the receiver, so the figure is the receiver's: datagrams received \
                 per second, (`end.sum_received.packets` − `end.sum_received.lost_packets`) / \
                 `end.sum_received.seconds`."
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn all_runs_every_workload_once_in_order() {
        assert_eq!(Selection::All.workloads(), Workload::ALL);
        assert_eq!(Selection::UdpSmall.workloads(), [Workload::UdpSmall]);
    }

    #[test]
    fn headings_are_distinct_level_two_headings() {
        for (i, a) in Workload::ALL.iter().enumerate() {
            assert!(a.heading().starts_with("## "), "{}", a.heading());
            assert!(!a.heading()[3..].contains('#'));
            for b in &Workload::ALL[i + 1..] {
                assert_ne!(a.heading(), b.heading());
            }
        }
        // The section a reader may link to keeps its anchor.
        assert_eq!(Workload::Bulk.heading(), "## TCP bulk throughput (iperf3, loopback)");
    }

    #[test]
    fn tcp_small_counts_kib_messages() {
        let json = r#"{"end": {"sum_received": {"bits_per_second": 819200000}}}"#;
        assert_eq!(Workload::TcpSmall.figure(json).unwrap(), 100_000.0);
        assert_eq!(Workload::TcpSmall.show(123_456.0), "123.5");
        assert_eq!(Workload::Bulk.show(41.234e9), "41.23");
    }
}
