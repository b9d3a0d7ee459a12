//! `--web-config-file`: with a certificate made at test time (rcgen) and a
//! bcrypt-hashed user, the metrics are served over HTTPS only, to the right
//! password only; health endpoints need none. A bad file exits 2.
//! The client is curl, a real TLS and HTTP implementation no one here wrote.
use std::{path::Path, time::Duration};

use observer_tests::{
    NetNs, ObserverProcess, TempDir, TlsWebConfig, WEB_PASSWORD, WEB_USER, run_observer_cli, wait_until,
};

/// curl's view of one request: the HTTP status (0 when there was no HTTP
/// answer at all) and its exit code.
fn curl(ns: &NetNs, cacert: &Path, url: &str, credentials: Option<&str>) -> (u16, i32) {
    let answer = observer_tests::curl(ns, cacert, url, credentials).unwrap();
    (answer.status, answer.exit)
}

#[test]
fn https_and_basic_auth_from_a_web_config_file() {
    let ns = NetNs::new("webcfg").unwrap();
    // Relative paths are read from the file's directory, as exporters do.
    let tls = TlsWebConfig::new().unwrap();
    let (web, cacert) = (&tls.file, &tls.cacert);

    let mut observer =
        ObserverProcess::spawn(&ns, &["--iface", "lo", "--web-config-file", web.to_str().unwrap()]).unwrap();
    let addr = observer.addr();
    let url = |path: &str| format!("https://{addr}{path}");
    wait_until("/readyz over HTTPS", Duration::from_secs(60), Duration::from_millis(200), || {
        if let Some(status) = observer.try_status()? {
            anyhow::bail!("observer exited ({status}): {}", observer.log());
        }
        Ok((curl(&ns, cacert, &url("/readyz"), None).0 == 200).then_some(()))
    })
    .unwrap();

    let right = TlsWebConfig::credentials();
    for path in ["/metrics", "/api/v1/snapshot"] {
        assert_eq!(curl(&ns, cacert, &url(path), Some(&right)).0, 200, "{path} with the password");
        assert_eq!(curl(&ns, cacert, &url(path), None).0, 401, "{path} without credentials");
        assert_eq!(curl(&ns, cacert, &url(path), Some(&format!("{WEB_USER}:wrong"))).0, 401, "{path} wrong password");
        assert_eq!(
            curl(&ns, cacert, &url(path), Some(&format!("nobody:{WEB_PASSWORD}"))).0,
            401,
            "{path} unknown user"
        );
    }
    assert_eq!(curl(&ns, cacert, &url("/healthz"), None).0, 200, "health needs no password");
    // Plain HTTP gets no HTTP answer: the server expects a TLS handshake.
    let (status, exit) = curl(&ns, cacert, &format!("http://{addr}/metrics"), Some(&right));
    assert!(status == 0 && exit != 0, "plain HTTP answered {status} (curl exit {exit})");
    assert_eq!(curl(&ns, cacert, &url("/metrics"), Some(&right)).0, 200, "still serving afterwards");

    let stopped = observer.stop().unwrap();
    assert_eq!(stopped.status.code(), Some(0), "{}", observer.log());
    assert!(observer.log().contains(&format!("serving metrics on https://{addr}/metrics")), "{}", observer.log());
}

#[test]
fn bad_web_config_files_exit_2_naming_the_file() {
    let tmp = TempDir::new("bad-web-config").unwrap();
    for (text, needle) in [
        ("basic_auth_users:\n  alice: plaintext\n", "user `alice`: the password must be a bcrypt hash"),
        ("tls_server_config:\n  cert_file: none.crt\n  key_file: none.key\n", "tls_server_config: cert_file"),
        ("tls_config:\n  cert_file: a\n", "unknown field `tls_config`"),
    ] {
        let web = tmp.path().join("web.yml");
        std::fs::write(&web, text).unwrap();
        let out =
            run_observer_cli(&["run", "--listen", "127.0.0.1:0", "--web-config-file", web.to_str().unwrap()]).unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{text}: {stderr}");
        assert!(stderr.contains(&format!("web configuration file {}", web.display())), "{stderr}");
        assert!(stderr.contains(needle), "{text}: expected {needle:?} in {stderr}");
    }
}
