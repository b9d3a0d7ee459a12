//! The program's front: the command line ([`Cli`]; values are checked by
//! clap's parsers so a bad one exits with code 2 and a message that says what
//! was wrong and what would be right), where settings come from ([`config`]),
//! the `run` and `check` commands, and the observer's own log ([`logging`]).
//!
//! Layer: the top. It may import every other layer; nothing imports it.
pub mod check;
pub mod config;
pub mod gpu_flags;
pub mod logging;
pub mod run;

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use clap::{Args, Parser, Subcommand};

use crate::{
    cli::logging::LogArgs,
    enrich::{
        SessionLabel, parse_label_limit,
        peers::{PeerGroup, parse_peer_group, parse_service_ports},
    },
    kernel::btf::DEFAULT_BTF_PATH,
    kernel::probes::{Concern, Disabled, ProbeMode},
    kernel::state::DEFAULT_STATE_DIR,
    metrics::labels::{StaticLabel, parse_label},
    metrics::native::HistogramMode,
};

/// Default address of the metrics server: loopback only, so a node agent never
/// exposes its metrics beyond the host unless told to.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:9470";
/// Default idle timeout of an unconnected UDP socket's flow with one peer:
/// long enough for request/response protocols with pauses, short enough that
/// a finished flow is reported within a minute.
pub const DEFAULT_UDP_IDLE_TIMEOUT: &str = "30s";
/// Default longest gap between send/receive calls that still counts as active
/// time: a transfer pausing for less than this is still transferring.
pub const DEFAULT_ACTIVE_GAP: &str = "1s";

/// Default time after which a set of session label values with no new
/// session leaves the exposition: long enough that an hourly job's series
/// stay between runs of a dashboard's range, short enough that ended pods'
/// series do not pile up.
pub const DEFAULT_SERIES_TTL: &str = "30m";

/// Default shutdown budget: well within Kubernetes' default 30 s grace
/// period, and ample for detaching programs and draining the rings (tens of
/// milliseconds).
pub const DEFAULT_SHUTDOWN_TIMEOUT: &str = "5s";

/// Default goodput floor: the in-process metric this replaces records only
/// sessions that moved at least 1 MB in a direction.
pub const DEFAULT_MIN_SESSION_BYTES: u64 = 1_000_000;

/// Default size of the kernel's open-session table (`OPEN_SESSIONS`): each
/// loopback connection takes two entries (one per end), other connections one.
pub const DEFAULT_MAX_SESSIONS: u32 = 65_536;
/// Largest `--max-sessions`: the table is preallocated kernel memory, about
/// 200 bytes an entry (120-byte value, key, hash bucket), so this is ~0.8 GiB.
pub const MAX_MAX_SESSIONS: u32 = 4_194_304;

/// Default size of the kernel's UDP flow table (`UDP_FLOWS`, one entry per
/// socket and peer) and of its table of sockets with flows (`UDP_SOCKETS`).
pub const DEFAULT_MAX_UDP_FLOWS: u32 = 65_536;
/// Largest `--max-udp-flows`: both tables are preallocated kernel memory, about
/// 300 bytes a flow together (a 128-byte flow entry, a 48-byte socket entry,
/// keys and hash buckets), so this is ~0.6 GiB.
pub const MAX_MAX_UDP_FLOWS: u32 = 2_097_152;

#[derive(Debug, Parser)]
#[command(name = "observer", version, about = "Per-session network goodput from eBPF, as Prometheus metrics")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
// Parsed once at start-up: the size of the larger variant costs nothing.
#[allow(clippy::large_enum_variant)]
pub enum Command {
    /// Load the kernel programs and serve metrics until SIGTERM or SIGINT.
    Run(RunArgs),
    /// Print which kernel hook each concern would use, or why none can; exit
    /// non-zero when `run` could not work.
    Check(CheckArgs),
    /// Remove the kernel tables `run` pinned in bpffs to keep sessions across
    /// restarts (docs/restarts.md); refused while an observer uses them.
    Cleanup(CleanupArgs),
}

impl Command {
    /// How this command logs.
    pub fn log(&self) -> &LogArgs {
        match self {
            Command::Run(args) => &args.log,
            Command::Check(args) => &args.log,
            Command::Cleanup(args) => &args.log,
        }
    }
}

