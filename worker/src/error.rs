//! Errors of loading a model directory and of running steps on it. Every load error names the file and,
//! where there is one, the field or tensor at fault, so a user can fix the directory without reading code.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("model directory {0} does not exist or is not a directory")]
    NoDirectory(PathBuf),
    #[error("model {0} does not exist, or is neither a model directory nor a GGUF file")]
    NoModel(PathBuf),
    /// A GGUF file that cannot be read, or a metadata key missing or of the wrong type (the message names
    /// the file and the key or tensor).
    #[error(transparent)]
    Gguf(#[from] tessera_gguf::GgufError),
    #[error("{path}: cannot read: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path}: {message}")]
    File { path: PathBuf, message: String },
    #[error("{path}: field `{field}`: {message}")]
    Field { path: PathBuf, field: String, message: String },
    #[error("{path}: tensor `{tensor}`: {message}")]
    Tensor { path: PathBuf, tensor: String, message: String },
    #[error("tensor parallelism: {0}")]
    Sharding(String),
    #[error(transparent)]
    Kernel(#[from] tessera_kernels::KernelError),
    #[error(transparent)]
    Collective(#[from] crate::collective::CollectiveError),
}

/// A step the engine refuses: the caller sent something inconsistent. Nothing was changed.
#[derive(Debug, thiserror::Error)]
pub enum StepError {
    #[error("invalid step: {0}")]
    Invalid(String),
    /// The group's collectives failed mid-step: the group is unusable and must be re-formed.
    #[error(transparent)]
    Collective(#[from] crate::collective::CollectiveError),
    #[error(transparent)]
    Kernel(#[from] tessera_kernels::KernelError),
}
