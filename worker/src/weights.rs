//! Reading weights from `model.safetensors` or a sharded `model.safetensors.index.json`, memory-mapped.
//!
//! Only the requested slice of a tensor is converted (f32, bf16 or f16 on disk → f32), so a tensor-parallel
//! rank touches the pages of its own shard and no others. Every failure names the file and tensor.

use std::{
    collections::HashMap,
    ops::Range,
    path::{Path, PathBuf},
};

use memmap2::Mmap;
use safetensors::{Dtype, SafeTensors};
use tessera_kernels::Tensor;

use crate::error::ModelError;

/// Which part of a 2-D tensor to read. Row slices are contiguous on disk; column slices gather.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Slice {
    Full,
    /// Rows `[a, b)` of dimension 0 (column-parallel weights: output features).
    Rows(Range<usize>),
    /// Columns `[a, b)` of dimension 1 (row-parallel weights: input features).
    Cols(Range<usize>),
}

/// The part of a tensor of `shape` (1-D or 2-D) that a slice covers.
pub struct Bounds {
    /// The full shape as rows × columns (a 1-D tensor is one row).
    pub rows: usize,
    pub cols: usize,
    /// Rows `[r0, r1)` and columns `[c0, c1)`.
    pub r0: usize,
    pub r1: usize,
    pub c0: usize,
    pub c1: usize,
}

impl Slice {
    /// Where this slice lies in a tensor of `shape`, or why it cannot (the message names the shape).
    pub fn bounds(&self, shape: &[usize]) -> Result<Bounds, String> {
        let (rows, cols) = match *shape {
            [n] => (1, n),
            [r, c] => (r, c),
            _ => return Err(format!("expected a 1-D or 2-D tensor, found shape {shape:?}")),
        };
        // 1-D tensors are one row; their Rows slice is a range of elements.
        let (r0, r1, c0, c1) = match self {
            Slice::Full => (0, rows, 0, cols),
            Slice::Rows(r) if shape.len() == 1 => (0, 1, r.start, r.end),
            Slice::Rows(r) => (r.start, r.end, 0, cols),
            Slice::Cols(c) => (0, rows, c.start, c.end),
        };
        if r0 > r1 || r1 > rows || c0 > c1 || c1 > cols {
            return Err(format!("slice {self:?} outside shape {shape:?}"));
        }
        Ok(Bounds { rows, cols, r0, r1, c0, c1 })
    }
}

/// The safetensors files of a model directory and which file holds each tensor.
pub struct WeightFiles {
    maps: Vec<(PathBuf, Mmap)>,
    /// Tensor name → index into `maps`.
    index: HashMap<String, usize>,
}

impl WeightFiles {
    /// Opens `model.safetensors`, or every file named by `model.safetensors.index.json`.
    pub fn open(dir: &Path) -> Result<Self, ModelError> {
        let index_path = dir.join("model.safetensors.index.json");
        let single = dir.join("model.safetensors");
        let files: Vec<PathBuf> = if index_path.exists() {
            let text = crate::files::read_json_text(&index_path)?;
            let v: serde_json::Value = serde_json::from_str(&text)
                .map_err(|e| ModelError::File { path: index_path.clone(), message: format!("not valid JSON: {e}") })?;
            let map = v.get("weight_map").and_then(|m| m.as_object()).ok_or_else(|| ModelError::Field {
                path: index_path.clone(),
                field: "weight_map".into(),
                message: "missing or not an object".into(),
            })?;
            let mut names: Vec<String> = Vec::new();
            for (tensor, file) in map {
                let file = file.as_str().filter(|f| !f.contains('/') && !f.contains("..")).ok_or_else(|| {
                    ModelError::Field {
                        path: index_path.clone(),
                        field: format!("weight_map.{tensor}"),
                        message: format!("expected a file name in the model directory, found {file}"),
                    }
                })?;
                if !names.iter().any(|n| n == file) {
                    names.push(file.to_string());
                }
            }
            names.sort();
            names.into_iter().map(|n| dir.join(n)).collect()
        } else if single.exists() {
            vec![single]
        } else {
            return Err(ModelError::File {
                path: dir.to_path_buf(),
                message: "no model.safetensors or model.safetensors.index.json".into(),
            });
        };

        Self::open_files(files)
    }

