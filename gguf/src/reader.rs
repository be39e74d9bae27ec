//! Opening a GGUF file: memory-mapping it, parsing and validating its header, and handing out tensor
//! views into the mapped data.
//!
//! The layout (GGUF v2 and v3, little-endian; `ggml/src/gguf.cpp` is the reference reader):
//!
//! ```text
//! "GGUF" | version: u32 | tensor count: u64 | metadata count: u64
//! metadata:  key: string | value type: u32 | value        (string = u64 length + bytes)
//! tensors:   name: string | n_dims: u32 | ne[n_dims]: u64 | ggml type: u32 | offset: u64
//! padding to `general.alignment` (default 32), then the data section; each tensor's offset is relative
//! to it and aligned.
//! ```
//!
//! The file is untrusted input. Every count and length is checked against what the rest of the file could
//! hold before anything is allocated for it; arithmetic on sizes and offsets is checked; array nesting is
//! bounded ([`MAX_ARRAY_NESTING`]); and every tensor is checked before a view of it is handed out: at most
//! [`MAX_DIMS`] dimensions, an element count that fits an i64, a known type, a row length `ne[0]` that is a
//! whole number of blocks, an offset aligned to the file's alignment, data lying inside the file and not
//! overlapping another tensor's, and a unique, non-empty UTF-8 name. Metadata keys must be unique,
//! non-empty UTF-8 too (as in gguf.cpp); `general.alignment` must be a u32 power of two.
//!
//! A file cut short anywhere up to the end of its last tensor's data is an error. A file that only lacks
//! the alignment padding after its last tensor is accepted, like llama.cpp's model loader accepts it:
//! some writers (older Ollama versions) pad *before* each tensor and end the file right after the last one.
//!
//! Differences from gguf.cpp, all deliberate: tensors need not be stored in table order nor back to back
//! (only aligned and non-overlapping); tensor names are not limited to ggml's 63 bytes; strings are not
//! limited to 1 GiB, only by the file's size.

use std::collections::HashMap;
use std::fmt;
use std::fs::File;
use std::ops::Deref;
use std::path::{Path, PathBuf};

use memmap2::Mmap;

use crate::error::GgufError;
use crate::metadata::{Array, GgufString, Metadata, Value, ValueType};
use crate::quants::{self, GgmlType};

/// The four bytes every GGUF file starts with.
pub const GGUF_MAGIC: [u8; 4] = *b"GGUF";
/// The data section's alignment when `general.alignment` is absent.
pub const DEFAULT_ALIGNMENT: u64 = 32;
/// The metadata key that sets the alignment.
pub const ALIGNMENT_KEY: &str = "general.alignment";
/// Most dimensions a tensor may have (`GGML_MAX_DIMS`).
pub const MAX_DIMS: usize = 4;
/// Deepest nesting of arrays in arrays accepted in metadata (an array of arrays is depth 2).
pub const MAX_ARRAY_NESTING: usize = 8;

/// Fewest bytes one metadata pair takes: key length, a one-byte key, type, a one-byte value.
const MIN_KV_BYTES: u64 = 8 + 1 + 4 + 1;
/// Fewest bytes one tensor info takes: name length, a one-byte name, n_dims, type, offset.
const MIN_TENSOR_INFO_BYTES: u64 = 8 + 1 + 4 + 4 + 8;
/// Most elements reserved ahead for an array of strings or arrays; beyond that the vector grows as
/// elements are actually read, so a forged count cannot make us allocate more than the file holds.
const MAX_RESERVE: usize = 1 << 16;

/// The bytes of an opened file: a read-only memory map, or a buffer given by the caller.
enum Backing {
    Mmap(Mmap),
    Owned(Vec<u8>),
}

impl Deref for Backing {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            Backing::Mmap(m) => m,
            Backing::Owned(v) => v,
        }
    }
}

/// A parsed, validated GGUF file.
pub struct GgufFile {
    path: PathBuf,
    bytes: Backing,
    header: Header,
}

impl fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GgufFile")
            .field("path", &self.path)
            .field("size", &self.bytes.len())
            .field("version", &self.header.version)
            .field("alignment", &self.header.alignment)
            .field("data_offset", &self.header.data_offset)
            .field("metadata_keys", &self.header.metadata.len())
            .field("tensors", &self.header.tensors.len())
            .finish()
    }
}

