//! API keys: who may call `/v1/*`, and which models each key may use.
//!
//! Keys live in a JSON file (`--api-keys`) that holds, per key, its id, tenant, the SHA-256 of its secret
//! (never the secret), and optionally the models it may use. A request's `Authorization: Bearer SECRET` is
//! hashed and looked up. The file is re-read when it changes on disk or on SIGHUP; a file that no longer
//! parses is refused with a log line and the previous keys stay in force, so a bad edit never locks
//! everyone out, and requests in flight are never dropped by a reload.

use std::{
    collections::{HashMap, HashSet},
    path::{Path, PathBuf},
    sync::{Arc, RwLock},
    time::Duration,
};

use anyhow::{Context, Result, bail};
use axum::{
    extract::{Request, State},
    http::{StatusCode, header},
    middleware::Next,
    response::{IntoResponse, Response},
};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::{
    error::ApiError,
    limits::{KeyLimits, Limiter, Slot, Snapshot},
};

/// One key as the file describes it.
#[derive(Deserialize, Serialize, Debug, Clone, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct KeyEntry {
    pub id: String,
    pub tenant: String,
    /// Lower-case hex SHA-256 of the secret.
    pub secret_sha256: String,
    /// Models the key may use; absent means all.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub models: Option<Vec<String>>,
    /// Rate and size limits; absent means none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limits: Option<KeyLimits>,
    /// Share of the server under contention relative to other keys (fair queuing); default 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight: Option<f64>,
    /// May read everyone's usage (`GET /v1/usage`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub admin: bool,
}

impl KeyEntry {
    pub fn allows(&self, model: &str) -> bool {
        self.models.as_ref().is_none_or(|m| m.iter().any(|x| x == model))
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyFile {
    keys: Vec<KeyEntry>,
}

/// The caller of a request (no key when the server runs without keys) and, for a key with limits, its
/// hold on them, which the handler takes over for the life of the response.
#[derive(Clone)]
pub struct Caller {
    pub key: Option<Arc<KeyEntry>>,
    pub slot: Option<Arc<std::sync::Mutex<Option<Slot>>>>,
}

impl Caller {
    pub fn take_slot(&self) -> Option<Slot> {
        self.slot.as_ref().and_then(|s| s.lock().ok()?.take())
    }
}

pub fn sha256_hex(secret: &str) -> String {
    Sha256::digest(secret.as_bytes()).iter().map(|b| format!("{b:02x}")).collect()
}

/// A parsed, validated key file.
#[derive(Debug, Default)]
pub struct Keys {
    by_hash: HashMap<String, Arc<KeyEntry>>,
}

impl Keys {
    pub fn parse(text: &str, path: &Path) -> Result<Self> {
        let file: KeyFile =
            serde_json::from_str(text).with_context(|| format!("{}: not a valid key file", path.display()))?;
        let mut ids = HashSet::new();
        let mut by_hash = HashMap::new();
        for (i, k) in file.keys.into_iter().enumerate() {
            if k.id.is_empty() || !ids.insert(k.id.clone()) {
                bail!("{}: keys[{i}].id: empty or used twice ({:?})", path.display(), k.id);
            }
            if k.secret_sha256.len() != 64
                || !k.secret_sha256.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
            {
                bail!(
                    "{}: keys[{i}].secret_sha256: expected 64 lower-case hex digits (the key {:?})",
                    path.display(),
                    k.id
                );
            }
            // Ids and tenants go into log lines, metrics labels and `tessera usage`'s table.
            for (field, v) in [("id", &k.id), ("tenant", &k.tenant)] {
                if v.chars().any(char::is_control) {
                    bail!("{}: keys[{i}].{field}: control characters are not allowed ({v:?})", path.display());
                }
            }
            if let Some(field) = k.limits.as_ref().and_then(KeyLimits::zero_field) {
                bail!(
                    "{}: keys[{i}].limits.{field}: must be at least 1 (the key {:?}); leave it out for no limit",
                    path.display(),
                    k.id
                );
            }
            if let Some(w) = k.weight
                && !(w.is_finite() && w > 0.0)
            {
                bail!("{}: keys[{i}].weight: must be a positive number (the key {:?}), got {w}", path.display(), k.id);
            }
            if by_hash.insert(k.secret_sha256.clone(), Arc::new(k.clone())).is_some() {
                bail!("{}: keys[{i}].secret_sha256: two keys share a secret ({:?})", path.display(), k.id);
            }
        }
        Ok(Keys { by_hash })
    }

    pub fn lookup(&self, secret: &str) -> Option<Arc<KeyEntry>> {
        self.by_hash.get(&sha256_hex(secret)).cloned()
    }

    pub fn len(&self) -> usize {
        self.by_hash.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_hash.is_empty()
    }
}

/// The key file and the keys currently in force.
pub struct KeyStore {
    path: PathBuf,
    keys: RwLock<Arc<Keys>>,
    /// SHA-256 of the file's contents as last read (loaded, or refused): a change is noticed by content,
    /// not by modification time, which `cp -p` and `rsync -t` restore.
    seen: RwLock<Option<String>>,
}

/// Largest key file read: a key entry is a few hundred bytes.
const MAX_KEY_FILE_BYTES: u64 = 16 << 20;

fn read_key_file(path: &Path) -> Result<String> {
    let len = std::fs::metadata(path).with_context(|| format!("reading {}", path.display()))?.len();
    if len > MAX_KEY_FILE_BYTES {
        bail!("{}: {len} bytes, more than a key file's {MAX_KEY_FILE_BYTES}", path.display());
    }
    std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))
}

