//! `--web-config-file`: TLS and basic authentication for the metrics server,
//! in the file format of Prometheus exporters' web configuration
//! (exporter-toolkit), so the files operators already have work here:
//!
//! ```yaml
//! tls_server_config:
//!   cert_file: server.crt   # PEM chain; relative paths from the file's directory
//!   key_file: server.key
//! basic_auth_users:
//!   prometheus: $2y$10$...  # bcrypt hash (htpasswd -nBC 10 "" | tr -d ':\n')
//! ```
//!
//! Only these two sections exist here; any other key is refused by name, so a
//! setting the operator believes active is never silently ignored.
use std::{
    collections::{BTreeMap, HashSet},
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::Duration,
};

use base64::Engine as _;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject as _};
use serde::Deserialize;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_rustls::TlsAcceptor;

/// Successful checks remembered, so a scraper's every request does not cost
/// a bcrypt verification (tens of milliseconds of CPU at cost 10). As in
/// Prometheus' exporter-toolkit: keyed by a hash of user, password and stored
/// hash (no password is kept), at most this many; one is forgotten to make room.
pub const AUTH_CACHE_SIZE: usize = 100;
/// bcrypt verifications run at once; further requests wait for one up to
/// [`BCRYPT_WAIT`], then are answered 503.
pub const BCRYPT_AT_ONCE: usize = 2;
pub const BCRYPT_WAIT: Duration = Duration::from_secs(2);

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    tls_server_config: Option<TlsFiles>,
    basic_auth_users: Option<BTreeMap<String, String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TlsFiles {
    cert_file: PathBuf,
    key_file: PathBuf,
}

/// What the file asks for: TLS on every connection, a password on the data
/// endpoints, or both.
#[derive(Default)]
pub struct WebConfig {
    pub tls: Option<TlsAcceptor>,
    pub auth: Option<BasicAuth>,
}

/// Reads and checks the file: certificate and key load and match, every
/// password hash is a bcrypt hash. The error says which file and what is wrong.
pub fn load(path: &Path) -> Result<WebConfig, String> {
    let file = path.display();
    let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read web configuration file {file}: {e}"))?;
    // An empty file is valid YAML (null): no TLS, no authentication.
    let parsed: Option<File> =
        serde_saphyr::from_str(&text).map_err(|e| format!("web configuration file {file}: {e}"))?;
    let Some(parsed) = parsed else { return Ok(WebConfig::default()) };
    let base = path.parent().unwrap_or(Path::new("."));
    let tls = parsed
        .tls_server_config
        .map(|t| tls_acceptor(&base.join(&t.cert_file), &base.join(&t.key_file)))
        .transpose()
        .map_err(|e| format!("web configuration file {file}: tls_server_config: {e}"))?;
    let auth = parsed
        .basic_auth_users
        .map(BasicAuth::new)
        .transpose()
        .map_err(|e| format!("web configuration file {file}: basic_auth_users: {e}"))?;
    Ok(WebConfig { tls, auth })
}