#[derive(Debug, Clone, Args)]
pub struct CheckArgs {
    #[command(flatten)]
    pub kernel: KernelArgs,
    #[command(flatten)]
    pub log: LogArgs,
}

#[derive(Debug, Clone, Args)]
pub struct CleanupArgs {
    /// The state directory to empty (as given to `observer run`).
    #[arg(long, value_name = "DIR", default_value = DEFAULT_STATE_DIR, value_parser = parse_state_dir)]
    pub state_dir: StateDirArg,
    #[command(flatten)]
    pub log: LogArgs,
}

/// `--state-dir`: where kernel tables are pinned across restarts, or nowhere.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StateDirArg {
    /// `--state-dir ''`: no state is kept; every restart starts afresh.
    Off,
    /// An absolute path on a bpf filesystem.
    Dir(PathBuf),
}

/// Options that decide how the observer hooks into the kernel.
#[derive(Debug, Clone, Args)]
pub struct KernelArgs {
    /// Hook tier: the cheapest available per concern, or one forced tier.
    #[arg(long, value_enum, default_value_t = ProbeMode::Auto)]
    pub probes: ProbeMode,
    /// Kernel BTF to resolve structure offsets from.
    #[arg(long, value_name = "PATH", default_value = DEFAULT_BTF_PATH)]
    pub btf: PathBuf,
    /// Optional concerns to switch off (comma-separated or repeated):
    /// tcp_owner, sock_calls, udp_release, drops, tcp_errors. Nothing of
    /// theirs is loaded, their metrics are absent, and observer_probe_info
    /// shows hook="disabled". Without sock_calls or udp_release there are no
    /// UDP sessions (docs/kernels.md says what each one costs).
    #[arg(long, value_name = "CONCERN", value_delimiter = ',', value_parser = parse_disable)]
    pub disable: Vec<Concern>,
}

impl KernelArgs {
    /// The concerns `--disable` switches off, with those that follow.
    pub fn disabled(&self) -> Disabled {
        Disabled::new(&self.disable)
    }
}

