//! The cluster token: one shared secret that every coordinator and worker of a cluster holds. It travels
//! as `authorization: Bearer <token>` on every gRPC call to a worker, and each collective handshake between
//! workers carries a proof of it, so only members of the cluster can load a model on a worker, make it
//! dial peers, or run steps. It authenticates; it does not encrypt: keep the cluster's traffic on a private
//! network (the chart's NetworkPolicy).
//!
//! The token comes from `--cluster-token-file FILE` or the `TESSERA_CLUSTER_TOKEN` environment variable;
//! `tessera serve --tp N` makes a fresh one for its own workers. Without one, workers accept anyone (and
//! say so in their log at start).

use std::{
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{SystemTime, UNIX_EPOCH},
};

use sha2::{Digest, Sha256};
use tonic::{
    Request, Status,
    metadata::{AsciiMetadataValue, MetadataMap},
    service::Interceptor,
};

/// The environment variable a token is read from when no file is given.
pub const ENV: &str = "TESSERA_CLUSTER_TOKEN";
/// Shortest token accepted: 16 characters of a random token are 64 bits or more.
pub const MIN_LEN: usize = 16;
/// Longest token accepted (and most bytes read from a token file).
pub const MAX_LEN: usize = 4096;

#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("reading the cluster token file {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("the cluster token file {path} is not a regular file")]
    NotAFile { path: String },
    #[error("the cluster token from {from} is {len} bytes; it must be {MIN_LEN} to {MAX_LEN}")]
    Length { from: String, len: usize },
    #[error("the cluster token from {from} has a character other than printable ASCII")]
    Charset { from: String },
}

/// The cluster's shared secret, or none (anyone is accepted).
#[derive(Clone, Default)]
pub struct ClusterToken(Option<Arc<Secret>>);

struct Secret {
    text: String,
    header: AsciiMetadataValue,
    digest: [u8; 32],
}

impl std::fmt::Debug for ClusterToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.is_set() { "ClusterToken(set)" } else { "ClusterToken(none)" })
    }
}

impl ClusterToken {
    /// No token: every caller is accepted, and calls carry none.
    pub fn none() -> Self {
        ClusterToken(None)
    }

    /// A token from text (surrounding whitespace, such as a file's last newline, is not part of it).
    /// `from` names where it came from, for the error.
    pub fn parse(text: &str, from: &str) -> Result<Self, TokenError> {
        let text = text.trim();
        if !(MIN_LEN..=MAX_LEN).contains(&text.len()) {
            return Err(TokenError::Length { from: from.into(), len: text.len() });
        }
        if !text.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(TokenError::Charset { from: from.into() });
        }
        let header = format!("Bearer {text}").parse().map_err(|_| TokenError::Charset { from: from.into() })?;
        let digest = Sha256::digest(text.as_bytes()).into();
        Ok(ClusterToken(Some(Arc::new(Secret { text: text.to_string(), header, digest }))))
    }

    /// The token in `path` (at most [`MAX_LEN`] bytes are read).
    pub fn from_file(path: &Path) -> Result<Self, TokenError> {
        let name = path.display().to_string();
        let read = |source| TokenError::Read { path: name.clone(), source };
        let meta = std::fs::metadata(path).map_err(read)?;
        if !meta.is_file() {
            return Err(TokenError::NotAFile { path: name });
        }
        let mut bytes = Vec::new();
        let file = std::fs::File::open(path).map_err(read)?;
        std::io::Read::read_to_end(&mut std::io::Read::take(file, MAX_LEN as u64 + 2), &mut bytes).map_err(read)?;
        let text = String::from_utf8(bytes).map_err(|_| TokenError::Charset { from: name.clone() })?;
        Self::parse(&text, &name)
    }

    /// `file` if given, else `TESSERA_CLUSTER_TOKEN` if set, else none.
    pub fn resolve(file: Option<&Path>) -> Result<Self, TokenError> {
        match file {
            Some(p) => Self::from_file(p),
            None => match std::env::var(ENV) {
                Ok(t) => Self::parse(&t, ENV),
                Err(std::env::VarError::NotPresent) => Ok(Self::none()),
                Err(std::env::VarError::NotUnicode(_)) => Err(TokenError::Charset { from: ENV.into() }),
            },
        }
    }

    /// A new random token (256 bits, hex), for a cluster this process starts itself.
    pub fn generate() -> Self {
        use rand::TryRngCore;
        let mut bytes = [0u8; 32];
        rand::rngs::OsRng.try_fill_bytes(&mut bytes).expect("the operating system's random source failed");
        let text: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        Self::parse(&text, "a generated token").expect("a generated token is valid")
    }

    pub fn is_set(&self) -> bool {
        self.0.is_some()
    }

    /// The secret itself, to hand to a child process through [`ENV`] (never on its command line, which
    /// every user of the machine can read).
    pub fn text(&self) -> Option<&str> {
        self.0.as_deref().map(|s| s.text.as_str())
    }

    /// A proof of the token bound to `context` (a collective handshake's group and rank): what a peer
    /// sends instead of the token itself. All zeros without a token.
    pub fn proof(&self, context: &[u8]) -> [u8; 32] {
        match &self.0 {
            None => [0; 32],
            Some(s) => Sha256::new().chain_update(s.digest).chain_update(context).finalize().into(),
        }
    }

    /// Whether a handshake's `proof` for `context` shows the token (always, without one).
    pub fn accepts_proof(&self, context: &[u8], proof: &[u8]) -> bool {
        // Compared as digests of both sides: how long the comparison takes says nothing about the proof.
        !self.is_set() || Sha256::digest(self.proof(context)) == Sha256::digest(proof)
    }

    /// Whether a call's metadata carries the token (always, without one).
    pub fn accepts(&self, metadata: &MetadataMap) -> bool {
        let Some(s) = &self.0 else { return true };
        let Some(given) = metadata.get("authorization").and_then(|v| v.to_str().ok()) else { return false };
        let Some(given) = given.strip_prefix("Bearer ").or_else(|| given.strip_prefix("bearer ")) else {
            return false;
        };
        Sha256::digest(Sha256::digest(given.trim().as_bytes())) == Sha256::digest(s.digest)
    }
}

