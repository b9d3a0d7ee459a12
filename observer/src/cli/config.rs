//! Where `observer run`'s settings come from, for every flag at once:
//! command line > environment (`OBSERVER_<FLAG>`) > `--config` file (TOML) >
//! the flag's default.
//!
//! Nothing here names a flag. The environment variables are added to clap's
//! own command definition, and the file's keys are the flags' long names,
//! turned into command-line arguments that clap then parses with the flag's
//! own value parser: a flag added to [`crate::cli::RunArgs`] is readable from
//! the environment and the file with no further code, and its values are
//! checked the same way wherever they come from.
use std::{
    ffi::OsString,
    path::{Path, PathBuf},
};

use clap::{
    Arg, ArgAction, ArgMatches, CommandFactory as _, FromArgMatches as _, error::ErrorKind, parser::ValueSource,
};

use crate::cli::Cli;

/// Prefix of the environment variables: `--min-session-bytes` is
/// `OBSERVER_MIN_SESSION_BYTES`.
pub const ENV_PREFIX: &str = "OBSERVER_";
/// The flag that names the configuration file; not a key of the file itself.
const CONFIG_ID: &str = "config";

/// The command line definition, every argument of every subcommand also read
/// from its environment variable (unless the argument names its own, as
/// `--log-level` does with `OBSERVER_LOG`).
pub fn command() -> clap::Command {
    Cli::command().mut_subcommands(|sub| sub.mut_args(with_env))
}

fn with_env(arg: Arg) -> Arg {
    match arg.get_long() {
        Some(long) if arg.get_env().is_none() => {
            let name = env_name(long);
            arg.env(OsString::from(name))
        }
        _ => arg,
    }
}

pub fn env_name(long: &str) -> String {
    format!("{ENV_PREFIX}{}", long.to_uppercase().replace('-', "_"))
}

/// Parses `argv` (program name first) with the environment and, for `run`,
/// the `--config` file. Errors are clap's, so `.exit()` prints them and exits
/// with code 2 (0 for `--help` and `--version`).
pub fn parse_from(argv: impl IntoIterator<Item = impl Into<OsString>>) -> Result<Cli, clap::Error> {
    let mut argv: Vec<OsString> = argv.into_iter().map(Into::into).collect();
    let mut cmd = command();
    let matches = cmd.try_get_matches_from_mut(&argv)?;
    if let Some(("run", run)) = matches.subcommand()
        && let Some(path) = run.get_one::<PathBuf>(CONFIG_ID)
    {
        let run_cmd = cmd.find_subcommand_mut("run").expect("run is a subcommand");
        // Reported with `run`'s usage line, as clap reports its own errors.
        let from_file =
            file_args(run_cmd, run, path).map_err(|message| run_cmd.error(ErrorKind::InvalidValue, message))?;
        if !from_file.is_empty() {
            // `run` takes no positional arguments, so flags appended after the
            // user's own still belong to it.
            argv.extend(from_file);
            let matches = cmd.try_get_matches_from_mut(&argv)?;
            return Cli::from_arg_matches(&matches);
        }
    }
    Cli::from_arg_matches(&matches)
}

/// The file's settings as `--flag=value` arguments, for the flags neither the
/// command line nor the environment set. Each is parsed on its own first, so
/// a bad value is reported with the file and key it came from.
fn file_args(run: &clap::Command, given: &ArgMatches, path: &Path) -> Result<Vec<OsString>, String> {
    let file = path.display();
    let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read configuration file {file}: {e}"))?;
    let table: toml::Table =
        text.parse().map_err(|e: toml::de::Error| format!("configuration file {file} is not valid TOML: {e}"))?;
    let mut out = Vec::new();
    for (key, value) in &table {
        let arg = find_key(run, key).map_err(|why| format!("configuration file {file}: {why}"))?;
        let set_elsewhere = matches!(
            given.value_source(arg.get_id().as_str()),
            Some(ValueSource::CommandLine | ValueSource::EnvVariable)
        );
        if set_elsewhere {
            continue;
        }
        let args = to_args(arg, key, value).map_err(|why| format!("configuration file {file}: key `{key}`: {why}"))?;
        let mut alone = vec![OsString::from("observer"), OsString::from("run")];
        alone.extend(args.iter().cloned());
        // The definition without environment variables: only this key's
        // value is checked here.
        if let Err(e) = Cli::command().try_get_matches_from(alone) {
            return Err(format!("configuration file {file}: key `{key}`: {}", clap_message(&e)));
        }
        out.extend(args);
    }
    Ok(out)
}

