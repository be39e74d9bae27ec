//! GGUF metadata: the typed key/value pairs in a file's header, and typed getters for them.
//!
//! A value is one of GGUF's thirteen [`ValueType`]s. Arrays keep their element type
//! ([`Array`] is one typed vector per element type) and may nest: each inner array of an array of arrays
//! carries its own element type. Strings are kept as the bytes the file holds ([`GgufString`]): GGUF does
//! not promise UTF-8 (some tokenizers' vocabularies are raw bytes), so a string is only required to be UTF-8
//! when it is asked for as `&str`.
//!
//! [`Metadata`] keeps the pairs in file order with a key index. Its typed getters (`get_u32`, `get_str`,
//! `get_f32_array`, ...) give a [`GgufError`] naming the file and key when the key is missing or holds
//! another type. Integer getters accept every integer width whose value fits the type asked for, because
//! llama.cpp's writers are not consistent about widths (gguf-py writes Python ints in arrays as i32, most
//! hyperparameters as u32, a few as u64 or i32). Float and bool getters are strict, except that `get_f64`
//! also accepts an f32 (widening is exact). [`Metadata::optional`] turns any getter into one that returns
//! `Ok(None)` for a missing key.

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};

use crate::error::GgufError;

/// The type of a metadata value, with GGUF's type ids.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u32)]
pub enum ValueType {
    /// `u8`
    U8 = 0,
    /// `i8`
    I8 = 1,
    /// `u16`
    U16 = 2,
    /// `i16`
    I16 = 3,
    /// `u32`
    U32 = 4,
    /// `i32`
    I32 = 5,
    /// `f32`
    F32 = 6,
    /// One byte, non-zero is true (as llama.cpp reads it).
    Bool = 7,
    /// A u64 length and that many bytes.
    String = 8,
    /// An element type (u32), a u64 count, and the elements.
    Array = 9,
    /// `u64`
    U64 = 10,
    /// `i64`
    I64 = 11,
    /// `f64`
    F64 = 12,
}

impl ValueType {
    /// The type with GGUF type id `id`.
    pub fn from_id(id: u32) -> Option<Self> {
        use ValueType::*;
        Some(match id {
            0 => U8,
            1 => I8,
            2 => U16,
            3 => I16,
            4 => U32,
            5 => I32,
            6 => F32,
            7 => Bool,
            8 => String,
            9 => Array,
            10 => U64,
            11 => I64,
            12 => F64,
            _ => return None,
        })
    }

    /// GGUF's id of the type.
    pub fn id(self) -> u32 {
        self as u32
    }

    /// Short name: `u8`, `i32`, `f32`, `bool`, `string`, `array`, ...
    pub fn name(self) -> &'static str {
        use ValueType::*;
        match self {
            U8 => "u8",
            I8 => "i8",
            U16 => "u16",
            I16 => "i16",
            U32 => "u32",
            I32 => "i32",
            F32 => "f32",
            Bool => "bool",
            String => "string",
            Array => "array",
            U64 => "u64",
            I64 => "i64",
            F64 => "f64",
        }
    }

    /// The fewest bytes one value of this type takes in a file: its size for fixed-size types, the length
    /// prefix for a string, the element type and count for an array. Counts are bounded with it.
    pub(crate) fn min_encoded_size(self) -> u64 {
        use ValueType::*;
        match self {
            U8 | I8 | Bool => 1,
            U16 | I16 => 2,
            U32 | I32 | F32 => 4,
            U64 | I64 | F64 | String => 8,
            Array => 12,
        }
    }
}

impl fmt::Display for ValueType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A GGUF string: the bytes the file holds, usually but not necessarily UTF-8.
#[derive(Clone, PartialEq, Eq, Hash, Default)]
pub struct GgufString(Vec<u8>);

impl GgufString {
    /// The raw bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    /// The string, if it is UTF-8.
    pub fn to_str(&self) -> Option<&str> {
        std::str::from_utf8(&self.0).ok()
    }

    /// The raw bytes, owned.
    pub fn into_bytes(self) -> Vec<u8> {
        self.0
    }
}