impl KeyStore {
    /// Loads `path`; an unreadable or invalid file is an error at start.
    pub fn open(path: &Path) -> Result<Arc<Self>> {
        let text = read_key_file(path)?;
        let keys = Keys::parse(&text, path)?;
        Ok(Arc::new(KeyStore {
            path: path.to_path_buf(),
            keys: RwLock::new(Arc::new(keys)),
            seen: RwLock::new(Some(sha256_hex(&text))),
        }))
    }

    pub fn current(&self) -> Arc<Keys> {
        self.keys.read().expect("key store lock").clone()
    }

    /// Re-reads the file. On error the keys in force stay as they are.
    pub fn reload(&self) -> Result<usize> {
        self.apply(&read_key_file(&self.path)?)
    }

    /// Puts the keys of `text` in force (the file's contents, as just read).
    fn apply(&self, text: &str) -> Result<usize> {
        *self.seen.write().expect("key store lock") = Some(sha256_hex(text));
        let keys = Keys::parse(text, &self.path)?;
        let n = keys.len();
        *self.keys.write().expect("key store lock") = Arc::new(keys);
        Ok(n)
    }

    /// The file's contents if they differ from what was last read (an unreadable file counts as
    /// unchanged: it is reported when a reload is asked for, and the keys in force stay).
    fn changed_text(&self) -> Option<String> {
        let text = read_key_file(&self.path).ok()?;
        let seen = self.seen.read().expect("key store lock").as_deref() == Some(sha256_hex(&text).as_str());
        (!seen).then_some(text)
    }

    #[cfg(test)]
    fn changed(&self) -> bool {
        self.changed_text().is_some()
    }

    fn log_reload(&self, why: &str, outcome: Result<usize>) {
        match outcome {
            Ok(n) => tracing::info!(keys = n, "{why}: reloaded {}", self.path.display()),
            Err(e) => tracing::error!("{why}: keeping the previous keys: {e:#}"),
        }
    }

    /// Reloads when the file's contents change (checked every `every`) or on SIGHUP.
    pub fn watch(self: Arc<Self>, every: Duration) {
        tokio::spawn(async move {
            let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
            let mut tick = tokio::time::interval(every);
            loop {
                let sighup = async {
                    match hup.as_mut() {
                        Some(s) => {
                            s.recv().await;
                        }
                        None => std::future::pending().await,
                    }
                };
                tokio::select! {
                    _ = tick.tick() => {
                        if let Some(text) = self.changed_text() {
                            self.log_reload("key file changed", self.apply(&text));
                        }
                    }
                    _ = sighup => self.log_reload("SIGHUP", self.reload()),
                }
            }
        });
    }
}

fn unauthorized(message: &str, code: Option<&'static str>) -> Response {
    let mut e = ApiError::invalid(None, message);
    e.status = StatusCode::UNAUTHORIZED;
    e.code = code;
    e.into_response()
}