impl GgufFile {
    /// Memory-maps the file at `path` (read-only) and parses it.
    ///
    /// The map is shared with the file: the file must not be modified (truncated, rewritten) while the
    /// returned value lives, as for any memory-mapped file.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, GgufError> {
        let path = path.as_ref();
        let io_err = |source| GgufError::Io { path: path.to_path_buf(), source };
        let file = File::open(path).map_err(io_err)?;
        let len = file.metadata().map_err(io_err)?.len();
        let bytes = if len == 0 {
            // Mapping an empty file fails on some platforms; it is reported as truncated by the parser.
            Backing::Owned(Vec::new())
        } else {
            // SAFETY: the map is read-only and private to this value. Like every file map, it is only sound
            // while no one truncates or rewrites the file; that is documented as the caller's obligation.
            Backing::Mmap(unsafe { Mmap::map(&file) }.map_err(io_err)?)
        };
        Self::parse(path.to_path_buf(), bytes)
    }

    /// Parses a GGUF file held in memory. `path` is only used to name the file in error messages.
    pub fn from_bytes(path: impl Into<PathBuf>, bytes: Vec<u8>) -> Result<Self, GgufError> {
        Self::parse(path.into(), Backing::Owned(bytes))
    }

    fn parse(path: PathBuf, bytes: Backing) -> Result<Self, GgufError> {
        let header = Parser { path: &path, bytes: &bytes, pos: 0 }.parse()?;
        Ok(GgufFile { bytes, header, path })
    }

    /// The path the file was opened from (or the name given to [`GgufFile::from_bytes`]).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The GGUF version, 2 or 3.
    pub fn version(&self) -> u32 {
        self.header.version
    }

    /// The data section's alignment (`general.alignment`, or 32).
    pub fn alignment(&self) -> u64 {
        self.header.alignment
    }

    /// Where the data section starts in the file.
    pub fn data_offset(&self) -> u64 {
        self.header.data_offset
    }

    /// The file's size in bytes.
    pub fn file_size(&self) -> u64 {
        self.bytes.len() as u64
    }

    /// The whole file.
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// The metadata, in file order.
    pub fn metadata(&self) -> &Metadata {
        &self.header.metadata
    }

    /// The tensors, in the order of the file's tensor table.
    pub fn tensors(&self) -> impl ExactSizeIterator<Item = Tensor<'_>> + '_ {
        self.header.tensors.iter().map(move |info| Tensor { file: self, info })
    }

    /// The tensor named `name`.
    pub fn tensor(&self, name: &str) -> Option<Tensor<'_>> {
        self.header.by_name.get(name).map(|&i| Tensor { file: self, info: &self.header.tensors[i] })
    }

    /// Gives the pages holding `tensor`'s bytes back to the operating system (for a memory-mapped file; a
    /// no-op otherwise). A loader that has copied or converted a tensor calls it, so that the file's pages
    /// do not stay resident beside the copy while the rest loads; reading the tensor again reads the file
    /// again. The pages at either end may be shared with the neighbouring tensors, which are read again
    /// from the file just the same.
    pub fn release(&self, tensor: &Tensor<'_>) {
        if let Backing::Mmap(map) = &self.bytes {
            let start = tensor.file_offset() as usize;
            // SAFETY: the map is read-only and private, so MADV_DONTNEED discards no change: later reads
            // see the file's bytes again, which is what every borrowed slice of the map already shows.
            // The range lies inside the map (checked when the file was opened).
            let advised =
                unsafe { map.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, start, tensor.info.size) };
            // Advice the kernel refuses leaves the pages resident: it costs memory, not correctness, so
            // there is nothing to report.
            drop(advised);
        }
    }

    /// The tensor table without the data.
    pub fn tensor_infos(&self) -> &[TensorInfo] {
        &self.header.tensors
    }
}

/// One entry of the tensor table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorInfo {
    name: String,
    shape: Vec<u64>,
    ggml_type: GgmlType,
    offset: u64,
    size: usize,
}

impl TensorInfo {
    /// The tensor's name, e.g. `blk.0.attn_q.weight`.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The shape in GGUF (ggml) order: `shape()[0]` (`ne[0]`) is the fastest-varying dimension, the row
    /// length; it is the reverse of the numpy/PyTorch order. Empty for a 0-dimensional tensor.
    pub fn shape(&self) -> &[u64] {
        &self.shape
    }

    /// The element type.
    pub fn ggml_type(&self) -> GgmlType {
        self.ggml_type
    }

    /// The number of elements (1 for a 0-dimensional tensor).
    pub fn n_elements(&self) -> u64 {
        self.shape.iter().product()
    }