impl From<Vec<u8>> for GgufString {
    fn from(bytes: Vec<u8>) -> Self {
        GgufString(bytes)
    }
}

impl From<&str> for GgufString {
    fn from(s: &str) -> Self {
        GgufString(s.as_bytes().to_vec())
    }
}

impl From<String> for GgufString {
    fn from(s: String) -> Self {
        GgufString(s.into_bytes())
    }
}

impl PartialEq<str> for GgufString {
    fn eq(&self, other: &str) -> bool {
        self.0 == other.as_bytes()
    }
}

impl PartialEq<&str> for GgufString {
    fn eq(&self, other: &&str) -> bool {
        self.0 == other.as_bytes()
    }
}

impl fmt::Debug for GgufString {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.to_str() {
            Some(s) => fmt::Debug::fmt(s, f),
            None => write!(f, "b\"{}\"", self.0.escape_ascii()),
        }
    }
}

/// Shown as text, invalid UTF-8 replaced by U+FFFD.
impl fmt::Display for GgufString {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&String::from_utf8_lossy(&self.0))
    }
}

/// One metadata value.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    /// `u8`
    U8(u8),
    /// `i8`
    I8(i8),
    /// `u16`
    U16(u16),
    /// `i16`
    I16(i16),
    /// `u32`
    U32(u32),
    /// `i32`
    I32(i32),
    /// `f32`
    F32(f32),
    /// `bool`
    Bool(bool),
    /// `string`
    String(GgufString),
    /// `array`
    Array(Array),
    /// `u64`
    U64(u64),
    /// `i64`
    I64(i64),
    /// `f64`
    F64(f64),
}

impl Value {
    /// The value's GGUF type.
    pub fn value_type(&self) -> ValueType {
        match self {
            Value::U8(_) => ValueType::U8,
            Value::I8(_) => ValueType::I8,
            Value::U16(_) => ValueType::U16,
            Value::I16(_) => ValueType::I16,
            Value::U32(_) => ValueType::U32,
            Value::I32(_) => ValueType::I32,
            Value::F32(_) => ValueType::F32,
            Value::Bool(_) => ValueType::Bool,
            Value::String(_) => ValueType::String,
            Value::Array(_) => ValueType::Array,
            Value::U64(_) => ValueType::U64,
            Value::I64(_) => ValueType::I64,
            Value::F64(_) => ValueType::F64,
        }
    }

    /// The value of any integer type, widened losslessly; `None` for the other types.
    pub fn as_int(&self) -> Option<i128> {
        Some(match *self {
            Value::U8(v) => v.into(),
            Value::I8(v) => v.into(),
            Value::U16(v) => v.into(),
            Value::I16(v) => v.into(),
            Value::U32(v) => v.into(),
            Value::I32(v) => v.into(),
            Value::U64(v) => v.into(),
            Value::I64(v) => v.into(),
            _ => return None,
        })
    }

    /// The string, if the value is a string.
    pub fn as_string(&self) -> Option<&GgufString> {
        match self {
            Value::String(s) => Some(s),
            _ => None,
        }
    }

    /// The array, if the value is an array.
    pub fn as_array(&self) -> Option<&Array> {
        match self {
            Value::Array(a) => Some(a),
            _ => None,
        }
    }

    /// The type as an error message shows it: `u32`, `array of string`, `array of array`.
    pub fn type_description(&self) -> String {
        match self {
            Value::Array(a) => format!("array of {}", a.elem_type()),
            other => other.value_type().name().to_string(),
        }
    }
}

/// A metadata array: one typed vector per element type. Nested arrays ([`Array::Array`]) carry their own
/// element types, which may differ between the inner arrays.
#[derive(Clone, Debug, PartialEq)]
pub enum Array {
    /// `u8` elements
    U8(Vec<u8>),
    /// `i8` elements
    I8(Vec<i8>),
    /// `u16` elements
    U16(Vec<u16>),
    /// `i16` elements
    I16(Vec<i16>),
    /// `u32` elements
    U32(Vec<u32>),
    /// `i32` elements
    I32(Vec<i32>),
    /// `f32` elements
    F32(Vec<f32>),
    /// `bool` elements
    Bool(Vec<bool>),
    /// `string` elements
    String(Vec<GgufString>),
    /// `array` elements
    Array(Vec<Array>),
    /// `u64` elements
    U64(Vec<u64>),
    /// `i64` elements
    I64(Vec<i64>),
    /// `f64` elements
    F64(Vec<f64>),
}

