//! Bad input: a clear message naming what was wrong and exit code 2, never a
//! panic, and nothing left loaded.
use std::{net::TcpListener, process::Command, time::Duration};

use observer_tests::{TempDir, observer_bin, run_observer_cli, run_with_timeout};

fn run(args: &[&str]) -> (i32, String) {
    let mut argv = vec!["run"];
    argv.extend_from_slice(args);
    let out = run_observer_cli(&argv).unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!stderr.contains("panicked"), "{stderr}");
    (out.status.code().unwrap_or(-1), stderr)
}

fn assert_usage_error(args: &[&str], needles: &[&str]) {
    let (code, stderr) = run(args);
    assert_eq!(code, 2, "{args:?}: {stderr}");
    for needle in needles {
        assert!(stderr.contains(needle), "{args:?}: expected {needle:?} in {stderr}");
    }
}

#[test]
fn unprivileged_user_is_told_which_capabilities_are_needed() {
    // setpriv (util-linux) drops to nobody with no capabilities at all.
    let mut cmd = Command::new("setpriv");
    cmd.args(["--reuid=65534", "--regid=65534", "--clear-groups", "--inh-caps=-all"]).arg(observer_bin()).args([
        "run",
        "--listen",
        "127.0.0.1:0",
    ]);
    let out = run_with_timeout(&mut cmd, Duration::from_secs(30)).unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("run it as root or grant CAP_BPF and CAP_PERFMON"), "{stderr}");
    assert!(stderr.contains("lacks CAP_BPF, CAP_PERFMON, CAP_NET_ADMIN"), "{stderr}");
}

#[test]
fn unknown_interface_lists_the_existing_ones() {
    assert_usage_error(
        &["--listen", "127.0.0.1:0", "--iface", "lo", "--iface", "nosuchif0"],
        &["no network interface named `nosuchif0`", "interfaces here:", "lo"],
    );
}

#[test]
fn malformed_labels() {
    assert_usage_error(&["--label", "region"], &["invalid value 'region' for '--label <KEY=VALUE>'", "not KEY=VALUE"]);
    assert_usage_error(&["--label", "1x=y"], &["label name `1x` is not valid"]);
    assert_usage_error(&["--label", "direction=up"], &["set by the observer itself"]);
    assert_usage_error(
        &["--listen", "127.0.0.1:0", "--label", "a=1", "--label", "a=2"],
        &["--label `a` is given more than once"],
    );
}

#[test]
fn bad_min_session_bytes() {
    assert_usage_error(&["--min-session-bytes", "lots"], &["`lots` is not a whole number of bytes"]);
    assert_usage_error(&["--min-session-bytes", "0"], &["must be at least 1 byte"]);
    assert_usage_error(&["--min-session-bytes", "-5"], &["--min-session-bytes", "`-5` is not a whole number of bytes"]);
}

#[test]
fn unusable_listen_address() {
    assert_usage_error(&["--listen", "localhost"], &["`localhost` is not ADDR:PORT"]);
    assert_usage_error(&["--listen", "127.0.0.1:99999"], &["is not ADDR:PORT"]);
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    assert_usage_error(
        &["--listen", &addr],
        &[&format!("cannot listen on {addr}"), "Address already in use", "--listen"],
    );
}

#[test]
fn disabling_a_required_or_unknown_concern() {
    let valid = "concerns that can be switched off: tcp_owner, sock_calls, udp_release, drops, tcp_errors";
    assert_usage_error(
        &["--disable", "tcp_state"],
        &["invalid value 'tcp_state' for '--disable <CONCERN>'", "tcp_state cannot be switched off", valid],
    );
    assert_usage_error(&["--disable", "drops,tcp_state"], &["tcp_state cannot be switched off"]);
    assert_usage_error(&["--disable", "sockcalls"], &["`sockcalls` is not a concern", valid]);
    // `check` takes the same flag, and refuses the same way.
    let out = run_observer_cli(&["check", "--disable", "tcp_state"]).unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("tcp_state cannot be switched off"), "{stderr}");
}

#[test]
fn forcing_a_tier_the_kernel_lacks_fails_with_the_reason() {
    let report = String::from_utf8_lossy(&run_observer_cli(&["check"]).unwrap().stdout).into_owned();
    // The tcp_state hook of each tier, as `observer_probe_info{hook}` names it.
    for (tier, hook) in [("fentry", "fentry/tcp_set_state+tcp_v4_destroy_sock"), ("kprobe", "kprobe/tcp_set_state")] {
        if report.contains(&format!("tier {tier}: available")) {
            continue;
        }
        assert_usage_error(
            &["--listen", "127.0.0.1:0", "--probes", tier],
            &[&format!("no usable kernel hook for tcp_state: {hook}: {tier} unavailable:")],
        );
    }
}

#[test]
fn bad_configuration_files_name_the_file_and_the_key() {
    let tmp = TempDir::new("bad-config").unwrap();
    let file = |name: &str, text: &str| {
        let path = tmp.path().join(name);
        std::fs::write(&path, text).unwrap();
        path.display().to_string()
    };
    let typo = file("typo.toml", "min-sesion-bytes = 5\n");
    assert_usage_error(
        &["--config", &typo],
        &[&format!("configuration file {typo}: unknown key `min-sesion-bytes`"), "did you mean `min-session-bytes`?"],
    );
    let zero = file("zero.toml", "min-session-bytes = 0\n");
    assert_usage_error(
        &["--config", &zero],
        &[&format!("configuration file {zero}: key `min-session-bytes`"), "must be at least 1 byte"],
    );
    let broken = file("broken.toml", "label = [\"region=eu\"\n");
    assert_usage_error(&["--config", &broken], &[&format!("configuration file {broken} is not valid TOML")]);
    let missing = tmp.path().join("missing.toml").display().to_string();
    assert_usage_error(&["--config", &missing], &[&format!("cannot read configuration file {missing}")]);
    // A value from the file reaches the program (here, the address it binds).
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let listen = file("listen.toml", &format!("listen = \"{addr}\"\n"));
    assert_usage_error(&["--config", &listen], &[&format!("cannot listen on {addr}")]);
}

#[test]
fn bad_state_dir() {
    assert_usage_error(&["--state-dir", "observer"], &["`observer` is not an absolute path", "--state-dir"]);
    assert_usage_error(&["--state-dir", "/sys/fs/bpf/../observer"], &["contains `..`"]);
    assert_usage_error(&["--state-dir", "/"], &["is the root directory"]);
    // A directory that is not on a bpf filesystem: refused before anything
    // is loaded, with how to mount one or keep no state.
    let tmp = TempDir::new("state-dir").unwrap();
    let dir = tmp.path().join("state");
    assert_usage_error(
        &["--listen", "127.0.0.1:0", "--state-dir", dir.to_str().unwrap()],
        &["is not on a bpf filesystem", "mount -t bpf bpf /sys/fs/bpf", "--state-dir ''"],
    );
    // A file where the directory should be.
    let file = tmp.path().join("file");
    std::fs::write(&file, "").unwrap();
    assert_usage_error(
        &["--listen", "127.0.0.1:0", "--state-dir", file.join("sub").to_str().unwrap()],
        &["cannot create state directory"],
    );
    let out = run_observer_cli(&["cleanup", "--state-dir", "relative"]).unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", String::from_utf8_lossy(&out.stderr));
}
