//! Shared by the integration tests: the fixtures in testdata/gguf/ (written by
//! scripts/make_gguf_fixtures.py with llama.cpp's gguf-py) and a builder of hand-made GGUF files.

#![allow(dead_code)]

use std::path::PathBuf;

/// testdata/gguf/
pub fn fixture_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../testdata/gguf")
}

/// The bytes of a fixture file.
pub fn fixture(name: &str) -> Vec<u8> {
    let path = fixture_dir().join(name);
    std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e} (run scripts/make_gguf_fixtures.py)", path.display()))
}

/// A fixture JSON file.
pub fn fixture_json(name: &str) -> serde_json::Value {
    serde_json::from_slice(&fixture(name)).unwrap_or_else(|e| panic!("{name}: {e}"))
}

/// Little-endian f32s.
pub fn f32s(bytes: &[u8]) -> Vec<f32> {
    assert!(bytes.len().is_multiple_of(4));
    bytes.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect()
}

/// Bytes from hex.
pub fn unhex(hex: &str) -> Vec<u8> {
    assert!(hex.len().is_multiple_of(2));
    (0..hex.len()).step_by(2).map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap()).collect()
}

// GGUF value type ids.
pub const T_U8: u32 = 0;
pub const T_U32: u32 = 4;
pub const T_I32: u32 = 5;
pub const T_STRING: u32 = 8;
pub const T_ARRAY: u32 = 9;
pub const T_U64: u32 = 10;

// ggml type ids.
pub const G_F32: u32 = 0;
pub const G_F16: u32 = 1;
pub const G_Q8_0: u32 = 8;

/// A GGUF file assembled field by field, so that tests can forge any header.
#[derive(Clone)]
pub struct Gguf {
    pub magic: [u8; 4],
    pub version: u32,
    /// Tensor count written in the header; the number of `tensor` calls if `None`.
    pub n_tensors: Option<u64>,
    /// Metadata count written in the header; the number of `kv_*` calls if `None`.
    pub n_kv: Option<u64>,
    pub alignment: u64,
    kvs: Vec<u8>,
    kv_count: u64,
    infos: Vec<u8>,
    info_count: u64,
    pub data: Vec<u8>,
}

pub fn string(out: &mut Vec<u8>, s: &[u8]) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s);
}

impl Gguf {
    pub fn new() -> Self {
        Gguf {
            magic: *b"GGUF",
            version: 3,
            n_tensors: None,
            n_kv: None,
            alignment: 32,
            kvs: Vec::new(),
            kv_count: 0,
            infos: Vec::new(),
            info_count: 0,
            data: Vec::new(),
        }
    }

    /// A key with a raw (already encoded) value of type `type_id`.
    pub fn kv_raw(mut self, key: &[u8], type_id: u32, value: &[u8]) -> Self {
        string(&mut self.kvs, key);
        self.kvs.extend_from_slice(&type_id.to_le_bytes());
        self.kvs.extend_from_slice(value);
        self.kv_count += 1;
        self
    }

    pub fn kv_u32(self, key: &str, v: u32) -> Self {
        self.kv_raw(key.as_bytes(), T_U32, &v.to_le_bytes())
    }

    pub fn kv_str(self, key: &str, v: &str) -> Self {
        let mut raw = Vec::new();
        string(&mut raw, v.as_bytes());
        self.kv_raw(key.as_bytes(), T_STRING, &raw)
    }

    /// A tensor info with raw fields.
    pub fn tensor_raw(mut self, name: &[u8], dims: &[u64], ggml_type: u32, offset: u64) -> Self {
        string(&mut self.infos, name);
        self.infos.extend_from_slice(&(dims.len() as u32).to_le_bytes());
        for d in dims {
            self.infos.extend_from_slice(&d.to_le_bytes());
        }
        self.infos.extend_from_slice(&ggml_type.to_le_bytes());
        self.infos.extend_from_slice(&offset.to_le_bytes());
        self.info_count += 1;
        self
    }

    pub fn tensor(self, name: &str, dims: &[u64], ggml_type: u32, offset: u64) -> Self {
        self.tensor_raw(name.as_bytes(), dims, ggml_type, offset)
    }

    pub fn data(mut self, data: Vec<u8>) -> Self {
        self.data = data;
        self
    }

    pub fn build(&self) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(&self.magic);
        out.extend_from_slice(&self.version.to_le_bytes());
        out.extend_from_slice(&self.n_tensors.unwrap_or(self.info_count).to_le_bytes());
        out.extend_from_slice(&self.n_kv.unwrap_or(self.kv_count).to_le_bytes());
        out.extend_from_slice(&self.kvs);
        out.extend_from_slice(&self.infos);
        while !(out.len() as u64).is_multiple_of(self.alignment) {
            out.push(0);
        }
        out.extend_from_slice(&self.data);
        out
    }
}

/// A small valid file: two keys, an F32 tensor of 8 values at offset 0 and a Q8_0 tensor of 2x32 values
/// at offset 32, the data filled with a pattern.
pub fn valid() -> Gguf {
    Gguf::new()
        .kv_str("general.architecture", "llama")
        .kv_u32("llama.block_count", 1)
        .tensor("a", &[8], G_F32, 0)
        .tensor("b", &[32, 2], G_Q8_0, 32)
        .data((0..32 + 68).map(|i| (i * 7 % 251) as u8).collect())
}