impl Array {
    /// The element type.
    pub fn elem_type(&self) -> ValueType {
        match self {
            Array::U8(_) => ValueType::U8,
            Array::I8(_) => ValueType::I8,
            Array::U16(_) => ValueType::U16,
            Array::I16(_) => ValueType::I16,
            Array::U32(_) => ValueType::U32,
            Array::I32(_) => ValueType::I32,
            Array::F32(_) => ValueType::F32,
            Array::Bool(_) => ValueType::Bool,
            Array::String(_) => ValueType::String,
            Array::Array(_) => ValueType::Array,
            Array::U64(_) => ValueType::U64,
            Array::I64(_) => ValueType::I64,
            Array::F64(_) => ValueType::F64,
        }
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        match self {
            Array::U8(v) => v.len(),
            Array::I8(v) => v.len(),
            Array::U16(v) => v.len(),
            Array::I16(v) => v.len(),
            Array::U32(v) => v.len(),
            Array::I32(v) => v.len(),
            Array::F32(v) => v.len(),
            Array::Bool(v) => v.len(),
            Array::String(v) => v.len(),
            Array::Array(v) => v.len(),
            Array::U64(v) => v.len(),
            Array::I64(v) => v.len(),
            Array::F64(v) => v.len(),
        }
    }

    /// Whether the array has no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Element `i` as a [`Value`] (cloned), or `None` past the end.
    pub fn get(&self, i: usize) -> Option<Value> {
        Some(match self {
            Array::U8(v) => Value::U8(*v.get(i)?),
            Array::I8(v) => Value::I8(*v.get(i)?),
            Array::U16(v) => Value::U16(*v.get(i)?),
            Array::I16(v) => Value::I16(*v.get(i)?),
            Array::U32(v) => Value::U32(*v.get(i)?),
            Array::I32(v) => Value::I32(*v.get(i)?),
            Array::F32(v) => Value::F32(*v.get(i)?),
            Array::Bool(v) => Value::Bool(*v.get(i)?),
            Array::String(v) => Value::String(v.get(i)?.clone()),
            Array::Array(v) => Value::Array(v.get(i)?.clone()),
            Array::U64(v) => Value::U64(*v.get(i)?),
            Array::I64(v) => Value::I64(*v.get(i)?),
            Array::F64(v) => Value::F64(*v.get(i)?),
        })
    }

    /// The elements widened to i128, if the element type is an integer type.
    fn ints(&self) -> Option<Vec<i128>> {
        fn widen<T: Copy + Into<i128>>(v: &[T]) -> Vec<i128> {
            v.iter().map(|&x| x.into()).collect()
        }
        Some(match self {
            Array::U8(v) => widen(v),
            Array::I8(v) => widen(v),
            Array::U16(v) => widen(v),
            Array::I16(v) => widen(v),
            Array::U32(v) => widen(v),
            Array::I32(v) => widen(v),
            Array::U64(v) => widen(v),
            Array::I64(v) => widen(v),
            _ => return None,
        })
    }
}

/// A file's metadata: key/value pairs in file order, looked up by key.
#[derive(Clone, Debug)]
pub struct Metadata {
    path: PathBuf,
    entries: Vec<(String, Value)>,
    index: HashMap<String, usize>,
}

impl Metadata {
    /// Metadata with no pairs; `path` is what error messages name.
    pub(crate) fn new(path: PathBuf) -> Self {
        Metadata { path, entries: Vec::new(), index: HashMap::new() }
    }