#[derive(Debug, Clone, Args)]
pub struct RunArgs {
    /// Read settings from this TOML file: keys are the long flag names
    /// (`min-session-bytes = 1000000`, `label = ["region=eu"]`). The command
    /// line and OBSERVER_* environment variables take precedence.
    #[arg(long, value_name = "PATH")]
    pub config: Option<PathBuf>,
    /// Address and port of the metrics server (/metrics, /healthz, /readyz).
    #[arg(long, value_name = "ADDR:PORT", default_value = DEFAULT_LISTEN, value_parser = parse_listen)]
    pub listen: SocketAddr,
    /// Report only sessions whose packets arrive through this interface (of the
    /// observer's own network namespace). Repeatable; default: all interfaces.
    #[arg(long = "iface", value_name = "NAME")]
    pub ifaces: Vec<String>,
    /// A direction enters the goodput histogram only if it moved at least this
    /// many bytes.
    // allow_hyphen_values: `-5` reaches parse_min_bytes, which says why it is
    // wrong, instead of clap calling it an unknown flag.
    #[arg(long, value_name = "BYTES", default_value_t = DEFAULT_MIN_SESSION_BYTES, value_parser = parse_min_bytes, allow_hyphen_values = true)]
    pub min_session_bytes: u64,
    /// Open TCP sessions the kernel table holds; a session opened when it is
    /// full is reported at close as adopted (counted in
    /// observer_events_lost_total{source="session_table_full"}).
    #[arg(long, value_name = "N", default_value_t = DEFAULT_MAX_SESSIONS, value_parser = parse_max_sessions, allow_hyphen_values = true)]
    pub max_sessions: u32,
    /// UDP flows (a socket and one peer) the kernel table holds; a datagram of
    /// a new flow while it is full is not counted (counted in
    /// observer_events_lost_total{source="udp_flow_table_full"}).
    #[arg(long, value_name = "N", default_value_t = DEFAULT_MAX_UDP_FLOWS, value_parser = parse_max_udp_flows, allow_hyphen_values = true)]
    pub max_udp_flows: u32,
    /// Static label added to every session metric (e.g. track, region). Repeatable.
    #[arg(long = "label", value_name = "KEY=VALUE", value_parser = parse_label)]
    pub labels: Vec<StaticLabel>,
    /// Session labels to add to the session metrics (comma-separated or
    /// repeated): who owns a session (comm, container_id, pod_uid, pod,
    /// namespace) and where its peer is (peer_group, peer_country, peer_port).
    #[arg(long = "session-label", value_name = "NAME", value_enum, value_delimiter = ',')]
    pub session_labels: Vec<SessionLabel>,
    /// A named group of peer networks for the peer_group label (turns it on);
    /// the longest matching prefix wins, unmatched peers are `other`, loopback
    /// peers `loopback`. Repeatable.
    #[arg(long = "peer-group", value_name = "CIDR=NAME", value_parser = parse_peer_group)]
    pub peer_groups: Vec<PeerGroup>,
    /// MaxMind database (GeoLite2/GeoIP2 Country or City) for the
    /// peer_country label (turns it on).
    #[arg(long, value_name = "PATH")]
    pub geoip_db: Option<PathBuf>,
    /// Port or FIRST-LAST range reported as itself in the peer_port label
    /// (turns it on), besides the well-known ports 1-1023; other ports are
    /// `other`. Repeatable.
    #[arg(long = "service-port", value_name = "PORT|FIRST-LAST", value_parser = parse_service_ports)]
    pub service_ports: Vec<std::ops::RangeInclusive<u16>>,
    /// Most distinct values a session label may take before further values
    /// are reported as `other` (and counted in observer_label_overflow_total).
    /// Repeatable; defaults in README.
    #[arg(long = "label-limit", value_name = "NAME=N", value_parser = parse_label_limit)]
    pub label_limits: Vec<(SessionLabel, usize)>,
    /// Most distinct session label sets (combinations of values) exported at
    /// once; a session with a further set is reported with every label
    /// `other` (counted in observer_label_overflow_total{label="label_set"}).
    #[arg(long, value_name = "N", default_value_t = crate::enrich::DEFAULT_MAX_LABEL_SETS, value_parser = parse_max_label_sets, allow_hyphen_values = true)]
    pub max_label_sets: usize,
    /// Session label values with no session for this long leave the
    /// exposition (and free their place in the label's budget).
    #[arg(long, value_name = "DURATION", default_value = DEFAULT_SERIES_TTL, value_parser = parse_duration)]
    pub series_ttl: Duration,
    /// Which buckets the session histograms (goodput, active goodput,
    /// duration) expose: classic (text only, as before native histograms),
    /// native (protobuf scrapes get native histograms; text has no classic
    /// buckets), or both (protobuf scrapes get both, text the classic ones).
    #[arg(long, value_enum, value_name = "MODE", default_value_t = HistogramMode::Both)]
    pub histograms: HistogramMode,
    /// Also write one JSON line per reported session to this file (`-`: stdout).
    #[arg(long, value_name = "PATH")]
    pub session_log: Option<PathBuf>,
    /// An unconnected UDP socket's flow with one peer ends after this long
    /// without a datagram (or at the socket's release).
    #[arg(long, value_name = "DURATION", default_value = DEFAULT_UDP_IDLE_TIMEOUT, value_parser = parse_duration)]
    pub udp_idle_timeout: Duration,
    /// Gaps between send/receive calls up to this long count as active time;
    /// longer gaps are idle and excluded from active-time goodput.
    #[arg(long, value_name = "DURATION", default_value = DEFAULT_ACTIVE_GAP, value_parser = parse_duration)]
    pub active_gap: Duration,
    /// On SIGTERM or SIGINT, the time allowed to detach the kernel programs,
    /// read the sessions still queued and exit; past it the process exits
    /// with code 1 whatever is left.
    #[arg(long, value_name = "DURATION", default_value = DEFAULT_SHUTDOWN_TIMEOUT, value_parser = parse_duration)]
    pub shutdown_timeout: Duration,
    /// TLS and basic authentication for the metrics server, from a YAML file
    /// in the format of Prometheus exporters' web configuration
    /// (`tls_server_config: {cert_file, key_file}`, `basic_auth_users: {USER: BCRYPT_HASH}`).
    #[arg(long, value_name = "PATH")]
    pub web_config_file: Option<PathBuf>,
    /// The kubelet's pod log directory (`<namespace>_<pod>_<uid>` entries),
    /// which names the pods that processes' cgroups point to.
    #[arg(long, value_name = "PATH", default_value = crate::enrich::pods::DEFAULT_POD_LOG_DIR)]
    pub pod_log_dir: PathBuf,
    /// Keep the kernel's BPF run-time statistics on while the observer runs,
    /// for observer_bpf_program_runs_total and _run_seconds_total. The switch
    /// is host-wide: every BPF program on the host (a CNI's too) then pays
    /// two clock reads per run. `false` leaves the kernel's setting alone
    /// (the counters then stay at 0 unless the host enabled statistics).
    #[arg(long, value_name = "BOOL", default_value_t = true, action = clap::ArgAction::Set)]
    pub bpf_stats: bool,
    /// Directory on a bpf filesystem where the kernel tables of open sessions
    /// are pinned, so that a restarted observer keeps their birth (in a
    /// subdirectory per layout version); `''` keeps no state. Default
    /// /sys/fs/bpf/observer, or no state (with a warning) where /sys/fs/bpf
    /// is not a bpf filesystem.
    #[arg(long, value_name = "DIR", value_parser = parse_state_dir)]
    pub state_dir: Option<StateDirArg>,
    #[command(flatten)]
    pub gpu: gpu_flags::GpuArgs,
    #[command(flatten)]
    pub kernel: KernelArgs,
    #[command(flatten)]
    pub log: LogArgs,
}

