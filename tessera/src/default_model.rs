//! The default model, stories260K, compiled into the binary so that `tessera generate` and `tessera serve`
//! work from any directory and in a container without a model volume.
//!
//! Loading goes through the same directory-based path as any model: the files are written once to a cache
//! directory keyed by their content hash, and that directory is returned.

use std::{
    hash::{DefaultHasher, Hash, Hasher},
    path::PathBuf,
};

use anyhow::{Context, Result};

macro_rules! model_file {
    ($name:literal) => {
        ($name, include_bytes!(concat!(env!("CARGO_MANIFEST_DIR"), "/../models/stories260K/", $name)).as_slice())
    };
}

const FILES: &[(&str, &[u8])] = &[
    model_file!("config.json"),
    model_file!("generation_config.json"),
    model_file!("model.safetensors"),
    model_file!("special_tokens_map.json"),
    model_file!("tokenizer.json"),
    model_file!("tokenizer_config.json"),
];

pub const NAME: &str = "stories260K";

fn cache_root() -> PathBuf {
    std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(std::env::temp_dir)
        .join("tessera")
}

/// Returns a directory holding the default model, writing it on first use.
pub fn path() -> Result<PathBuf> {
    let mut h = DefaultHasher::new();
    FILES.hash(&mut h);
    let dir = cache_root().join(format!("{NAME}-{:016x}", h.finish()));
    if FILES.iter().all(|(n, b)| std::fs::metadata(dir.join(n)).is_ok_and(|m| m.len() == b.len() as u64)) {
        return Ok(dir);
    }
    // Write into a private directory, then rename: concurrent first uses never see a half-written model.
    let parent = dir.parent().expect("cache dir has a parent");
    std::fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
    let tmp = tempfile_dir(parent)?;
    for (name, bytes) in FILES {
        std::fs::write(tmp.join(name), bytes).with_context(|| format!("writing {}", tmp.join(name).display()))?;
    }
    if std::fs::rename(&tmp, &dir).is_err() {
        // Someone else won the race (or a stale partial dir exists): use theirs if complete.
        let _ = std::fs::remove_dir_all(&tmp);
        if !dir.join("model.safetensors").exists() {
            anyhow::bail!("could not place the default model in {}", dir.display());
        }
    }
    Ok(dir)
}

fn tempfile_dir(parent: &std::path::Path) -> Result<PathBuf> {
    let p = parent.join(format!(
        ".{NAME}-{}-{}",
        std::process::id(),
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0)
    ));
    std::fs::create_dir_all(&p).with_context(|| format!("creating {}", p.display()))?;
    Ok(p)
}

/// The name under which a coordinator asks workers for the built-in model (`LoadModel.model_path`).
pub const BUILTIN: &str = "builtin:stories260K";

/// The models a worker of this binary can load by name: the built-in one.
pub fn builtin() -> Vec<tessera_worker::command::BuiltinModel> {
    vec![(BUILTIN, || path().map_err(|e| format!("{e:#}")))]
}