/// The `run` argument whose long name is `key`, or why there is none.
fn find_key<'a>(run: &'a clap::Command, key: &str) -> Result<&'a Arg, String> {
    if key == CONFIG_ID {
        return Err("`config` cannot be set in the configuration file itself".into());
    }
    if let Some(arg) = settable(run).find(|a| a.get_long() == Some(key)) {
        return Ok(arg);
    }
    let keys: Vec<&str> = settable(run).filter_map(Arg::get_long).collect();
    let nearest = keys
        .iter()
        .map(|k| (strsim::levenshtein(k, key), *k))
        .filter(|(distance, _)| *distance <= 3)
        .min()
        .map(|(_, k)| format!(" (did you mean `{k}`?)"))
        .unwrap_or_default();
    Err(format!("unknown key `{key}`{nearest}; valid keys are the long flags of `observer run`: {}", keys.join(", ")))
}

/// The arguments a file may set: all but `--config` and clap's `--help`.
fn settable(run: &clap::Command) -> impl Iterator<Item = &Arg> {
    run.get_arguments().filter(|a| {
        a.get_id() != CONFIG_ID
            && !matches!(
                a.get_action(),
                ArgAction::Help | ArgAction::HelpShort | ArgAction::HelpLong | ArgAction::Version
            )
    })
}

/// A TOML value as the flag's command-line arguments: scalars as text, an
/// array as the flag repeated (repeatable flags only), a boolean as the bare
/// flag for switches that take no value.
fn to_args(arg: &Arg, key: &str, value: &toml::Value) -> Result<Vec<OsString>, String> {
    let flag = |v: String| OsString::from(format!("--{key}={v}"));
    if !arg.get_action().takes_values() {
        return match value {
            toml::Value::Boolean(true) => Ok(vec![OsString::from(format!("--{key}"))]),
            toml::Value::Boolean(false) => Ok(Vec::new()),
            other => Err(format!("expected true or false, found {}", other.type_str())),
        };
    }
    match value {
        toml::Value::Array(items) if matches!(arg.get_action(), ArgAction::Append) => {
            items.iter().map(|item| scalar(item).map(flag)).collect()
        }
        toml::Value::Array(_) => Err("takes one value, not an array".into()),
        other => Ok(vec![flag(scalar(other)?)]),
    }
}

fn scalar(value: &toml::Value) -> Result<String, String> {
    match value {
        toml::Value::String(s) => Ok(s.clone()),
        toml::Value::Integer(i) => Ok(i.to_string()),
        toml::Value::Float(f) => Ok(f.to_string()),
        toml::Value::Boolean(b) => Ok(b.to_string()),
        other => Err(format!("expected a string, number or boolean, found {}", other.type_str())),
    }
}

/// The first line of a clap error without its `error: ` prefix.
fn clap_message(e: &clap::Error) -> String {
    let text = e.render().to_string();
    let line = text.lines().next().unwrap_or_default();
    line.strip_prefix("error: ").unwrap_or(line).to_string()
}

#[cfg(test)]
mod tests {
    use std::{
        sync::{
            Mutex, MutexGuard,
            atomic::{AtomicU32, Ordering},
        },
        time::Duration,
    };

    use super::*;
    use crate::cli::Command;

    /// Every parse reads the environment, and one test sets variables: the
    /// tests of this module run one at a time.
    static ENV: Mutex<()> = Mutex::new(());

    fn env_lock() -> MutexGuard<'static, ()> {
        ENV.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// A file under the temporary directory, removed on drop.
    struct TempFile(PathBuf);