/// Client side: puts the token on every call.
impl Interceptor for ClusterToken {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        if let Some(s) = &self.0 {
            req.metadata_mut().insert("authorization", s.header.clone());
        }
        Ok(req)
    }
}

/// Server side: refuses calls without the token, and logs them (at most one line a second, with a count
/// of those it did not log, so a flood of bad calls cannot flood the log).
#[derive(Clone)]
pub struct Guard {
    token: ClusterToken,
    last_log_second: Arc<AtomicU64>,
    unlogged: Arc<AtomicU64>,
}

impl Guard {
    pub fn new(token: ClusterToken) -> Self {
        Guard { token, last_log_second: Default::default(), unlogged: Default::default() }
    }
}

impl Interceptor for Guard {
    fn call(&mut self, req: Request<()>) -> Result<Request<()>, Status> {
        if self.token.accepts(req.metadata()) {
            return Ok(req);
        }
        let now = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        if self.last_log_second.swap(now, Ordering::Relaxed) != now {
            let also = self.unlogged.swap(0, Ordering::Relaxed);
            let peer = req.remote_addr().map_or_else(|| "unknown".to_string(), |a| a.to_string());
            tracing::warn!(%peer, also_refused = also, "refused a call without the cluster token");
        } else {
            self.unlogged.fetch_add(1, Ordering::Relaxed);
        }
        Err(Status::unauthenticated("this worker needs the cluster token (authorization: Bearer ...)"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn call_with(header: Option<&str>) -> Request<()> {
        let mut r = Request::new(());
        if let Some(h) = header {
            r.metadata_mut().insert("authorization", h.parse().unwrap());
        }
        r
    }

    #[test]
    fn a_guard_lets_through_only_calls_with_the_token() {
        let token = ClusterToken::parse("s3cret-token-of-some-length\n", "test").unwrap();
        let mut guard = Guard::new(token.clone());
        let mut client = token.clone();
        assert!(guard.call(client.call(Request::new(())).unwrap()).is_ok());
        assert!(guard.call(call_with(Some("bearer s3cret-token-of-some-length"))).is_ok());
        for bad in [None, Some("Bearer s3cret-token-of-some-lengtH"), Some("Basic x"), Some("Bearer ")] {
            let e = guard.call(call_with(bad)).unwrap_err();
            assert_eq!(e.code(), tonic::Code::Unauthenticated, "{bad:?}");
        }
        // Without a token, everyone is let through, and calls carry nothing.
        assert!(Guard::new(ClusterToken::none()).call(call_with(None)).is_ok());
        let r = ClusterToken::none().call(Request::new(())).unwrap();
        assert!(r.metadata().get("authorization").is_none());
    }

    #[test]
    fn proofs_are_bound_to_the_token_and_the_context() {
        let a = ClusterToken::generate();
        let b = ClusterToken::generate();
        assert_ne!(a.text(), b.text());
        let p = a.proof(b"group g rank 1");
        assert!(a.accepts_proof(b"group g rank 1", &p));
        assert!(!a.accepts_proof(b"group g rank 0", &p));
        assert!(!b.accepts_proof(b"group g rank 1", &p));
        assert!(!a.accepts_proof(b"group g rank 1", &[0; 32]));
        assert!(ClusterToken::none().accepts_proof(b"x", &[0; 32]));
    }

    #[test]
    fn tokens_that_are_short_long_or_not_printable_are_refused_naming_their_source() {
        for bad in ["short", &"x".repeat(MAX_LEN + 1), "has a space inside it", "tab\tinside-the-token"] {
            let e = ClusterToken::parse(bad, "FILE").unwrap_err().to_string();
            assert!(e.contains("FILE"), "{e}");
        }
        let dir = tempfile::tempdir().unwrap();
        let e = ClusterToken::from_file(dir.path()).unwrap_err().to_string();
        assert!(e.contains("not a regular file"), "{e}");
        let f = dir.path().join("t");
        std::fs::write(&f, "x".repeat(10 * MAX_LEN)).unwrap();
        let e = ClusterToken::from_file(&f).unwrap_err().to_string();
        assert!(e.contains("must be 16 to 4096"), "{e}");
        std::fs::write(&f, "0123456789abcdef0123\n").unwrap();
        assert_eq!(ClusterToken::from_file(&f).unwrap().text(), Some("0123456789abcdef0123"));
    }
}