/// `''` (no state) or an absolute path without `..`; whether it is on bpffs
/// is checked when `run` starts.
fn parse_state_dir(s: &str) -> Result<StateDirArg, String> {
    let hint = "an absolute path on a bpf filesystem such as /sys/fs/bpf/observer, or '' to keep no state";
    if s.is_empty() {
        return Ok(StateDirArg::Off);
    }
    let path = PathBuf::from(s);
    if !path.is_absolute() {
        return Err(format!("`{s}` is not an absolute path ({hint})"));
    }
    if path.components().any(|c| matches!(c, std::path::Component::ParentDir)) {
        return Err(format!("`{s}` contains `..` ({hint})"));
    }
    if path.parent().is_none() {
        return Err(format!("`{s}` is the root directory ({hint})"));
    }
    Ok(StateDirArg::Dir(path))
}

fn parse_listen(s: &str) -> Result<SocketAddr, String> {
    s.parse().map_err(|_| format!("`{s}` is not ADDR:PORT (for example 127.0.0.1:9470, 0.0.0.0:9470 or [::1]:9470)"))
}

/// `250ms`, `30s`, `1.5s`, `5m`: a number and a unit, greater than zero. The
/// one duration syntax of every flag.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let example = "for example 500ms, 30s, 1.5s, 2m, 1h or 1d";
    let d = humantime::parse_duration(s).map_err(|e| match e {
        humantime::DurationError::UnknownUnit { unit, .. } if unit.is_empty() => {
            format!("`{s}` has no unit ({example})")
        }
        e => format!("`{s}` is not a duration: {e} ({example})"),
    })?;
    if d.is_zero() {
        return Err(format!("`{s}` is zero ({example})"));
    }
    Ok(d)
}

/// A concern `--disable` may switch off: an optional one, by the name
/// `observer check` prints.
fn parse_disable(s: &str) -> Result<Concern, String> {
    let valid = format!("concerns that can be switched off: {}", Concern::optional_names());
    match Concern::from_name(s) {
        Some(c) if c.required() => Err(format!(
            "{s} cannot be switched off: it is every TCP session's birth and close, without which nothing is measured ({valid})"
        )),
        Some(c) => Ok(c),
        None if s.is_empty() => Err(format!("an empty concern name ({valid})")),
        None => Err(format!("`{s}` is not a concern ({valid}; `observer check` lists them)")),
    }
}

fn parse_min_bytes(s: &str) -> Result<u64, String> {
    match s.parse::<u64>() {
        Ok(0) => Err("must be at least 1 byte (0 would record every session, even empty ones)".into()),
        Ok(n) => Ok(n),
        Err(_) => Err(format!("`{s}` is not a whole number of bytes (for example 1000000)")),
    }
}

fn parse_max_label_sets(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(n) if n >= 1 => Ok(n),
        _ => Err(format!("`{s}` is not a whole number of label sets, at least 1")),
    }
}

fn parse_max_sessions(s: &str) -> Result<u32, String> {
    parse_table_size(s, TableSize { what: "sessions", table: "open sessions", max: MAX_MAX_SESSIONS, bytes: 200 })
}

