//! The observer's own log on stderr: human-readable text by default, or one
//! JSON object per line for log collectors (`--log-format json`).
use clap::{Args, ValueEnum};
use tracing::Subscriber;
use tracing_subscriber::{EnvFilter, fmt::MakeWriter, util::SubscriberInitExt as _};

/// Filter when neither `--log-level` nor `OBSERVER_LOG` is given.
pub const DEFAULT_LEVEL: &str = "info";

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// One human-readable line per event.
    Text,
    /// One JSON object per line: timestamp, level, target, fields.
    Json,
}

#[derive(Debug, Clone, Args)]
pub struct LogArgs {
    /// Log format on stderr.
    #[arg(long, value_enum, value_name = "FORMAT", default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// Log filter: a level (error, warn, info, debug, trace) or per-module
    /// directives such as `info,observer=debug`. A filter that shows debug
    /// records of target `observer_ebpf` also has the kernel programs log
    /// rare events (a table full, ...), which they skip otherwise.
    // OBSERVER_LOG rather than the generic OBSERVER_LOG_LEVEL: the variable
    // this filter was always read from.
    #[arg(long, value_name = "FILTER", env = "OBSERVER_LOG", default_value = DEFAULT_LEVEL, value_parser = parse_filter)]
    pub log_level: String,
}

fn parse_filter(s: &str) -> Result<String, String> {
    EnvFilter::try_new(s)
        .map(|_| s.to_string())
        .map_err(|e| format!("`{s}` is not a log filter ({e}); for example info or info,observer=debug"))
}

/// Installs the process-wide subscriber (and the bridge from the `log` crate,
/// which aya logs through).
pub fn init(args: &LogArgs) {
    // Colour only for a person at a terminal: escape codes in a file or a log
    // collector's stream are noise.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    if let Err(e) = subscriber(args, std::io::stderr, ansi).try_init() {
        eprintln!("observer: cannot install the logger: {e}");
    }
}

fn subscriber<W>(args: &LogArgs, writer: W, ansi: bool) -> Box<dyn Subscriber + Send + Sync>
where
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    // Validated by clap already; a bad filter cannot reach here.
    let filter = EnvFilter::try_new(&args.log_level).unwrap_or_else(|_| EnvFilter::new(DEFAULT_LEVEL));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(writer).with_ansi(ansi);
    match args.log_format {
        LogFormat::Text => Box::new(builder.finish()),
        LogFormat::Json => Box::new(builder.json().finish()),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;

    /// A writer into shared memory, one buffer for all events.
    #[derive(Clone, Default)]
    struct Buffer(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Buffer {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn logged(format: LogFormat, level: &str) -> String {
        let buffer = Buffer::default();
        let args = LogArgs { log_format: format, log_level: level.into() };
        let out = buffer.clone();
        tracing::subscriber::with_default(subscriber(&args, move || out.clone(), false), || {
            tracing::info!(listen = "127.0.0.1:9470", "ready");
            tracing::warn!(concern = "drops", reason = "a \"quoted\" reason\nover two lines", "no hook");
            tracing::debug!("hidden at info");
        });
        String::from_utf8(buffer.0.lock().unwrap().clone()).unwrap()
    }

    #[test]
    fn json_lines_parse_as_json_with_level_and_fields() {
        let text = logged(LogFormat::Json, "info");
        let lines: Vec<serde_json::Value> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        assert_eq!(lines.len(), 2, "{text}");
        assert_eq!(lines[0]["level"], "INFO");
        assert_eq!(lines[0]["fields"]["message"], "ready");
        assert_eq!(lines[0]["fields"]["listen"], "127.0.0.1:9470");
        assert_eq!(lines[1]["fields"]["reason"], "a \"quoted\" reason\nover two lines");
        assert!(lines[1]["timestamp"].is_string());
    }

    /// The kernel programs' diagnostics are switched on exactly when the
    /// filter would show their debug records.
    #[test]
    fn kernel_diagnostics_follow_the_filter() {
        let wanted = |level: &str| {
            let args = LogArgs { log_format: LogFormat::Text, log_level: level.into() };
            tracing::subscriber::with_default(
                subscriber(&args, std::io::sink, false),
                crate::kernel::diagnostics::wanted,
            )
        };
        // A directive's target matches by prefix: `observer` covers `observer_ebpf`.
        for level in ["debug", "trace", "info,observer_ebpf=debug", "warn,observer_ebpf=trace", "info,observer=debug"] {
            assert!(wanted(level), "{level}");
        }
        for level in ["info", "warn", "debug,observer_ebpf=info", "info,observer::cli=debug"] {
            assert!(!wanted(level), "{level}");
        }
    }

    #[test]
    fn text_is_the_default_and_the_filter_applies() {
        let text = logged(LogFormat::Text, "info");
        assert!(text.contains("INFO") && text.contains("ready") && !text.contains("hidden"), "{text}");
        assert!(!text.contains('\x1b'), "escape codes in a log that is not a terminal: {text:?}");
        assert!(logged(LogFormat::Text, "debug").contains("hidden at info"));
        assert!(parse_filter("info,observer=debug").is_ok());
        assert!(parse_filter("info,=[").unwrap_err().contains("not a log filter"));
    }
}
