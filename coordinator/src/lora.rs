//! The LoRA adapters a server serves over its base model: the name a client puts in `model`, the id its
//! workers know the adapter by, and where its files are.
//!
//! An adapter is registered here before any replica loads it (so a replica that joins meanwhile loads it
//! too), becomes usable once every live replica has it, and leaves at once when unloaded: new requests
//! naming it get 404 while its running sequences finish, after which each replica's engine loop drops it.
//! Ids are never reused, so the prefix cache (keyed by adapter id) can never serve blocks computed under
//! an adapter that has gone to one that took its place.

use std::{collections::BTreeMap, sync::Mutex};

pub use tessera_proto::step::AdapterSpec;

/// `--max-loras` and `--max-lora-rank`.
#[derive(Clone, Copy, Debug)]
pub struct LoraSettings {
    /// Adapters loaded at once.
    pub max_loras: usize,
    /// Largest rank an adapter may have.
    pub max_rank: u32,
}

impl Default for LoraSettings {
    fn default() -> Self {
        LoraSettings { max_loras: 8, max_rank: 64 }
    }
}

/// Why an adapter cannot be registered or removed; `status` is the HTTP status the API answers with.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LoraError {
    #[error("The adapter `{0}` is already loaded.")]
    Exists(String),
    #[error("`{0}` is the base model's name; an adapter needs a name of its own.")]
    BaseName(String),
    #[error("The adapter name must be 1 to 256 characters of letters, digits and `-_.:/@`, not {0:?}.")]
    BadName(String),
    #[error("{0} adapters are loaded, the most this server holds (--max-loras); unload one first.")]
    Full(usize),
    #[error("The adapter `{0}` is not loaded.")]
    NotFound(String),
    /// A replica could not load it (the message names the file and field or tensor at fault).
    #[error("The adapter `{0}` could not be loaded: {1}")]
    Load(String, String),
}

/// An adapter and whether requests may use it yet.
#[derive(Clone, Debug)]
pub struct Entry {
    pub spec: AdapterSpec,
    /// Unix time it was registered (`created` in `/v1/models`).
    pub created: u64,
    /// Every live replica has it: requests may name it.
    pub ready: bool,
}

#[derive(Default)]
struct Inner {
    by_name: BTreeMap<String, Entry>,
    /// The id of the last adapter registered.
    last_id: u32,
    settings: LoraSettings,
}

/// The registry of a server's adapters.
#[derive(Default)]
pub struct Adapters {
    inner: Mutex<Inner>,
}

fn valid_name(name: &str) -> bool {
    (1..=256).contains(&name.len()) && name.chars().all(|c| c.is_ascii_alphanumeric() || "-_.:/@".contains(c))
}

impl Adapters {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn configure(&self, settings: LoraSettings) {
        self.lock().settings = settings;
    }

    pub fn settings(&self) -> LoraSettings {
        self.lock().settings
    }

    /// Registers `name` at `path` (not yet ready) under a fresh id, unless the name is taken (by an adapter
    /// or by the base model, `base`) or the server holds as many as it may.
    pub fn reserve(&self, name: &str, path: &str, base: &str) -> Result<AdapterSpec, LoraError> {
        if !valid_name(name) {
            return Err(LoraError::BadName(name.to_string()));
        }
        if name == base {
            return Err(LoraError::BaseName(name.to_string()));
        }
        let mut g = self.lock();
        if g.by_name.contains_key(name) {
            return Err(LoraError::Exists(name.to_string()));
        }
        if g.by_name.len() >= g.settings.max_loras {
            return Err(LoraError::Full(g.by_name.len()));
        }
        g.last_id += 1;
        let spec = AdapterSpec {
            id: g.last_id,
            name: name.to_string(),
            path: path.to_string(),
            max_rank: g.settings.max_rank,
        };
        let created = crate::usage::unix_seconds() as u64;
        g.by_name.insert(name.to_string(), Entry { spec: spec.clone(), created, ready: false });
        Ok(spec)
    }

    /// Every replica has adapter `id` of `name`: requests may use it. False when `name` has been unloaded
    /// (or taken by another id) meanwhile.
    pub fn ready(&self, name: &str, id: u32) -> bool {
        match self.lock().by_name.get_mut(name) {
            Some(e) if e.spec.id == id => {
                e.ready = true;
                true
            }
            _ => false,
        }
    }

    /// Takes `name` out if it is still adapter `id` (a load that failed, not a later one of that name).
    pub fn remove_id(&self, name: &str, id: u32) {
        let mut g = self.lock();
        if g.by_name.get(name).is_some_and(|e| e.spec.id == id) {
            g.by_name.remove(name);
        }
    }

    /// Takes `name` out (requests naming it get 404 from now on) and returns what it was.
    pub fn remove(&self, name: &str) -> Result<AdapterSpec, LoraError> {
        self.lock().by_name.remove(name).map(|e| e.spec).ok_or_else(|| LoraError::NotFound(name.to_string()))
    }

    /// The id of the ready adapter `name`.
    pub fn resolve(&self, name: &str) -> Option<u32> {
        self.lock().by_name.get(name).filter(|e| e.ready).map(|e| e.spec.id)
    }

    /// The ready adapters, by name.
    pub fn list(&self) -> Vec<Entry> {
        self.lock().by_name.values().filter(|e| e.ready).cloned().collect()
    }

    /// Every registered adapter, ready or not: what a replica that joins must load.
    pub fn specs(&self) -> Vec<AdapterSpec> {
        self.lock().by_name.values().map(|e| e.spec.clone()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_ids_limits_and_readiness() {
        let a = Adapters::default();
        a.configure(LoraSettings { max_loras: 2, max_rank: 16 });
        let x = a.reserve("sql", "/a/sql", "base").unwrap();
        assert_eq!((x.id, x.max_rank), (1, 16));
        assert_eq!(a.resolve("sql"), None, "not ready until every replica has it");
        assert!(a.ready("sql", 1));
        assert_eq!(a.resolve("sql"), Some(1));
        assert_eq!(a.reserve("sql", "/b", "base"), Err(LoraError::Exists("sql".into())));
        assert_eq!(a.reserve("base", "/b", "base"), Err(LoraError::BaseName("base".into())));
        assert!(matches!(a.reserve("a b", "/b", "base"), Err(LoraError::BadName(_))));
        assert!(matches!(a.reserve("", "/b", "base"), Err(LoraError::BadName(_))));
        let y = a.reserve("chat", "/a/chat", "base").unwrap();
        assert_eq!(a.reserve("third", "/c", "base"), Err(LoraError::Full(2)));
        assert_eq!(a.specs().len(), 2);
        assert_eq!(a.list().len(), 1, "chat is not ready");
        assert_eq!(a.remove("sql").unwrap().id, 1);
        assert_eq!(a.resolve("sql"), None);
        assert_eq!(a.remove("sql"), Err(LoraError::NotFound("sql".into())));
        // Ids are never reused: blocks cached under id 1 can never serve the new `sql`.
        let z = a.reserve("sql", "/a/sql2", "base").unwrap();
        assert!(z.id > y.id && z.id != x.id);
        // The first load of `sql` finishing late touches the second neither way.
        assert!(!a.ready("sql", 1), "id 1 was unloaded");
        a.remove_id("sql", 1);
        assert!(a.ready("sql", z.id));
        assert_eq!(a.resolve("sql"), Some(z.id));
    }
}
