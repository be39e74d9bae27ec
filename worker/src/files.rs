//! Opening a model directory's files as untrusted input: only regular files (opening a FIFO blocks until a
//! writer comes, and a device may never end), and JSON files bounded in size before they are read.

use std::{fs::File, path::Path};

use crate::error::ModelError;

/// Largest JSON file of a model directory read (`config.json`, the safetensors index): real ones are
/// kilobytes, an index of thousands of tensors a few hundred.
pub const MAX_JSON_BYTES: u64 = 64 << 20;

/// `path` is a regular file (following symlinks); anything else is an error naming it.
pub fn ensure_regular(path: &Path) -> Result<u64, ModelError> {
    let meta = std::fs::metadata(path).map_err(|source| ModelError::Io { path: path.into(), source })?;
    if !meta.is_file() {
        return Err(ModelError::File { path: path.into(), message: "not a regular file".into() });
    }
    Ok(meta.len())
}

/// Opens a regular file for reading.
pub fn open(path: &Path) -> Result<File, ModelError> {
    ensure_regular(path)?;
    File::open(path).map_err(|source| ModelError::Io { path: path.into(), source })
}

/// Reads a JSON file's text, refusing anything but a regular file of at most [`MAX_JSON_BYTES`].
pub fn read_json_text(path: &Path) -> Result<String, ModelError> {
    let len = ensure_regular(path)?;
    if len > MAX_JSON_BYTES {
        return Err(ModelError::File {
            path: path.into(),
            message: format!("{len} bytes, more than the {MAX_JSON_BYTES} a model's JSON file may have"),
        });
    }
    std::fs::read_to_string(path).map_err(|source| ModelError::Io { path: path.into(), source })
}