    /// Adds a pair; false (and nothing added) if the key is already there.
    pub(crate) fn insert(&mut self, key: String, value: Value) -> bool {
        if self.index.contains_key(&key) {
            return false;
        }
        self.index.insert(key.clone(), self.entries.len());
        self.entries.push((key, value));
        true
    }

    /// The path error messages name.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Number of pairs.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether there are no pairs.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The pairs in file order.
    pub fn iter(&self) -> impl ExactSizeIterator<Item = (&str, &Value)> + '_ {
        self.entries.iter().map(|(k, v)| (k.as_str(), v))
    }

    /// The keys in file order.
    pub fn keys(&self) -> impl ExactSizeIterator<Item = &str> + '_ {
        self.entries.iter().map(|(k, _)| k.as_str())
    }

    /// The value of `key`, if present.
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.index.get(key).map(|&i| &self.entries[i].1)
    }

    /// Whether `key` is present.
    pub fn contains_key(&self, key: &str) -> bool {
        self.index.contains_key(key)
    }

    /// Runs a getter for an optional key: `Ok(None)` if the key is missing, the getter's result otherwise
    /// (so a key of the wrong type is still an error). For example
    /// `md.optional("llama.rope.freq_base", Metadata::get_f32)?.unwrap_or(10000.0)`.
    pub fn optional<'a, T>(
        &'a self,
        key: &str,
        get: impl FnOnce(&'a Self, &str) -> Result<T, GgufError>,
    ) -> Result<Option<T>, GgufError> {
        if self.contains_key(key) { get(self, key).map(Some) } else { Ok(None) }
    }

    /// The value of `key`, or [`GgufError::MissingKey`].
    pub fn require(&self, key: &str) -> Result<&Value, GgufError> {
        self.get(key).ok_or_else(|| GgufError::MissingKey { path: self.path.clone(), key: key.to_string() })
    }

    /// An integer value of any width whose value fits in a `u8`.
    pub fn get_u8(&self, key: &str) -> Result<u8, GgufError> {
        self.get_int(key, "u8")
    }

    /// An integer value of any width whose value fits in a `u32`.
    pub fn get_u32(&self, key: &str) -> Result<u32, GgufError> {
        self.get_int(key, "u32")
    }

    /// An integer value of any width whose value fits in a `u64`.
    pub fn get_u64(&self, key: &str) -> Result<u64, GgufError> {
        self.get_int(key, "u64")
    }

    /// An integer value of any width whose value fits in an `i32`.
    pub fn get_i32(&self, key: &str) -> Result<i32, GgufError> {
        self.get_int(key, "i32")
    }

    /// An integer value of any width whose value fits in an `i64`.
    pub fn get_i64(&self, key: &str) -> Result<i64, GgufError> {
        self.get_int(key, "i64")
    }

    /// An integer value of any width whose value fits in a `usize`.
    pub fn get_usize(&self, key: &str) -> Result<usize, GgufError> {
        self.get_int(key, "usize")
    }

    /// An `f32` value.
    pub fn get_f32(&self, key: &str) -> Result<f32, GgufError> {
        match self.require(key)? {
            Value::F32(v) => Ok(*v),
            other => Err(self.wrong_type(key, "f32", other)),
        }
    }

    /// An `f64` value, or an `f32` widened.
    pub fn get_f64(&self, key: &str) -> Result<f64, GgufError> {
        match self.require(key)? {
            Value::F64(v) => Ok(*v),
            Value::F32(v) => Ok((*v).into()),
            other => Err(self.wrong_type(key, "f64 or f32", other)),
        }
    }

    /// A `bool` value.
    pub fn get_bool(&self, key: &str) -> Result<bool, GgufError> {
        match self.require(key)? {
            Value::Bool(v) => Ok(*v),
            other => Err(self.wrong_type(key, "bool", other)),
        }
    }

    /// A string value that is UTF-8.
    pub fn get_str(&self, key: &str) -> Result<&str, GgufError> {
        match self.require(key)? {
            Value::String(s) => s.to_str().ok_or_else(|| self.not_utf8(key, None)),
            other => Err(self.wrong_type(key, "string", other)),
        }
    }

    /// A string value as raw bytes.
    pub fn get_bytes(&self, key: &str) -> Result<&[u8], GgufError> {
        match self.require(key)? {
            Value::String(s) => Ok(s.as_bytes()),
            other => Err(self.wrong_type(key, "string", other)),
        }
    }

    /// An array value of any element type.
    pub fn get_array(&self, key: &str) -> Result<&Array, GgufError> {
        match self.require(key)? {
            Value::Array(a) => Ok(a),
            other => Err(self.wrong_type(key, "array", other)),
        }
    }

    /// An array of strings, every one UTF-8 (e.g. `tokenizer.ggml.tokens`).
    pub fn get_str_array(&self, key: &str) -> Result<Vec<&str>, GgufError> {
        match self.get_array(key)? {
            Array::String(v) => {
                v.iter().enumerate().map(|(i, s)| s.to_str().ok_or_else(|| self.not_utf8(key, Some(i)))).collect()
            }
            other => Err(self.wrong_array_type(key, "array of string", other)),
        }
    }

    /// An array of strings as raw bytes (e.g. a byte-level vocabulary that is not UTF-8).
    pub fn get_bytes_array(&self, key: &str) -> Result<Vec<&[u8]>, GgufError> {
        match self.get_array(key)? {
            Array::String(v) => Ok(v.iter().map(GgufString::as_bytes).collect()),
            other => Err(self.wrong_array_type(key, "array of string", other)),
        }
    }

    /// An array of `f32` (e.g. `tokenizer.ggml.scores`), borrowed.
    pub fn get_f32_array(&self, key: &str) -> Result<&[f32], GgufError> {
        match self.get_array(key)? {
            Array::F32(v) => Ok(v),
            other => Err(self.wrong_array_type(key, "array of f32", other)),
        }
    }

    /// An array of any integer element type whose every element fits in an `i32`
    /// (e.g. `tokenizer.ggml.token_type`, which gguf-py writes as i32 and others as u32).
    pub fn get_i32_array(&self, key: &str) -> Result<Vec<i32>, GgufError> {
        self.get_int_array(key, "i32")
    }

    /// An array of any integer element type whose every element fits in a `u32`.
    pub fn get_u32_array(&self, key: &str) -> Result<Vec<u32>, GgufError> {
        self.get_int_array(key, "u32")
    }

    fn get_int<T: TryFrom<i128>>(&self, key: &str, target: &'static str) -> Result<T, GgufError> {
        let value = self.require(key)?;
        let Some(v) = value.as_int() else {
            return Err(self.wrong_type(key, "an integer", value));
        };
        T::try_from(v).map_err(|_| GgufError::OutOfRange {
            path: self.path.clone(),
            key: key.to_string(),
            index: None,
            value: v,
            target,
        })
    }

    fn get_int_array<T: TryFrom<i128>>(&self, key: &str, target: &'static str) -> Result<Vec<T>, GgufError> {
        let array = self.get_array(key)?;
        let Some(ints) = array.ints() else {
            return Err(self.wrong_array_type(key, "array of an integer type", array));
        };
        ints.into_iter()
            .enumerate()
            .map(|(i, v)| {
                T::try_from(v).map_err(|_| GgufError::OutOfRange {
                    path: self.path.clone(),
                    key: key.to_string(),
                    index: Some(i),
                    value: v,
                    target,
                })
            })
            .collect()
    }

    fn wrong_type(&self, key: &str, expected: &'static str, found: &Value) -> GgufError {
        GgufError::WrongType {
            path: self.path.clone(),
            key: key.to_string(),
            expected,
            found: found.type_description(),
        }
    }

    fn wrong_array_type(&self, key: &str, expected: &'static str, found: &Array) -> GgufError {
        GgufError::WrongType {
            path: self.path.clone(),
            key: key.to_string(),
            expected,
            found: format!("array of {}", found.elem_type()),
        }
    }

    fn not_utf8(&self, key: &str, index: Option<usize>) -> GgufError {
        GgufError::NotUtf8 { path: self.path.clone(), key: key.to_string(), index }
    }
}