    impl TempFile {
        fn new(text: Option<&str>) -> Self {
            static N: AtomicU32 = AtomicU32::new(0);
            let name = format!("observer-config-{}-{}.toml", std::process::id(), N.fetch_add(1, Ordering::Relaxed));
            let path = std::env::temp_dir().join(name);
            if let Some(text) = text {
                std::fs::write(&path, text).unwrap();
            }
            TempFile(path)
        }

        fn path(&self) -> &Path {
            &self.0
        }
    }

    impl Drop for TempFile {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    fn run_args(file: Option<&TempFile>, args: &[&str]) -> Result<crate::cli::RunArgs, clap::Error> {
        let mut argv = vec!["observer".to_string(), "run".to_string()];
        if let Some(f) = file {
            argv.extend(["--config".to_string(), f.path().display().to_string()]);
        }
        argv.extend(args.iter().map(|s| s.to_string()));
        parse_from(argv).map(|cli| match cli.command {
            Command::Run(r) => r,
            _ => unreachable!(),
        })
    }

    fn config(text: &str) -> TempFile {
        TempFile::new(Some(text))
    }

    fn error(file: &TempFile, args: &[&str]) -> String {
        let e = run_args(Some(file), args).unwrap_err();
        assert_eq!(e.exit_code(), 2);
        e.to_string()
    }

    #[test]
    fn every_run_flag_has_its_environment_variable() {
        let cmd = command();
        cmd.clone().debug_assert();
        let run = cmd.find_subcommand("run").unwrap();
        for arg in run.get_arguments().filter(|a| a.get_long().is_some()) {
            assert!(arg.get_env().is_some(), "--{} has no environment variable", arg.get_long().unwrap());
        }
        let env = |long: &str| run.get_arguments().find(|a| a.get_long() == Some(long)).unwrap().get_env();
        assert_eq!(env("gpu-interval").unwrap(), "OBSERVER_GPU_INTERVAL");
    }

    #[test]
    fn file_values_reach_every_kind_of_flag() {
        let _env = env_lock();
        let f = config(
            r#"
            min-session-bytes = 5000
            label = ["region=eu", "track=a"]
            iface = "lo"
            udp-idle-timeout = "10s"
            gpu = "off"
            probes = "tracepoint"
            disable = ["drops", "tcp_errors"]
            histograms = "native"
            "#,
        );
        let r = run_args(Some(&f), &[]).unwrap();
        assert_eq!(r.min_session_bytes, 5000);
        assert_eq!(r.labels.len(), 2);
        assert_eq!(r.ifaces, ["lo"]);
        assert_eq!(r.udp_idle_timeout, Duration::from_secs(10));
        assert_eq!(r.gpu.mode, crate::gpu::GpuMode::Off);
        assert_eq!(r.kernel.probes, crate::kernel::probes::ProbeMode::Tracepoint);
        use crate::kernel::probes::Concern;
        assert_eq!(r.kernel.disable, [Concern::Drops, Concern::TcpErrors]);
        assert_eq!(r.histograms, crate::metrics::native::HistogramMode::Native);
        let default = run_args(None, &[]).unwrap().histograms;
        assert_eq!(default, crate::metrics::native::HistogramMode::Both);
        let bad = error(&config("histograms = \"sparse\"\n"), &[]);
        assert!(bad.contains("key `histograms`") && bad.contains("sparse"), "{bad}");
    }