    /// Opens one safetensors file (a LoRA adapter's `adapter_model.safetensors`).
    pub fn open_file(path: &Path) -> Result<Self, ModelError> {
        Self::open_files(vec![path.to_path_buf()])
    }

    fn open_files(files: Vec<PathBuf>) -> Result<Self, ModelError> {
        let mut maps = Vec::new();
        let mut index = HashMap::new();
        for path in files {
            let file = crate::files::open(&path)?;
            // SAFETY: the file is opened read-only; modifying model files under a running server is outside
            // what we can defend against (as with every mmap-based loader).
            let mmap = unsafe { Mmap::map(&file) }.map_err(|source| ModelError::Io { path: path.clone(), source })?;
            let st = SafeTensors::deserialize(&mmap).map_err(|e| ModelError::File {
                path: path.clone(),
                message: format!("not a valid safetensors file (truncated or corrupt?): {e}"),
            })?;
            for name in st.names() {
                index.insert(name.to_string(), maps.len());
            }
            maps.push((path, mmap));
        }
        Ok(WeightFiles { maps, index })
    }

    pub fn contains(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }

    /// The full shape of `name`, as the file declares it.
    pub fn shape(&self, name: &str) -> Option<Vec<usize>> {
        let &i = self.index.get(name)?;
        let st = SafeTensors::deserialize(&self.maps[i].1).ok()?;
        Some(st.tensor(name).ok()?.shape().to_vec())
    }

    /// Every tensor's name, in no particular order.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.index.keys().map(String::as_str)
    }

    /// Path of the file that holds `name` (or the directory's main file if none does), for messages.
    fn path_for(&self, name: &str) -> PathBuf {
        let i = self.index.get(name).copied().unwrap_or(0);
        self.maps.get(i).map(|(p, _)| p.clone()).unwrap_or_default()
    }

    /// Reads `name`, checking that its full shape is `shape`, and returns the requested slice as f32.
    pub fn load(&self, name: &str, shape: &[usize], slice: Slice) -> Result<Tensor, ModelError> {
        let err = |message: String| ModelError::Tensor { path: self.path_for(name), tensor: name.into(), message };
        let &i = self.index.get(name).ok_or_else(|| err("missing".into()))?;
        let (path, mmap) = &self.maps[i];
        // Deserializing only parses the JSON header; the data stays in the map.
        let st = SafeTensors::deserialize(mmap)
            .map_err(|e| ModelError::File { path: path.clone(), message: e.to_string() })?;
        let view = st.tensor(name).map_err(|e| err(e.to_string()))?;
        if view.shape() != shape {
            return Err(err(format!("expected shape {shape:?}, found {:?}", view.shape())));
        }
        let conv: fn(&[u8]) -> f32 = match view.dtype() {
            Dtype::F32 => |b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]),
            Dtype::BF16 => |b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32(),
            Dtype::F16 => |b| half::f16::from_le_bytes([b[0], b[1]]).to_f32(),
            other => {
                return Err(err(format!("unsupported dtype {other:?}; expected F32, BF16 or F16")));
            }
        };
        let es = view.dtype().bitsize() / 8;
        let data = view.data();
        let Bounds { cols, r0, r1, c0, c1, .. } = slice.bounds(shape).map_err(err)?;
        let mut out = Vec::with_capacity((r1 - r0) * (c1 - c0));
        for r in r0..r1 {
            let row = &data[(r * cols + c0) * es..(r * cols + c1) * es];
            out.extend(row.chunks_exact(es).map(conv));
        }
        let out_shape: Vec<usize> = if shape.len() == 1 { vec![c1 - c0] } else { vec![r1 - r0, c1 - c0] };
        Ok(Tensor::from_f32(out, &out_shape)?)
    }
}