/// What the key middleware needs: the keys (none: open server), the limit state, and the metrics it counts
/// refusals in.
pub type KeyGate = (Option<Arc<KeyStore>>, Arc<Limiter>, Arc<crate::metrics::Metrics>);

/// Middleware for `/v1/*`: with a key store, a known `Authorization: Bearer` key is required; the caller is
/// attached to the request for the handlers' per-model check.
pub async fn require_key(State((store, limiter, metrics)): State<KeyGate>, mut req: Request, next: Next) -> Response {
    let key = match &store {
        None => None,
        Some(store) => {
            let Some(auth) = req.headers().get(header::AUTHORIZATION) else {
                return unauthorized(
                    "You didn't provide an API key. You need to provide your API key in an Authorization header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY).",
                    None,
                );
            };
            let secret = auth.to_str().ok().and_then(bearer_secret).unwrap_or("");
            match store.current().lookup(secret) {
                Some(k) => Some(k),
                None => return unauthorized("Incorrect API key provided.", Some("invalid_api_key")),
            }
        }
    };
    let limits = key.as_ref().and_then(|k| k.limits);
    let (slot, snapshot) = match (&key, &limits) {
        (Some(k), Some(l)) => match limiter.admit(&k.id, l) {
            Ok((slot, snap)) => (Some(Arc::new(std::sync::Mutex::new(Some(slot)))), Some(snap)),
            Err(refused) => {
                metrics.key_limited(&k.id);
                let (e, snap) = *refused;
                let mut r = e.into_response();
                snap.write(r.headers_mut());
                return r;
            }
        },
        _ => (None, None),
    };
    req.extensions_mut().insert(Caller { key, slot });
    let mut resp = next.run(req).await;
    // The handler's view (after reserving tokens) if it left one, else the admission's.
    if let Some(s) = resp.extensions().get::<Snapshot>().cloned().or(snapshot) {
        s.write(resp.headers_mut());
    }
    resp
}

/// The secret of an `Authorization: Bearer SECRET` value. The scheme name is case-insensitive (RFC 9110
/// §11.1), so `bearer` and `BEARER` are accepted as clients send them.
fn bearer_secret(value: &str) -> Option<&str> {
    let (scheme, secret) = value.trim_start().split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| secret.trim())
}

/// 403 unless the caller may use `model`.
pub fn check_model(caller: &Caller, model: &str) -> Result<(), ApiError> {
    match &caller.key {
        Some(k) if !k.allows(model) => {
            let mut e =
                ApiError::param("model", format!("The API key {:?} is not allowed to use the model `{model}`.", k.id));
            e.status = StatusCode::FORBIDDEN;
            e.kind = "permission_error";
            e.code = Some("model_not_allowed");
            Err(e)
        }
        _ => Ok(()),
    }
}