fn parse_max_udp_flows(s: &str) -> Result<u32, String> {
    parse_table_size(s, TableSize { what: "flows", table: "UDP flows", max: MAX_MAX_UDP_FLOWS, bytes: 300 })
}

/// What a kernel table's size option counts, for its error messages.
struct TableSize {
    what: &'static str,
    table: &'static str,
    max: u32,
    /// Kernel memory per entry, roughly.
    bytes: u32,
}

fn parse_table_size(s: &str, t: TableSize) -> Result<u32, String> {
    match s.parse::<u64>() {
        Ok(0) => Err(format!("must be at least 1 (the table of {} cannot be empty)", t.table)),
        Ok(n) if n > u64::from(t.max) => Err(format!(
            "{n} is more than {}: the table is preallocated kernel memory, about {} bytes an entry",
            t.max, t.bytes
        )),
        Ok(n) => Ok(n as u32),
        Err(_) => Err(format!("`{s}` is not a whole number of {} (for example 262144)", t.what)),
    }
}

#[cfg(test)]
mod tests {
    use clap::{CommandFactory, error::ErrorKind};

    use super::*;

    fn run_args(args: &[&str]) -> Result<RunArgs, clap::Error> {
        let mut argv = vec!["observer", "run"];
        argv.extend_from_slice(args);
        Cli::try_parse_from(argv).map(|cli| match cli.command {
            Command::Run(r) => r,
            _ => unreachable!(),
        })
    }

    #[test]
    fn defaults() {
        let r = run_args(&[]).unwrap();
        assert_eq!(r.listen.to_string(), DEFAULT_LISTEN);
        assert_eq!(r.min_session_bytes, 1_000_000);
        assert!(r.ifaces.is_empty() && r.labels.is_empty());
        assert_eq!(r.kernel.probes, ProbeMode::Auto);
        assert_eq!(r.udp_idle_timeout, Duration::from_secs(30));
        assert_eq!(r.active_gap, Duration::from_secs(1));
        assert!(r.session_labels.is_empty() && r.peer_groups.is_empty() && r.service_ports.is_empty());
        assert_eq!(r.series_ttl, Duration::from_secs(1800));
        assert_eq!(r.shutdown_timeout, Duration::from_secs(5));
        assert_eq!(r.max_sessions, 65_536);
        assert_eq!(r.max_label_sets, 1000);
        assert_eq!(r.state_dir, None);
    }

    #[test]
    fn state_dir() {
        let dir = |s| run_args(&["--state-dir", s]).unwrap().state_dir;
        assert_eq!(dir("/sys/fs/bpf/x"), Some(StateDirArg::Dir("/sys/fs/bpf/x".into())));
        assert_eq!(dir(""), Some(StateDirArg::Off));
        let cleanup = Cli::try_parse_from(["observer", "cleanup"]).unwrap();
        let Command::Cleanup(c) = cleanup.command else { unreachable!() };
        assert_eq!(c.state_dir, StateDirArg::Dir(DEFAULT_STATE_DIR.into()));
    }

    #[test]
    fn session_labels_comma_separated_or_repeated() {
        let r = run_args(&["--session-label", "comm,pod", "--session-label", "peer_port"]).unwrap();
        assert_eq!(r.session_labels, [SessionLabel::Comm, SessionLabel::Pod, SessionLabel::PeerPort]);
    }

    #[test]
    fn disable_comma_separated_or_repeated() {
        assert!(run_args(&[]).unwrap().kernel.disable.is_empty());
        let r = run_args(&["--disable", "sock_calls,drops", "--disable", "tcp_errors"]).unwrap();
        assert_eq!(r.kernel.disable, [Concern::SockCalls, Concern::Drops, Concern::TcpErrors]);
        assert_eq!(
            r.kernel.disabled().concerns(),
            [Concern::SockCalls, Concern::UdpRelease, Concern::Drops, Concern::TcpErrors]
        );
        let check = Cli::try_parse_from(["observer", "check", "--disable", "udp_release"]).unwrap();
        let Command::Check(check) = check.command else { unreachable!() };
        assert_eq!(check.kernel.disable, [Concern::UdpRelease]);
    }

    #[test]
    fn max_sessions() {
        assert_eq!(run_args(&["--max-sessions", "262144"]).unwrap().max_sessions, 262_144);
        assert_eq!(run_args(&["--max-sessions", "4194304"]).unwrap().max_sessions, MAX_MAX_SESSIONS);
    }