fn tls_acceptor(cert_file: &Path, key_file: &Path) -> Result<TlsAcceptor, String> {
    let certs = CertificateDer::pem_file_iter(cert_file)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("cert_file {}: {e}", cert_file.display()))?;
    if certs.is_empty() {
        return Err(format!("cert_file {}: no PEM certificate in it", cert_file.display()));
    }
    let key = PrivateKeyDer::from_pem_file(key_file).map_err(|e| format!("key_file {}: {e}", key_file.display()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .and_then(|b| b.with_no_client_auth().with_single_cert(certs, key))
        .map_err(|e| format!("certificate and key: {e}"))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// Users and their bcrypt password hashes, the checks that succeeded lately
/// and the bound on bcrypt work.
pub struct BasicAuth {
    users: BTreeMap<String, String>,
    /// SHA-256 of (user, password, stored hash) of successful checks; a
    /// changed password hash (a new file) never matches an old entry.
    cache: Mutex<HashSet<[u8; 32]>>,
    bcrypt: Arc<Semaphore>,
}

/// What the cache says about an `Authorization` header.
#[derive(Debug, PartialEq, Eq)]
pub enum Cached {
    /// These credentials passed a bcrypt check before.
    Allowed,
    /// No user and password in it: refused without a bcrypt check.
    Malformed,
    /// Needs a bcrypt verification ([`BasicAuth::allows`]).
    Unknown,
}

impl BasicAuth {
    fn new(users: BTreeMap<String, String>) -> Result<Self, String> {
        if users.is_empty() {
            return Err("no user (remove the section to serve without authentication)".into());
        }
        for (user, hash) in &users {
            hash.parse::<bcrypt::HashParts>()
                .map_err(|e| format!("user `{user}`: the password must be a bcrypt hash ($2y$...): {e}"))?;
        }
        Ok(BasicAuth { users, cache: Mutex::new(HashSet::new()), bcrypt: Arc::new(Semaphore::new(BCRYPT_AT_ONCE)) })
    }

    /// Whether the header is settled without bcrypt: cheap, on any thread.
    pub fn cached(&self, authorization: Option<&[u8]>) -> Cached {
        let Some((user, password)) = authorization.and_then(decode_basic) else { return Cached::Malformed };
        match self.users.get(&user) {
            Some(hash) if self.cache().contains(&cache_key(&user, &password, hash)) => Cached::Allowed,
            _ => Cached::Unknown,
        }
    }

    /// A turn to run bcrypt, waiting up to [`BCRYPT_WAIT`]; `None`: too many
    /// verifications are running (answer 503). Hold it until `allows` returns.
    pub async fn bcrypt_turn(&self) -> Option<OwnedSemaphorePermit> {
        tokio::time::timeout(BCRYPT_WAIT, self.bcrypt.clone().acquire_owned()).await.ok()?.ok()
    }

    /// Whether an `Authorization` header names a user with the right
    /// password. Costs one bcrypt verification (tens of milliseconds at the
    /// usual cost 10) unless these credentials passed before: call it off the
    /// async workers, holding a [`BasicAuth::bcrypt_turn`].
    pub fn allows(&self, authorization: Option<&[u8]>) -> bool {
        let Some((user, password)) = authorization.and_then(decode_basic) else { return false };
        match self.users.get(&user) {
            Some(hash) => {
                let key = cache_key(&user, &password, hash);
                if self.cache().contains(&key) {
                    return true;
                }
                let ok = bcrypt::verify(password, hash).unwrap_or(false);
                if ok {
                    let mut cache = self.cache();
                    if cache.len() >= AUTH_CACHE_SIZE {
                        let any = *cache.iter().next().expect("a full cache has an entry");
                        cache.remove(&any);
                    }
                    cache.insert(key);
                }
                ok
            }
            None => {
                // Same work for an unknown user, so the time taken does not
                // tell which users exist.
                let any = self.users.values().next().expect("at least one user");
                let _ = bcrypt::verify(password, any);
                false
            }
        }
    }

    fn cache(&self) -> std::sync::MutexGuard<'_, HashSet<[u8; 32]>> {
        self.cache.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// SHA-256 of the three, each length-prefixed so that no two triples share
/// an input.
fn cache_key(user: &str, password: &str, hash: &str) -> [u8; 32] {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    for part in [user, password, hash] {
        ctx.update(&(part.len() as u64).to_le_bytes());
        ctx.update(part.as_bytes());
    }
    ctx.finish().as_ref().try_into().expect("SHA-256 is 32 bytes")
}

/// `Basic base64(user:password)` as (user, password).
fn decode_basic(header: &[u8]) -> Option<(String, String)> {
    let encoded = header.strip_prefix(b"Basic ").or_else(|| header.strip_prefix(b"basic "))?;
    let decoded = base64::engine::general_purpose::STANDARD.decode(encoded.trim_ascii()).ok()?;
    let text = String::from_utf8(decoded).ok()?;
    let (user, password) = text.split_once(':')?;
    Some((user.to_string(), password.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        path
    }

    fn temp_dir(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("observer-web-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn basic_auth_checks_user_and_password() {
        let hash = bcrypt::hash("secret", 4).unwrap();
        let auth = BasicAuth::new([("alice".to_string(), hash)].into()).unwrap();
        let header = |s: &str| format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(s));
        assert!(auth.allows(Some(header("alice:secret").as_bytes())));
        assert!(!auth.allows(Some(header("alice:wrong").as_bytes())));
        assert!(!auth.allows(Some(header("bob:secret").as_bytes())));
        assert!(!auth.allows(Some(b"Basic !!!")));
        assert!(!auth.allows(Some(b"Bearer abc")));
        assert!(!auth.allows(None));
    }

    #[test]
    fn successful_checks_are_cached_and_bounded() {
        let hash = bcrypt::hash("secret", 4).unwrap();
        let auth = BasicAuth::new([("alice".to_string(), hash)].into()).unwrap();
        let header = |s: &str| format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(s));
        let good = header("alice:secret");
        assert_eq!(auth.cached(Some(good.as_bytes())), Cached::Unknown, "not checked yet");
        assert_eq!(auth.cached(Some(b"Bearer abc")), Cached::Malformed);
        assert!(auth.allows(Some(good.as_bytes())));
        assert_eq!(auth.cached(Some(good.as_bytes())), Cached::Allowed);
        // Failures are not remembered (they would let anyone fill the cache).
        let bad = header("alice:wrong");
        assert!(!auth.allows(Some(bad.as_bytes())));
        assert_eq!(auth.cached(Some(bad.as_bytes())), Cached::Unknown);
        assert_eq!(auth.cache().len(), 1);
        // The key covers the stored hash: a new hash for the same password
        // is verified again.
        let rehashed = BasicAuth::new([("alice".to_string(), bcrypt::hash("secret", 4).unwrap())].into()).unwrap();
        *rehashed.cache() = auth.cache().clone();
        assert_eq!(rehashed.cached(Some(good.as_bytes())), Cached::Unknown);
        // Bounded: many users' successes keep at most AUTH_CACHE_SIZE entries.
        let hash = bcrypt::hash("pw", 4).unwrap();
        let users = (0..AUTH_CACHE_SIZE + 20).map(|i| (format!("u{i}"), hash.clone())).collect();
        let many = BasicAuth::new(users).unwrap();
        for i in 0..AUTH_CACHE_SIZE + 20 {
            assert!(many.allows(Some(header(&format!("u{i}:pw")).as_bytes())));
        }
        assert_eq!(many.cache().len(), AUTH_CACHE_SIZE);
    }

    #[tokio::test]
    async fn bcrypt_turns_are_bounded() {
        let auth = BasicAuth::new([("alice".to_string(), bcrypt::hash("x", 4).unwrap())].into()).unwrap();
        let mut held = Vec::new();
        for _ in 0..BCRYPT_AT_ONCE {
            held.push(auth.bcrypt_turn().await.expect("a free turn"));
        }
        let started = std::time::Instant::now();
        assert!(auth.bcrypt_turn().await.is_none(), "all turns held: refused");
        assert!(started.elapsed() >= BCRYPT_WAIT, "after waiting BCRYPT_WAIT");
        held.pop();
        assert!(auth.bcrypt_turn().await.is_some());
    }

    #[test]
    fn bad_files_say_which_file_and_what() {
        let dir = temp_dir("bad");
        let err = |text: &str| load(&write(&dir, "web.yml", text)).err().unwrap();
        let e = err("basic_auth_users:\n  alice: plaintext\n");
        assert!(e.contains("web.yml") && e.contains("user `alice`") && e.contains("bcrypt hash"), "{e}");
        let e = err("tls_server_config:\n  cert_file: nope.crt\n  key_file: nope.key\n");
        assert!(e.contains("tls_server_config: cert_file") && e.contains("nope.crt"), "{e}");
        let e = err("http_server_config:\n  http2: false\n");
        assert!(e.contains("unknown field `http_server_config`"), "{e}");
        let e = err("basic_auth_users: [alice]\n");
        assert!(e.contains("basic_auth_users"), "{e}");
        assert!(load(&dir.join("missing.yml")).err().unwrap().contains("cannot read web configuration file"));
        let empty = load(&write(&dir, "empty.yml", "")).unwrap();
        assert!(empty.tls.is_none() && empty.auth.is_none());
        std::fs::remove_dir_all(dir).unwrap();
    }
}
