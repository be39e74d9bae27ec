//! The errors of reading a GGUF file and of asking its metadata for a typed value.
//!
//! [`GgufError`] is what [`crate::reader`] and [`crate::metadata`] return. Every variant's message starts
//! with the file's path and names what it concerns (a metadata key, a tensor, or a position in the header),
//! so an error can be shown to a user as it is, e.g.
//! `model.gguf: tensor blk.0.attn_q.weight: data [4096, 8192) lies past the end of the file (size 6000)`.
//! Errors of (de)quantizing a byte buffer are [`crate::quants::QuantError`]; a tensor's
//! [`crate::reader::Tensor::dequantize`] wraps one in [`GgufError::Quant`] with the path and tensor name.

use std::path::PathBuf;

use crate::quants::{GgmlType, QuantError};

/// Everything that can go wrong opening a GGUF file or reading its metadata.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum GgufError {
    /// The file could not be opened, its size read, or mapped.
    #[error("{}: cannot read the file: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// What the operating system said.
        source: std::io::Error,
    },

    /// The first four bytes are not `GGUF`.
    #[error("{}: not a GGUF file: it starts with {found:02x?}, not \"GGUF\"", path.display())]
    BadMagic {
        /// The file.
        path: PathBuf,
        /// The first four bytes.
        found: [u8; 4],
    },

    /// The version field reads as a byte-swapped small number: a big-endian GGUF file.
    #[error("{}: GGUF version field is {version:#010x}, which is a byte-swapped version: big-endian GGUF files are not supported", path.display())]
    BigEndian {
        /// The file.
        path: PathBuf,
        /// The version field as read little-endian.
        version: u32,
    },

    /// A GGUF version other than 2 or 3 (v1 used 32-bit counts and is obsolete).
    #[error("{}: GGUF version {version} is not supported (only versions 2 and 3 are)", path.display())]
    UnsupportedVersion {
        /// The file.
        path: PathBuf,
        /// The version in the header.
        version: u32,
    },

    /// The file ends before a field that the header says is there.
    #[error("{}: {context}: truncated: {needed} bytes needed at offset {offset}, but the file has {file_size} bytes", path.display())]
    Truncated {
        /// The file.
        path: PathBuf,
        /// Which part of the header was being read.
        context: String,
        /// Where the field starts.
        offset: u64,
        /// How long the field is.
        needed: u64,
        /// The file's size.
        file_size: u64,
    },

    /// A count in the header (tensors, metadata keys, array elements) is more than the rest of the file
    /// could possibly hold, so it is rejected before anything is allocated for it.
    #[error("{}: {context}: count {count} is impossible: the {remaining} bytes left in the file hold at most {max}", path.display())]
    CountTooLarge {
        /// The file.
        path: PathBuf,
        /// What was counted.
        context: String,
        /// The count in the file.
        count: u64,
        /// The largest count that the remaining bytes could hold.
        max: u64,
        /// Bytes left in the file after the count.
        remaining: u64,
    },

    /// A string's length is more than the rest of the file.
    #[error("{}: {context}: string length {len} exceeds the {remaining} bytes left in the file", path.display())]
    StringTooLong {
        /// The file.
        path: PathBuf,
        /// Which string.
        context: String,
        /// The length in the file.
        len: u64,
        /// Bytes left in the file after the length.
        remaining: u64,
    },

    /// A metadata value has a type id that GGUF does not define.
    #[error("{}: metadata key {key}: unknown value type id {id}", path.display())]
    BadValueType {
        /// The file.
        path: PathBuf,
        /// The key whose value (or array element type) it is.
        key: String,
        /// The type id in the file.
        id: u32,
    },

    /// Arrays of arrays nested deeper than [`crate::reader::MAX_ARRAY_NESTING`].
    #[error("{}: metadata key {key}: arrays nested deeper than {max} levels", path.display())]
    NestingTooDeep {
        /// The file.
        path: PathBuf,
        /// The key.
        key: String,
        /// The limit.
        max: usize,
    },

    /// A metadata key that is empty or not UTF-8.
    #[error("{}: metadata key #{index} is {problem}", path.display())]
    BadKey {
        /// The file.
        path: PathBuf,
        /// Position of the key among the file's key/value pairs (0-based).
        index: u64,
        /// `"empty"` or `"not valid UTF-8"`.
        problem: &'static str,
    },

    /// The same metadata key twice.
    #[error("{}: metadata key {key} appears twice", path.display())]
    DuplicateKey {
        /// The file.
        path: PathBuf,
        /// The key.
        key: String,
    },

    /// `general.alignment` is not a u32, or is zero or not a power of two.
    #[error("{}: metadata key general.alignment: {problem}", path.display())]
    BadAlignment {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        problem: String,
    },

    /// A tensor name that is empty or not UTF-8.
    #[error("{}: tensor #{index}: name is {problem}", path.display())]
    BadTensorName {
        /// The file.
        path: PathBuf,
        /// Position of the tensor in the file's tensor table (0-based).
        index: u64,
        /// `"empty"` or `"not valid UTF-8"`.
        problem: &'static str,
    },

    /// Two tensors with the same name.
    #[error("{}: tensor {name} appears twice", path.display())]
    DuplicateTensor {
        /// The file.
        path: PathBuf,
        /// The name.
        name: String,
    },

    /// More than [`crate::reader::MAX_DIMS`] dimensions.
    #[error("{}: tensor {tensor}: {n_dims} dimensions, at most {max} are allowed", path.display())]
    TooManyDims {
        /// The file.
        path: PathBuf,
        /// The tensor.
        tensor: String,
        /// Dimensions in the file.
        n_dims: u32,
        /// The limit.
        max: usize,
    },

    /// The shape's element count (or a single dimension) does not fit in an i64, or its byte size
    /// does not fit in memory.
    #[error("{}: tensor {tensor}: shape {shape:?} is too large", path.display())]
    ShapeOverflow {
        /// The file.
        path: PathBuf,
        /// The tensor.
        tensor: String,
        /// The shape, GGUF order.
        shape: Vec<u64>,
    },

    /// A tensor type id that llama.cpp does not define (or no longer allows in files).
    #[error("{}: tensor {tensor}: unknown ggml type id {id}", path.display())]
    UnknownGgmlType {
        /// The file.
        path: PathBuf,
        /// The tensor.
        tensor: String,
        /// The type id in the file.
        id: u32,
    },

    /// The row length `ne[0]` is not a whole number of the type's blocks.
    #[error("{}: tensor {tensor}: row length {ne0} is not a multiple of the {ggml_type} block size {block_size}", path.display())]
    PartialBlock {
        /// The file.
        path: PathBuf,
        /// The tensor.
        tensor: String,
        /// Its type.
        ggml_type: GgmlType,
        /// `ne[0]`, the fastest-varying dimension.
        ne0: u64,
        /// Elements per block of the type.
        block_size: usize,
    },

    /// A tensor's offset in the data section is not a multiple of the file's alignment.
    #[error("{}: tensor {tensor}: data offset {offset} is not a multiple of the alignment {alignment}", path.display())]
    MisalignedTensor {
        /// The file.
        path: PathBuf,
        /// The tensor.
        tensor: String,
        /// Offset relative to the data section.
        offset: u64,
        /// The file's alignment.
        alignment: u64,
    },

    /// A tensor's data does not lie inside the file.
    #[error("{}: tensor {tensor}: data [{start}, {end}) lies past the end of the file (size {file_size})", path.display())]
    TensorOutOfBounds {
        /// The file.
        path: PathBuf,
        /// The tensor.
        tensor: String,
        /// Absolute start offset in the file (saturated at `u64::MAX` if it overflows).
        start: u64,
        /// Absolute end offset (exclusive, saturated).
        end: u64,
        /// The file's size.
        file_size: u64,
    },

    /// Two tensors' data ranges overlap.
    #[error("{}: tensor {tensor}: data [{start}, {end}) overlaps tensor {other} at [{other_start}, {other_end})", path.display())]
    OverlappingTensors {
        /// The file.
        path: PathBuf,
        /// The tensor that starts later.
        tensor: String,
        /// Its absolute data range.
        start: u64,
        /// End of that range (exclusive).
        end: u64,
        /// The tensor it runs into.
        other: String,
        /// That tensor's absolute data range.
        other_start: u64,
        /// End of that range (exclusive).
        other_end: u64,
    },

    /// A metadata key asked for is not in the file.
    #[error("{}: metadata key {key} is missing", path.display())]
    MissingKey {
        /// The file.
        path: PathBuf,
        /// The key.
        key: String,
    },

    /// A metadata value has another type than the one asked for.
    #[error("{}: metadata key {key}: expected {expected}, found {found}", path.display())]
    WrongType {
        /// The file.
        path: PathBuf,
        /// The key.
        key: String,
        /// What the getter accepts.
        expected: &'static str,
        /// What the file holds, e.g. `array of string`.
        found: String,
    },

    /// An integer value (or array element) does not fit the integer type asked for.
    #[error("{}: metadata key {key}: value {value}{} does not fit in {target}", path.display(), element_suffix(*index))]
    OutOfRange {
        /// The file.
        path: PathBuf,
        /// The key.
        key: String,
        /// Array index of the element, for arrays.
        index: Option<usize>,
        /// The value.
        value: i128,
        /// The type asked for.
        target: &'static str,
    },

    /// A string value (or string array element) asked for as `&str` is not UTF-8.
    #[error("{}: metadata key {key}: string{} is not valid UTF-8", path.display(), element_suffix(*index))]
    NotUtf8 {
        /// The file.
        path: PathBuf,
        /// The key.
        key: String,
        /// Array index of the element, for arrays.
        index: Option<usize>,
    },

    /// Dequantizing a tensor failed (its type is not supported).
    #[error("{}: tensor {tensor}: {source}", path.display())]
    Quant {
        /// The file.
        path: PathBuf,
        /// The tensor.
        tensor: String,
        /// Why.
        source: QuantError,
    },
}

fn element_suffix(index: Option<usize>) -> String {
    index.map(|i| format!(" (element {i})")).unwrap_or_default()
}