    /// The data's size in bytes.
    pub fn byte_size(&self) -> usize {
        self.size
    }

    /// The data's offset relative to the data section, as stored in the file.
    pub fn offset(&self) -> u64 {
        self.offset
    }
}

/// A tensor of an open file: its [`TensorInfo`] (through `Deref`) and its bytes in the mapped file.
#[derive(Clone, Copy)]
pub struct Tensor<'a> {
    file: &'a GgufFile,
    info: &'a TensorInfo,
}

impl fmt::Debug for Tensor<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.info, f)
    }
}

impl<'a> Deref for Tensor<'a> {
    type Target = TensorInfo;
    fn deref(&self) -> &TensorInfo {
        self.info
    }
}

impl<'a> Tensor<'a> {
    /// The table entry.
    pub fn info(&self) -> &'a TensorInfo {
        self.info
    }

    /// Where the data starts in the file.
    pub fn file_offset(&self) -> u64 {
        self.file.header.data_offset + self.info.offset
    }

    /// The tensor's bytes, in the file's (ggml) layout.
    pub fn data(&self) -> &'a [u8] {
        // Checked when the file was opened: the range lies inside the file.
        let start = self.file_offset() as usize;
        &self.file.bytes[start..start + self.info.size]
    }

    /// The tensor's values as f32 (in GGUF order, `ne[0]` fastest), if its type can be dequantized.
    pub fn dequantize(&self) -> Result<Vec<f32>, GgufError> {
        let quant_err =
            |source| GgufError::Quant { path: self.file.path.clone(), tensor: self.info.name.clone(), source };
        if !self.ggml_type.can_dequantize() {
            return Err(quant_err(quants::QuantError::DequantizeUnsupported(self.ggml_type)));
        }
        // The element count is at most a small multiple of the byte size, which lies in the file.
        let mut out = vec![0.0f32; self.n_elements() as usize];
        quants::dequantize(self.ggml_type, self.data(), &mut out).map_err(quant_err)?;
        Ok(out)
    }
}

/// What the parser found: everything but the bytes.
struct Header {
    version: u32,
    alignment: u64,
    data_offset: u64,
    metadata: Metadata,
    tensors: Vec<TensorInfo>,
    by_name: HashMap<String, usize>,
}

/// Where the parser is, for error messages.
#[derive(Clone, Copy)]
enum Ctx<'a> {
    Header(&'static str),
    KeyAt(u64),
    Key(&'a str),
    TensorAt(u64),
    Tensor(&'a str),
}

impl fmt::Display for Ctx<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Ctx::Header(what) => write!(f, "header ({what})"),
            Ctx::KeyAt(i) => write!(f, "metadata key #{i}"),
            Ctx::Key(key) => write!(f, "metadata key {key}"),
            Ctx::TensorAt(i) => write!(f, "tensor #{i}"),
            Ctx::Tensor(name) => write!(f, "tensor {name}"),
        }
    }
}