    #[test]
    fn max_udp_flows() {
        assert_eq!(run_args(&[]).unwrap().max_udp_flows, DEFAULT_MAX_UDP_FLOWS);
        assert_eq!(run_args(&["--max-udp-flows", "262144"]).unwrap().max_udp_flows, 262_144);
        assert_eq!(run_args(&["--max-udp-flows", "2097152"]).unwrap().max_udp_flows, MAX_MAX_UDP_FLOWS);
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert!(parse_duration("30").unwrap_err().contains("has no unit"));
        assert_eq!(parse_duration("5h"), Ok(Duration::from_secs(5 * 3600)));
        assert_eq!(parse_duration("1d"), Ok(Duration::from_secs(86_400)));
        assert_eq!(parse_duration("1h 30m"), Ok(Duration::from_secs(5400)));
        assert!(parse_duration("5x").unwrap_err().contains("not a duration"));
        assert!(parse_duration("s").unwrap_err().contains("not a duration"));
        assert!(parse_duration("-1s").unwrap_err().contains("not a duration"));
        assert!(parse_duration("0s").unwrap_err().contains("is zero"));
    }

    #[test]
    fn repeatable_flags() {
        let r = run_args(&["--iface", "lo", "--iface", "eth0", "--label", "a=1", "--label", "b=2"]).unwrap();
        assert_eq!(r.ifaces, ["lo", "eth0"]);
        assert_eq!(r.labels.len(), 2);
    }

    #[test]
    fn bad_values_are_usage_errors_with_specific_messages() {
        for (args, needle) in [
            (&["--min-session-bytes", "0"][..], "at least 1 byte"),
            (&["--min-session-bytes", "1MB"][..], "not a whole number"),
            (&["--listen", "localhost"][..], "not ADDR:PORT"),
            (&["--label", "novalue"][..], "not KEY=VALUE"),
            (&["--probes", "ebpf"][..], "auto, fentry, kprobe, tracepoint"),
            (&["--udp-idle-timeout", "forever"][..], "not a duration"),
            (&["--active-gap", "0ms"][..], "is zero"),
            (&["--session-label", "pid"][..], "container_id"),
            (&["--peer-group", "10.0.0.0/40=x"][..], "not a CIDR network"),
            (&["--service-port", "0"][..], "not a port"),
            (&["--label-limit", "peer_port=none"][..], "at least 1"),
            (&["--max-label-sets", "0"][..], "whole number of label sets, at least 1"),
            (&["--series-ttl", "10"][..], "has no unit"),
            (&["--max-sessions", "0"][..], "at least 1"),
            (&["--max-sessions", "-1"][..], "not a whole number"),
            (&["--max-sessions", "4194305"][..], "preallocated kernel memory"),
            (&["--max-sessions", "99999999999999"][..], "preallocated kernel memory"),
            (&["--max-udp-flows", "0"][..], "table of UDP flows cannot be empty"),
            (&["--max-udp-flows", "many"][..], "not a whole number of flows"),
            (&["--max-udp-flows", "2097153"][..], "about 300 bytes an entry"),
            (&["--disable", "tcp_state"][..], "tcp_state cannot be switched off"),
            (&["--disable", "drops,tcp_state"][..], "sock_calls, udp_release, drops, tcp_errors"),
            (&["--disable", "drop"][..], "`drop` is not a concern (concerns that can be switched off: tcp_owner,"),
            (&["--disable", "drops,"][..], "an empty concern name"),
            (&["--state-dir", "observer"][..], "not an absolute path"),
            (&["--state-dir", "/sys/fs/bpf/../observer"][..], "contains `..`"),
            (&["--state-dir", "/"][..], "the root directory"),
        ] {
            let err = run_args(args).unwrap_err();
            assert!(matches!(err.kind(), ErrorKind::ValueValidation | ErrorKind::InvalidValue), "{args:?}");
            assert_eq!(err.exit_code(), 2);
            let text = err.to_string();
            assert!(text.contains(needle), "{args:?}: {text}");
        }
    }

    #[test]
    fn durations_in_hours_and_days() {
        let r = run_args(&["--series-ttl", "1d", "--udp-idle-timeout", "1h"]).unwrap();
        assert_eq!((r.series_ttl, r.udp_idle_timeout), (Duration::from_secs(86_400), Duration::from_secs(3600)));
    }

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }
}
