//! A `--web-config-file` with TLS and basic authentication, and curl (a
//! real TLS and HTTP implementation no one here wrote) as its client.
use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use anyhow::Result;

use crate::{NetNs, TempDir, run_with_timeout};

pub const WEB_USER: &str = "prometheus";
pub const WEB_PASSWORD: &str = "s3cret pass";

/// A self-signed certificate for 127.0.0.1 made at test time, its key, and
/// one user ([`WEB_USER`], [`WEB_PASSWORD`], bcrypt-hashed), written as an
/// exporter-toolkit web.yml with paths relative to it, as exporters read them.
pub struct TlsWebConfig {
    _dir: TempDir,
    /// The web.yml to give `--web-config-file`.
    pub file: PathBuf,
    /// The certificate, for the client to trust.
    pub cacert: PathBuf,
}

impl TlsWebConfig {
    pub fn new() -> Result<Self> {
        let dir = TempDir::new("web-config")?;
        let cert = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_string(), "localhost".to_string()])?;
        std::fs::write(dir.path().join("server.crt"), cert.cert.pem())?;
        std::fs::write(dir.path().join("server.key"), cert.signing_key.serialize_pem())?;
        let hash = bcrypt::hash(WEB_PASSWORD, 4)?;
        let file = dir.path().join("web.yml");
        std::fs::write(
            &file,
            format!(
                "tls_server_config:\n  cert_file: server.crt\n  key_file: server.key\nbasic_auth_users:\n  {WEB_USER}: '{hash}'\n"
            ),
        )?;
        let cacert = dir.path().join("server.crt");
        Ok(TlsWebConfig { _dir: dir, file, cacert })
    }

    /// `user:password` of the configured user.
    pub fn credentials() -> String {
        format!("{WEB_USER}:{WEB_PASSWORD}")
    }
}

/// What curl got for one request.
#[derive(Debug)]
pub struct CurlAnswer {
    /// The HTTP status, 0 when there was no HTTP answer at all.
    pub status: u16,
    /// curl's exit code.
    pub exit: i32,
    pub body: String,
}

/// `GET url` with curl inside `ns`, trusting `cacert`, with `credentials`
/// (`user:password`) for basic authentication if given.
pub fn curl(ns: &NetNs, cacert: &Path, url: &str, credentials: Option<&str>) -> Result<CurlAnswer> {
    let mut cmd: Command = ns.command_setns("curl");
    cmd.args(["-sS", "--max-time", "10", "-w", "\n%{http_code}", "--cacert"]).arg(cacert);
    if let Some(c) = credentials {
        cmd.args(["-u", c]);
    }
    let out = run_with_timeout(cmd.arg(url), Duration::from_secs(20))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let (body, code) = stdout.rsplit_once('\n').unwrap_or(("", &stdout));
    Ok(CurlAnswer {
        status: code.trim().parse().unwrap_or(0),
        exit: out.status.code().unwrap_or(-1),
        body: body.into(),
    })
}