/// A cursor over the file's bytes that never reads past the end.
struct Parser<'a> {
    path: &'a Path,
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Parser<'a> {
    fn parse(mut self) -> Result<Header, GgufError> {
        let magic: [u8; 4] = self.array(Ctx::Header("magic"))?;
        if magic != GGUF_MAGIC {
            return Err(GgufError::BadMagic { path: self.path.to_path_buf(), found: magic });
        }
        let version = self.u32(Ctx::Header("version"))?;
        if version & 0xFFFF == 0 && version != 0 {
            return Err(GgufError::BigEndian { path: self.path.to_path_buf(), version });
        }
        if version != 2 && version != 3 {
            return Err(GgufError::UnsupportedVersion { path: self.path.to_path_buf(), version });
        }
        let n_tensors = self.u64(Ctx::Header("tensor count"))?;
        let n_kv = self.u64(Ctx::Header("metadata count"))?;
        self.check_count(n_tensors, MIN_TENSOR_INFO_BYTES, Ctx::Header("tensor count"))?;
        self.check_count(n_kv, MIN_KV_BYTES, Ctx::Header("metadata count"))?;

        let mut metadata = Metadata::new(self.path.to_path_buf());
        for index in 0..n_kv {
            let (key, value) = self.key_value(index)?;
            if metadata.get(&key).is_some() {
                return Err(GgufError::DuplicateKey { path: self.path.to_path_buf(), key });
            }
            metadata.insert(key, value);
        }
        let alignment = self.alignment(&metadata)?;

        let reserve = (n_tensors as usize).min(MAX_RESERVE);
        let mut tensors = Vec::with_capacity(reserve);
        let mut by_name = HashMap::with_capacity(reserve);
        for index in 0..n_tensors {
            let info = self.tensor_info(index, alignment)?;
            if by_name.insert(info.name.clone(), tensors.len()).is_some() {
                return Err(GgufError::DuplicateTensor { path: self.path.to_path_buf(), name: info.name });
            }
            tensors.push(info);
        }

        // The data section starts at the next multiple of the alignment. (With no tensors a writer may
        // end the file before that; nothing is read there then.)
        let data_offset = (self.pos as u64).next_multiple_of(alignment);
        self.check_tensor_data(&tensors, data_offset)?;
        Ok(Header { version, alignment, data_offset, metadata, tensors, by_name })
    }

    fn remaining(&self) -> u64 {
        (self.bytes.len() - self.pos) as u64
    }

    fn truncated(&self, ctx: Ctx<'_>, needed: u64) -> GgufError {
        GgufError::Truncated {
            path: self.path.to_path_buf(),
            context: ctx.to_string(),
            offset: self.pos as u64,
            needed,
            file_size: self.bytes.len() as u64,
        }
    }

    /// The next `n` bytes.
    fn take(&mut self, n: u64, ctx: Ctx<'_>) -> Result<&'a [u8], GgufError> {
        if n > self.remaining() {
            return Err(self.truncated(ctx, n));
        }
        let start = self.pos;
        self.pos += n as usize;
        Ok(&self.bytes[start..self.pos])
    }

    fn array<const N: usize>(&mut self, ctx: Ctx<'_>) -> Result<[u8; N], GgufError> {
        let bytes = self.take(N as u64, ctx)?;
        let mut out = [0u8; N];
        out.copy_from_slice(bytes);
        Ok(out)
    }

    fn u32(&mut self, ctx: Ctx<'_>) -> Result<u32, GgufError> {
        self.array(ctx).map(u32::from_le_bytes)
    }

    fn u64(&mut self, ctx: Ctx<'_>) -> Result<u64, GgufError> {
        self.array(ctx).map(u64::from_le_bytes)
    }

    /// Rejects `count` items of at least `min_size` bytes each that the rest of the file cannot hold.
    fn check_count(&self, count: u64, min_size: u64, ctx: Ctx<'_>) -> Result<(), GgufError> {
        let remaining = self.remaining();
        let max = remaining / min_size;
        if count > max {
            return Err(GgufError::CountTooLarge {
                path: self.path.to_path_buf(),
                context: ctx.to_string(),
                count,
                max,
                remaining,
            });
        }
        Ok(())
    }

    /// A length-prefixed string, its length bounded by the rest of the file.
    fn string(&mut self, ctx: Ctx<'_>) -> Result<&'a [u8], GgufError> {
        let len = self.u64(ctx)?;
        if len > self.remaining() {
            return Err(GgufError::StringTooLong {
                path: self.path.to_path_buf(),
                context: ctx.to_string(),
                len,
                remaining: self.remaining(),
            });
        }
        self.take(len, ctx)
    }

    fn key_value(&mut self, index: u64) -> Result<(String, Value), GgufError> {
        let raw = self.string(Ctx::KeyAt(index))?;
        let bad_key = |problem| GgufError::BadKey { path: self.path.to_path_buf(), index, problem };
        if raw.is_empty() {
            return Err(bad_key("empty"));
        }
        let key = std::str::from_utf8(raw).map_err(|_| bad_key("not valid UTF-8"))?.to_string();
        let type_id = self.u32(Ctx::Key(&key))?;
        let value = self.value(type_id, &key)?;
        Ok((key, value))
    }

    fn value_type(&self, id: u32, key: &str) -> Result<ValueType, GgufError> {
        ValueType::from_id(id).ok_or_else(|| GgufError::BadValueType {
            path: self.path.to_path_buf(),
            key: key.to_string(),
            id,
        })
    }

    fn value(&mut self, type_id: u32, key: &str) -> Result<Value, GgufError> {
        let ctx = Ctx::Key(key);
        Ok(match self.value_type(type_id, key)? {
            ValueType::U8 => Value::U8(u8::from_le_bytes(self.array(ctx)?)),
            ValueType::I8 => Value::I8(i8::from_le_bytes(self.array(ctx)?)),
            ValueType::U16 => Value::U16(u16::from_le_bytes(self.array(ctx)?)),
            ValueType::I16 => Value::I16(i16::from_le_bytes(self.array(ctx)?)),
            ValueType::U32 => Value::U32(u32::from_le_bytes(self.array(ctx)?)),
            ValueType::I32 => Value::I32(i32::from_le_bytes(self.array(ctx)?)),
            ValueType::F32 => Value::F32(f32::from_le_bytes(self.array(ctx)?)),
            ValueType::Bool => Value::Bool(self.array::<1>(ctx)?[0] != 0),
            ValueType::String => Value::String(GgufString::from(self.string(ctx)?.to_vec())),
            ValueType::Array => Value::Array(self.array_value(key, 1)?),
            ValueType::U64 => Value::U64(u64::from_le_bytes(self.array(ctx)?)),
            ValueType::I64 => Value::I64(i64::from_le_bytes(self.array(ctx)?)),
            ValueType::F64 => Value::F64(f64::from_le_bytes(self.array(ctx)?)),
        })
    }

    /// An array (element type, count, elements) at nesting depth `depth` (1 for a top-level array).
    fn array_value(&mut self, key: &str, depth: usize) -> Result<Array, GgufError> {
        let ctx = Ctx::Key(key);
        let elem = self.u32(ctx)?;
        let elem = self.value_type(elem, key)?;
        let count = self.u64(ctx)?;
        self.check_count(count, elem.min_encoded_size(), ctx)?;
        // From here, `count` elements of fixed size fit in the rest of the file.
        let n = count as usize;
        Ok(match elem {
            ValueType::U8 => Array::U8(self.take(count, ctx)?.to_vec()),
            ValueType::I8 => Array::I8(fixed(self.take(count, ctx)?, i8::from_le_bytes)),
            ValueType::U16 => Array::U16(fixed(self.take(count * 2, ctx)?, u16::from_le_bytes)),
            ValueType::I16 => Array::I16(fixed(self.take(count * 2, ctx)?, i16::from_le_bytes)),
            ValueType::U32 => Array::U32(fixed(self.take(count * 4, ctx)?, u32::from_le_bytes)),
            ValueType::I32 => Array::I32(fixed(self.take(count * 4, ctx)?, i32::from_le_bytes)),
            ValueType::F32 => Array::F32(fixed(self.take(count * 4, ctx)?, f32::from_le_bytes)),
            ValueType::Bool => Array::Bool(self.take(count, ctx)?.iter().map(|&b| b != 0).collect()),
            ValueType::U64 => Array::U64(fixed(self.take(count * 8, ctx)?, u64::from_le_bytes)),
            ValueType::I64 => Array::I64(fixed(self.take(count * 8, ctx)?, i64::from_le_bytes)),
            ValueType::F64 => Array::F64(fixed(self.take(count * 8, ctx)?, f64::from_le_bytes)),
            ValueType::String => {
                let mut items = Vec::with_capacity(n.min(MAX_RESERVE));
                for _ in 0..n {
                    items.push(GgufString::from(self.string(ctx)?.to_vec()));
                }
                Array::String(items)
            }
            ValueType::Array => {
                if depth >= MAX_ARRAY_NESTING {
                    return Err(GgufError::NestingTooDeep {
                        path: self.path.to_path_buf(),
                        key: key.to_string(),
                        max: MAX_ARRAY_NESTING,
                    });
                }
                let mut items = Vec::with_capacity(n.min(MAX_RESERVE));
                for _ in 0..n {
                    items.push(self.array_value(key, depth + 1)?);
                }
                Array::Array(items)
            }
        })
    }

    fn alignment(&self, metadata: &Metadata) -> Result<u64, GgufError> {
        let bad = |problem: String| GgufError::BadAlignment { path: self.path.to_path_buf(), problem };
        match metadata.get(ALIGNMENT_KEY) {
            None => Ok(DEFAULT_ALIGNMENT),
            Some(Value::U32(a)) if a.is_power_of_two() => Ok(u64::from(*a)),
            Some(Value::U32(a)) => Err(bad(format!("{a} is not a non-zero power of two"))),
            Some(other) => Err(bad(format!("must be a u32, found {}", other.type_description()))),
        }
    }

    fn tensor_info(&mut self, index: u64, alignment: u64) -> Result<TensorInfo, GgufError> {
        let path = self.path;
        let raw = self.string(Ctx::TensorAt(index))?;
        let bad_name = |problem| GgufError::BadTensorName { path: path.to_path_buf(), index, problem };
        if raw.is_empty() {
            return Err(bad_name("empty"));
        }
        let name = std::str::from_utf8(raw).map_err(|_| bad_name("not valid UTF-8"))?.to_string();
        let ctx = Ctx::Tensor(&name);

        let n_dims = self.u32(ctx)?;
        if n_dims as usize > MAX_DIMS {
            return Err(GgufError::TooManyDims { path: path.to_path_buf(), tensor: name, n_dims, max: MAX_DIMS });
        }
        let mut shape = Vec::with_capacity(n_dims as usize);
        for _ in 0..n_dims {
            shape.push(self.u64(ctx)?);
        }
        // Like ggml, the element count must fit an i64 (so does every dimension, then).
        let n_elements = shape.iter().try_fold(1u64, |acc, &d| acc.checked_mul(d)).filter(|&n| n <= i64::MAX as u64);
        let overflow =
            || GgufError::ShapeOverflow { path: path.to_path_buf(), tensor: name.clone(), shape: shape.clone() };
        let n_elements = n_elements.ok_or_else(overflow)?;
        if shape.iter().any(|&d| d > i64::MAX as u64) {
            return Err(overflow());
        }

        let type_id = self.u32(ctx)?;
        let ggml_type = GgmlType::from_id(type_id).ok_or_else(|| GgufError::UnknownGgmlType {
            path: path.to_path_buf(),
            tensor: name.clone(),
            id: type_id,
        })?;
        let ne0 = shape.first().copied().unwrap_or(1);
        if !ne0.is_multiple_of(ggml_type.block_size() as u64) {
            return Err(GgufError::PartialBlock {
                path: path.to_path_buf(),
                tensor: name,
                ggml_type,
                ne0,
                block_size: ggml_type.block_size(),
            });
        }
        // Every row is whole blocks, so the total is too.
        let size = ggml_type.bytes_for(n_elements).and_then(|s| usize::try_from(s).ok()).ok_or_else(overflow)?;

        let offset = self.u64(ctx)?;
        if !offset.is_multiple_of(alignment) {
            return Err(GgufError::MisalignedTensor { path: path.to_path_buf(), tensor: name, offset, alignment });
        }
        Ok(TensorInfo { name, shape, ggml_type, offset, size })
    }

    /// Every tensor's data lies inside the file, and no two overlap.
    fn check_tensor_data(&self, tensors: &[TensorInfo], data_offset: u64) -> Result<(), GgufError> {
        let file_size = self.bytes.len() as u64;
        // Absolute [start, end) of each tensor; checked_add guards forged offsets near u64::MAX.
        let mut ranges = Vec::with_capacity(tensors.len());
        for (i, t) in tensors.iter().enumerate() {
            let start = data_offset.checked_add(t.offset);
            let end = start.and_then(|s| s.checked_add(t.size as u64));
            match (start, end) {
                (Some(start), Some(end)) if end <= file_size => ranges.push((start, end, i)),
                _ => {
                    return Err(GgufError::TensorOutOfBounds {
                        path: self.path.to_path_buf(),
                        tensor: t.name.clone(),
                        start: start.unwrap_or(u64::MAX),
                        end: end.unwrap_or(u64::MAX),
                        file_size,
                    });
                }
            }
        }
        // Sorted by start, each non-empty range must begin at or after the furthest end seen so far.
        ranges.sort_unstable();
        let mut furthest: Option<(u64, u64, usize)> = None;
        for &(start, end, i) in &ranges {
            if start == end {
                continue;
            }
            if let Some((other_start, other_end, j)) = furthest
                && start < other_end
            {
                return Err(GgufError::OverlappingTensors {
                    path: self.path.to_path_buf(),
                    tensor: tensors[i].name.clone(),
                    start,
                    end,
                    other: tensors[j].name.clone(),
                    other_start,
                    other_end,
                });
            }
            if furthest.is_none_or(|(_, e, _)| end > e) {
                furthest = Some((start, end, i));
            }
        }
        Ok(())
    }
}

/// Decodes a byte slice of whole `N`-byte little-endian values.
fn fixed<T, const N: usize>(bytes: &[u8], decode: fn([u8; N]) -> T) -> Vec<T> {
    let (chunks, rest) = bytes.as_chunks::<N>();
    debug_assert!(rest.is_empty());
    chunks.iter().map(|&c| decode(c)).collect()
}