    /// The one test that sets environment variables (they are process-wide).
    #[test]
    fn command_line_beats_environment_beats_file_beats_default() {
        let _env = env_lock();
        let f = config("min-session-bytes = 5000\nactive-gap = \"2s\"\nlabel = [\"region=eu\"]\n");
        let env = env_name("min-session-bytes");
        assert_eq!(env, "OBSERVER_MIN_SESSION_BYTES");
        // SAFETY: the tests that parse hold the lock; nothing else in this
        // test binary reads these variables.
        unsafe { std::env::set_var(&env, "7000") };
        unsafe { std::env::set_var("OBSERVER_UDP_IDLE_TIMEOUT", "9s") };
        unsafe { std::env::set_var("OBSERVER_DISABLE", "sock_calls,drops") };
        let from_env = run_args(Some(&f), &[]);
        unsafe { std::env::remove_var("OBSERVER_DISABLE") };
        let from_cli = run_args(Some(&f), &["--min-session-bytes", "9000", "--label", "region=us"]);
        unsafe { std::env::set_var(&env, "zero") };
        let bad_env_value = run_args(None, &[]).map(|_| ());
        unsafe { std::env::remove_var(&env) };
        unsafe { std::env::remove_var("OBSERVER_UDP_IDLE_TIMEOUT") };

        let r = from_env.unwrap();
        assert_eq!(r.min_session_bytes, 7000, "environment over file");
        assert_eq!(r.active_gap, Duration::from_secs(2), "file over default");
        assert_eq!(r.udp_idle_timeout, Duration::from_secs(9), "environment over default");
        use crate::kernel::probes::Concern;
        assert_eq!(r.kernel.disable, [Concern::SockCalls, Concern::Drops], "a comma list from the environment");
        let r = from_cli.unwrap();
        assert_eq!(r.min_session_bytes, 9000, "command line over environment");
        assert_eq!(r.labels.len(), 1, "a repeatable flag given on the command line replaces the file's list");
        assert_eq!(r.labels[0].value, "us");
        let e = bad_env_value.unwrap_err();
        assert!(e.to_string().contains("not a whole number"), "{e}");
        assert_eq!(run_args(None, &[]).unwrap().min_session_bytes, crate::cli::DEFAULT_MIN_SESSION_BYTES);
    }

    #[test]
    fn unknown_key_names_the_key_the_file_and_the_nearest_valid_one() {
        let _env = env_lock();
        let f = config("min-sesion-bytes = 5\n");
        let e = error(&f, &[]);
        assert!(e.contains("unknown key `min-sesion-bytes`"), "{e}");
        assert!(e.contains(&f.path().display().to_string()), "{e}");
        assert!(e.contains("did you mean `min-session-bytes`?"), "{e}");
        assert!(e.contains("listen, iface"), "lists the valid keys: {e}");
        let e = error(&config("colour = 1\n"), &[]);
        assert!(e.contains("unknown key `colour`") && !e.contains("did you mean"), "{e}");
        assert!(error(&config("config = \"x\"\n"), &[]).contains("cannot be set in the configuration file"));
    }

    #[test]
    fn bad_value_names_the_file_the_key_and_what_was_wrong() {
        let _env = env_lock();
        let f = config("min-session-bytes = 0\n");
        let e = error(&f, &[]);
        assert!(e.contains(&format!("configuration file {}: key `min-session-bytes`", f.path().display())), "{e}");
        assert!(e.contains("at least 1 byte"), "{e}");
        let e = error(&config("label = [\"novalue\"]\n"), &[]);
        assert!(e.contains("key `label`") && e.contains("not KEY=VALUE"), "{e}");
        // The command line overrides a bad file value: it is never parsed.
        let f = config("listen = \"nowhere\"\n");
        assert!(run_args(Some(&f), &["--listen", "127.0.0.1:1"]).is_ok());
    }

    #[test]
    fn wrong_types_are_refused() {
        let _env = env_lock();
        for (text, needle) in [
            ("min-session-bytes = [1, 2]\n", "takes one value, not an array"),
            ("label = { region = \"eu\" }\n", "found table"),
            ("iface = [[\"lo\"]]\n", "found array"),
            ("listen = true\n", "not ADDR:PORT"),
        ] {
            let e = error(&config(text), &[]);
            assert!(e.contains(needle), "{text}: {e}");
        }
        let e = error(&config("min-session-bytes = \n"), &[]);
        assert!(e.contains("is not valid TOML"), "{e}");
        let e = run_args(Some(&TempFile::new(None)), &[]).unwrap_err();
        assert!(e.to_string().contains("cannot read configuration file"), "{e}");
    }
}