/// A new key: the secret (shown once) and the entry to add to the key file.
pub fn create(tenant: &str, id: Option<&str>, models: Option<Vec<String>>) -> (String, KeyEntry) {
    use rand::{RngCore, SeedableRng};
    let mut rng = rand_chacha::ChaCha20Rng::from_os_rng();
    let mut bytes = [0u8; 32];
    rng.fill_bytes(&mut bytes);
    let secret: String = format!("tsk-{}", bytes.iter().map(|b| format!("{b:02x}")).collect::<String>());
    let id = id.map(str::to_string).unwrap_or_else(|| format!("key-{}", &sha256_hex(&secret)[..8]));
    let entry = KeyEntry {
        id,
        tenant: tenant.to_string(),
        secret_sha256: sha256_hex(&secret),
        models,
        limits: None,
        weight: None,
        admin: false,
    };
    (secret, entry)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bearer_scheme_is_case_insensitive_and_nothing_else_is_a_secret() {
        for v in ["Bearer sk-1", "bearer sk-1", "BEARER  sk-1 ", "  Bearer sk-1"] {
            assert_eq!(bearer_secret(v), Some("sk-1"), "{v:?}");
        }
        for v in ["Basic sk-1", "Bearersk-1", "sk-1", ""] {
            assert_eq!(bearer_secret(v), None, "{v:?}");
        }
    }

    #[test]
    fn a_rewrite_that_restores_the_modification_time_is_still_noticed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys.json");
        let (old, entry) = create("acme", Some("k1"), None);
        std::fs::write(&path, serde_json::json!({ "keys": [entry] }).to_string()).unwrap();
        let store = KeyStore::open(&path).unwrap();
        assert!(!store.changed());
        let mtime = std::fs::metadata(&path).unwrap().modified().unwrap();
        // Revoke k1 and add k2, then put the old modification time back, as `cp -p` or `rsync -t` would.
        let (new, entry) = create("acme", Some("k2"), None);
        std::fs::write(&path, serde_json::json!({ "keys": [entry] }).to_string()).unwrap();
        std::fs::File::options().write(true).open(&path).unwrap().set_modified(mtime).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().modified().unwrap(), mtime);
        assert!(store.changed(), "the contents changed");
        store.reload().unwrap();
        assert!(store.current().lookup(&old).is_none(), "the revoked key no longer works");
        assert!(store.current().lookup(&new).is_some());
        assert!(!store.changed());
        // A file that no longer parses is read once, refused, and not reported again every second.
        std::fs::write(&path, "{").unwrap();
        assert!(store.changed());
        assert!(store.reload().is_err());
        assert!(!store.changed());
        assert!(store.current().lookup(&new).is_some(), "the keys in force stay");
    }

    #[test]
    fn keys_parse_look_up_and_refuse_bad_files() {
        let (secret, entry) = create("acme", Some("k1"), Some(vec!["m".into()]));
        assert!(secret.starts_with("tsk-") && secret.len() == 68);
        let text = serde_json::json!({ "keys": [entry] }).to_string();
        let keys = Keys::parse(&text, Path::new("keys.json")).unwrap();
        let k = keys.lookup(&secret).unwrap();
        assert_eq!((k.id.as_str(), k.tenant.as_str()), ("k1", "acme"));
        assert!(k.allows("m") && !k.allows("other"));
        assert!(keys.lookup("tsk-wrong").is_none());
        assert!(!text.contains(&secret), "the file holds the hash, never the secret");
        for (bad, msg) in [
            (r#"{"keys": [{"id": "a", "tenant": "t", "secret_sha256": "xyz"}]}"#, "secret_sha256"),
            (r#"{"keys": [{"id": "a", "tenant": "t", "secret_sha256": "00"}], "x": 1}"#, "not a valid key file"),
            (r#"{"keys": [{"id": "", "tenant": "t", "secret_sha256": "00"}]}"#, "id"),
            (
                r#"{"keys": [{"id": "a", "tenant": "t", "secret_sha256": "0000000000000000000000000000000000000000000000000000000000000000", "weight": 0}]}"#,
                "weight",
            ),
            // A limit of 0 refuses every request for ever (and used to answer retry-after: u64::MAX).
            (
                r#"{"keys": [{"id": "a", "tenant": "t", "secret_sha256": "0000000000000000000000000000000000000000000000000000000000000000", "limits": {"requests_per_minute": 0}}]}"#,
                "keys[0].limits.requests_per_minute: must be at least 1",
            ),
            (
                r#"{"keys": [{"id": "a", "tenant": "t", "secret_sha256": "0000000000000000000000000000000000000000000000000000000000000000", "limits": {"tokens_per_minute": 5, "concurrent_requests": 0}}]}"#,
                "limits.concurrent_requests",
            ),
            (
                r#"{"keys": [{"id": "a\tb", "tenant": "t", "secret_sha256": "0000000000000000000000000000000000000000000000000000000000000000"}]}"#,
                "keys[0].id: control characters",
            ),
            (
                r#"{"keys": [{"id": "a", "tenant": "t\n", "secret_sha256": "0000000000000000000000000000000000000000000000000000000000000000"}]}"#,
                "keys[0].tenant: control characters",
            ),
        ] {
            let e = Keys::parse(bad, Path::new("keys.json")).unwrap_err().to_string();
            assert!(e.contains("keys.json") && e.contains(msg), "{e}");
        }
        let h = sha256_hex("s");
        let dup = format!(
            r#"{{"keys": [{{"id": "a", "tenant": "t", "secret_sha256": "{h}"}}, {{"id": "a", "tenant": "u", "secret_sha256": "{h}"}}]}}"#
        );
        assert!(Keys::parse(&dup, Path::new("k")).unwrap_err().to_string().contains("used twice"));
    }
}
