//! Untrusted input: truncated files, forged headers and corrupted bytes must give errors that name the
//! file and what is wrong, never a panic, an out-of-bounds read or a huge allocation.

mod common;

use common::*;
use tessera_gguf::{GgufError, GgufFile};

const NAME: &str = "hostile.gguf";

fn parse(bytes: Vec<u8>) -> Result<GgufFile, GgufError> {
    GgufFile::from_bytes(NAME, bytes)
}

/// The error's message, which must start with the file name.
fn message(result: Result<GgufFile, GgufError>) -> String {
    let err = result.expect_err("the file must be rejected");
    let msg = err.to_string();
    assert!(msg.starts_with(&format!("{NAME}: ")), "message does not name the file: {msg}");
    msg
}

/// Exercises everything a caller can reach from a parsed file.
fn touch_everything(file: &GgufFile) {
    let md = file.metadata();
    for (key, _) in md.iter() {
        let _ = (md.get_u32(key), md.get_str(key), md.get_str_array(key), md.get_i32_array(key));
    }
    for t in file.tensors() {
        assert_eq!(t.data().len(), t.byte_size());
        if t.n_elements() <= 1 << 20 {
            let _ = t.dequantize();
        }
    }
}

/// The variant's name, from its Debug form.
fn variant(err: &GgufError) -> String {
    format!("{err:?}").split([' ', '(', '{']).next().unwrap().to_string()
}

#[test]
fn gguf_py_file_truncated_at_every_length_is_an_error() {
    let full = fixture("writer.gguf");
    let json = fixture_json("writer.json");
    // The end of the last tensor's data; after it only alignment padding follows.
    let data_end = json["tensors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["file_offset"].as_u64().unwrap() + t["n_bytes"].as_u64().unwrap())
        .max()
        .unwrap() as usize;
    assert!(data_end < full.len(), "the fixture should end with padding");
    let reference = GgufFile::from_bytes("full", full.clone()).unwrap();

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("truncated.gguf");
    let mut kinds = std::collections::BTreeSet::new();
    for len in 0..full.len() {
        std::fs::write(&path, &full[..len]).unwrap();
        let result = GgufFile::open(&path);
        if len < data_end {
            let err = result.err().unwrap_or_else(|| panic!("truncated to {len} bytes, the file opened"));
            let msg = err.to_string();
            assert!(msg.starts_with(&format!("{}: ", path.display())), "{len}: {msg}");
            kinds.insert(variant(&err));
        } else {
            // Only trailing padding is missing: every tensor's data is there, and it is the same.
            let file = result.unwrap_or_else(|e| panic!("truncated to {len} bytes, only padding lost: {e}"));
            assert!(file.tensors().zip(reference.tensors()).all(|(a, b)| a.data() == b.data()));
        }
    }
    // Cutting the file short hits every kind of field.
    for kind in ["Truncated", "StringTooLong", "CountTooLarge", "TensorOutOfBounds"] {
        assert!(kinds.contains(kind), "no truncation gave {kind}: {kinds:?}");
    }
}

#[test]
fn hand_built_file_truncated_at_every_length_is_an_error() {
    let full = valid().build();
    parse(full.clone()).unwrap();
    for len in 0..full.len() {
        message(parse(full[..len].to_vec()));
    }
}

#[test]
fn corrupting_any_header_byte_never_panics() {
    let full = fixture("writer.gguf");
    let data_offset = GgufFile::from_bytes("full", full.clone()).unwrap().data_offset() as usize;
    let mut accepted = 0;
    for pos in 0..data_offset {
        let original = full[pos];
        for value in [0x00, 0xFF, original ^ 0x80, original.wrapping_add(1), original ^ 0x01] {
            if value == original {
                continue;
            }
            let mut bytes = full.clone();
            bytes[pos] = value;
            if let Ok(file) = GgufFile::from_bytes(NAME, bytes) {
                touch_everything(&file);
                accepted += 1;
            }
        }
    }
    // Flipping bits inside values (not lengths or types) leaves valid files; they must read too.
    assert!(accepted > 100, "only {accepted} corrupted files parsed");
}

/// Random multi-byte corruption (xorshift, fixed seed), favouring the values that break length fields.
#[test]
fn random_corruption_never_panics() {
    let full = fixture("writer.gguf");
    let header_len = GgufFile::from_bytes("full", full.clone()).unwrap().data_offset() as usize;
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    for _ in 0..3000 {
        let mut bytes = full.clone();
        for _ in 0..1 + next() % 6 {
            let pos = (next() % header_len as u64) as usize;
            match next() % 4 {
                0 => bytes[pos] = next() as u8,
                1 => {
                    let end = (pos + 8).min(bytes.len());
                    bytes[pos..end].fill(0xFF);
                }
                2 => {
                    let end = (pos + 8).min(bytes.len());
                    let v = (next() % 4096).to_le_bytes();
                    bytes[pos..end].copy_from_slice(&v[..end - pos]);
                }
                _ => bytes[pos] ^= 1 << (next() % 8),
            }
        }
        if next() % 8 == 0 {
            let keep = (next() % bytes.len() as u64) as usize;
            bytes.truncate(keep);
        }
        if let Ok(file) = GgufFile::from_bytes(NAME, bytes) {
            touch_everything(&file);
        }
    }
}

#[test]
fn magic_and_version() {
    let mut f = valid();
    f.magic = *b"GGML";
    assert_eq!(
        message(parse(f.build())),
        "hostile.gguf: not a GGUF file: it starts with [47, 47, 4d, 4c], not \"GGUF\""
    );

    for version in [0x0300_0000u32, 0x0200_0000] {
        let mut f = valid();
        f.version = version;
        let err = parse(f.build()).unwrap_err();
        assert!(matches!(err, GgufError::BigEndian { .. }), "{err}");
        assert!(err.to_string().contains("big-endian GGUF files are not supported"), "{err}");
    }
    for version in [0, 1, 4, 0xFFFF] {
        let mut f = valid();
        f.version = version;
        assert_eq!(
            message(parse(f.build())),
            format!("hostile.gguf: GGUF version {version} is not supported (only versions 2 and 3 are)")
        );
    }
    let mut f = valid();
    f.version = 2;
    assert_eq!(parse(f.build()).unwrap().version(), 2);
}

#[test]
fn empty_and_missing_files() {
    let dir = tempfile::tempdir().unwrap();
    let empty = dir.path().join("empty.gguf");
    std::fs::write(&empty, b"").unwrap();
    let err = GgufFile::open(&empty).unwrap_err();
    assert_eq!(
        err.to_string(),
        format!("{}: header (magic): truncated: 4 bytes needed at offset 0, but the file has 0 bytes", empty.display())
    );
    let missing = dir.path().join("missing.gguf");
    let err = GgufFile::open(&missing).unwrap_err();
    assert!(matches!(err, GgufError::Io { .. }));
    assert!(err.to_string().starts_with(&format!("{}: cannot read the file: ", missing.display())), "{err}");
}

#[test]
fn huge_counts_are_rejected_before_allocating() {
    let mut f = valid();
    f.n_tensors = Some(u64::MAX);
    let msg = message(parse(f.build()));
    assert!(msg.starts_with("hostile.gguf: header (tensor count): count 18446744073709551615 is impossible"), "{msg}");

    let mut f = valid();
    f.n_tensors = Some(1 << 40);
    assert!(matches!(parse(f.build()), Err(GgufError::CountTooLarge { .. })));

    let mut f = valid();
    f.n_kv = Some(u64::MAX / 3);
    let msg = message(parse(f.build()));
    assert!(msg.starts_with("hostile.gguf: header (metadata count): count"), "{msg}");

    // A count the file could hold, but the entries are not there: read until the data runs out.
    let mut f = valid();
    f.n_kv = Some(3);
    assert!(parse(f.build()).is_err());

    // Arrays of every kind with forged counts.
    for elem in [T_U8, T_U32, T_U64, T_STRING, T_ARRAY] {
        for count in [u64::MAX, 1 << 40, 100_000] {
            let mut raw = elem.to_le_bytes().to_vec();
            raw.extend_from_slice(&count.to_le_bytes());
            let f = valid().kv_raw(b"tokenizer.ggml.tokens", T_ARRAY, &raw);
            let msg = message(parse(f.build()));
            assert!(msg.starts_with("hostile.gguf: metadata key tokenizer.ggml.tokens: "), "{msg}");
        }
    }
    let mut raw = T_STRING.to_le_bytes().to_vec();
    raw.extend_from_slice(&(1u64 << 40).to_le_bytes());
    let err = parse(valid().kv_raw(b"k", T_ARRAY, &raw).build()).unwrap_err();
    assert!(matches!(err, GgufError::CountTooLarge { count, .. } if count == 1 << 40), "{err}");
}

#[test]
fn huge_string_lengths_are_rejected() {
    for len in [u64::MAX, 1 << 40, 10_000] {
        // As a value.
        let mut raw = len.to_le_bytes().to_vec();
        raw.extend_from_slice(b"short");
        let err = parse(valid().kv_raw(b"general.name", T_STRING, &raw).build()).unwrap_err();
        assert!(matches!(err, GgufError::StringTooLong { len: l, .. } if l == len), "{err}");
        assert!(err.to_string().starts_with("hostile.gguf: metadata key general.name: string length"), "{err}");
        // As a key.
        let mut bytes = Gguf::new().build();
        bytes[16..24].copy_from_slice(&1u64.to_le_bytes()); // one key
        bytes.truncate(24);
        bytes.extend_from_slice(&len.to_le_bytes());
        bytes.extend_from_slice(&[b'x'; 64]);
        let msg = message(parse(bytes));
        assert!(msg.starts_with("hostile.gguf: metadata key #0: string length"), "{msg}");
    }
    // As a tensor name.
    let mut bytes = valid().tensor("zzzz", &[], G_F32, 0).build();
    let at = find(&bytes, b"\x04\0\0\0\0\0\0\0zzzz", 24).expect("the name");
    bytes[at..at + 8].copy_from_slice(&(1u64 << 50).to_le_bytes());
    let msg = message(parse(bytes));
    assert!(msg.starts_with("hostile.gguf: tensor #2: string length 1125899906842624 exceeds"), "{msg}");
}

/// First index >= from where needle occurs.
fn find(haystack: &[u8], needle: &[u8], from: usize) -> Option<usize> {
    (from..haystack.len() - needle.len()).find(|&i| &haystack[i..i + needle.len()] == needle)
}

/// Where the data section of `f` starts: the builder pads the header, then appends the data.
fn data_offset(f: &Gguf) -> u64 {
    (f.build().len() - f.data.len()) as u64
}

#[test]
fn bad_value_types_and_deep_nesting() {
    let err = parse(valid().kv_raw(b"k", 13, &[0; 8]).build()).unwrap_err();
    assert_eq!(err.to_string(), "hostile.gguf: metadata key k: unknown value type id 13");
    let mut raw = 0xFFFF_FFFFu32.to_le_bytes().to_vec();
    raw.extend_from_slice(&0u64.to_le_bytes());
    let err = parse(valid().kv_raw(b"k", T_ARRAY, &raw).build()).unwrap_err();
    assert_eq!(err.to_string(), "hostile.gguf: metadata key k: unknown value type id 4294967295");

    // An array nested `depth` deep (1 = a plain array), innermost an empty u8 array.
    fn nested(depth: usize) -> Vec<u8> {
        let mut raw = Vec::new();
        for _ in 1..depth {
            raw.extend_from_slice(&T_ARRAY.to_le_bytes());
            raw.extend_from_slice(&1u64.to_le_bytes());
        }
        raw.extend_from_slice(&T_U8.to_le_bytes());
        raw.extend_from_slice(&0u64.to_le_bytes());
        raw
    }
    let file = parse(valid().kv_raw(b"deep", T_ARRAY, &nested(8)).build()).unwrap();
    assert_eq!(file.metadata().get_array("deep").unwrap().len(), 1);
    for depth in [9, 100_000] {
        let err = parse(valid().kv_raw(b"deep", T_ARRAY, &nested(depth)).build()).unwrap_err();
        assert_eq!(err.to_string(), "hostile.gguf: metadata key deep: arrays nested deeper than 8 levels");
    }
}

#[test]
fn keys_must_be_unique_non_empty_utf8() {
    let err = parse(valid().kv_u32("llama.block_count", 2).build()).unwrap_err();
    assert_eq!(err.to_string(), "hostile.gguf: metadata key llama.block_count appears twice");
    let err = parse(valid().kv_raw(b"", T_U32, &[0; 4]).build()).unwrap_err();
    assert_eq!(err.to_string(), "hostile.gguf: metadata key #2 is empty");
    let err = parse(valid().kv_raw(b"bad\xff", T_U32, &[0; 4]).build()).unwrap_err();
    assert_eq!(err.to_string(), "hostile.gguf: metadata key #2 is not valid UTF-8");
}

#[test]
fn tensor_names_must_be_unique_non_empty_utf8() {
    let f = valid().tensor("a", &[8], G_F32, 160);
    assert_eq!(message(parse(f.build())), "hostile.gguf: tensor a appears twice");
    let f = valid().tensor_raw(b"", &[8], G_F32, 160);
    assert_eq!(message(parse(f.build())), "hostile.gguf: tensor #2: name is empty");
    let f = valid().tensor_raw(b"\xc3\x28", &[8], G_F32, 160);
    assert_eq!(message(parse(f.build())), "hostile.gguf: tensor #2: name is not valid UTF-8");
}

#[test]
fn alignment_must_be_a_u32_power_of_two() {
    for (a, problem) in [(0, "0 is not a non-zero power of two"), (48, "48 is not a non-zero power of two")] {
        let msg = message(parse(valid().kv_u32("general.alignment", a).build()));
        assert_eq!(msg, format!("hostile.gguf: metadata key general.alignment: {problem}"));
    }
    let f = valid().kv_raw(b"general.alignment", T_U64, &64u64.to_le_bytes());
    assert_eq!(message(parse(f.build())), "hostile.gguf: metadata key general.alignment: must be a u32, found u64");

    // A custom alignment moves the data section and constrains offsets.
    let mut f = Gguf::new().kv_u32("general.alignment", 64).tensor("a", &[8], G_F32, 0).tensor("b", &[16], G_F16, 64);
    f.alignment = 64;
    let f = f.data(vec![1; 96]);
    let file = parse(f.build()).unwrap();
    assert_eq!(file.alignment(), 64);
    assert_eq!(file.data_offset() % 64, 0);
    assert_eq!(file.tensor("b").unwrap().file_offset(), file.data_offset() + 64);

    let mut f = Gguf::new().kv_u32("general.alignment", 64).tensor("a", &[8], G_F32, 0).tensor("b", &[8], G_F32, 32);
    f.alignment = 64;
    let f = f.data(vec![1; 64]);
    assert_eq!(
        message(parse(f.build())),
        "hostile.gguf: tensor b: data offset 32 is not a multiple of the alignment 64"
    );
}

#[test]
fn default_alignment_and_misaligned_offsets() {
    let file = parse(valid().build()).unwrap();
    assert_eq!(file.alignment(), 32);
    assert_eq!(file.data_offset() % 32, 0);
    let f = valid().tensor("c", &[4], G_F32, 100).data(vec![0; 200]);
    assert_eq!(
        message(parse(f.build())),
        "hostile.gguf: tensor c: data offset 100 is not a multiple of the alignment 32"
    );
}

#[test]
fn tensor_shapes_and_types() {
    let f = valid().tensor("c", &[1, 1, 1, 1, 1], G_F32, 128);
    assert_eq!(message(parse(f.build())), "hostile.gguf: tensor c: 5 dimensions, at most 4 are allowed");

    for dims in [&[u64::MAX, 2][..], &[1 << 63], &[1 << 32, 1 << 31], &[1 << 31, 1 << 31]] {
        let msg = message(parse(valid().tensor("c", dims, G_F32, 128).build()));
        assert_eq!(msg, format!("hostile.gguf: tensor c: shape {dims:?} is too large"));
    }
    // 2^62 f16 values: the shape is representable, the data is not in the file.
    let f = valid().tensor("c", &[1 << 31, 1 << 31], G_F16, 128);
    let (start, size) = (data_offset(&f) + 128, f.build().len() as u64);
    assert_eq!(
        message(parse(f.build())),
        format!(
            "hostile.gguf: tensor c: data [{start}, {}) lies past the end of the file (size {size})",
            start + (1 << 63)
        )
    );

    for id in [4, 5, 31, 38, 43, u32::MAX] {
        let msg = message(parse(valid().tensor("c", &[32], id, 128).build()));
        assert_eq!(msg, format!("hostile.gguf: tensor c: unknown ggml type id {id}"));
    }
    let msg = message(parse(valid().tensor("c", &[48, 2], G_Q8_0, 128).build()));
    assert_eq!(msg, "hostile.gguf: tensor c: row length 48 is not a multiple of the Q8_0 block size 32");
    let msg = message(parse(valid().tensor("c", &[], G_Q8_0, 128).build()));
    assert_eq!(msg, "hostile.gguf: tensor c: row length 1 is not a multiple of the Q8_0 block size 32");

    // Zero-dimensional and zero-element tensors are fine.
    let f = valid().tensor("scalar", &[], G_F32, 128).tensor("empty", &[0, 3], G_F32, 0).data(vec![0; 132]);
    let file = parse(f.build()).unwrap();
    assert_eq!(file.tensor("scalar").unwrap().n_elements(), 1);
    assert_eq!(file.tensor("scalar").unwrap().dequantize().unwrap().len(), 1);
    assert!(file.tensor("empty").unwrap().data().is_empty());
}

#[test]
fn tensor_data_must_lie_in_the_file() {
    let f = valid().tensor("blk.0.attn_q.weight", &[32, 4], G_Q8_0, 128);
    let (start, size) = (data_offset(&f) + 128, data_offset(&f) + 100);
    assert_eq!(
        message(parse(f.build())),
        format!(
            "hostile.gguf: tensor blk.0.attn_q.weight: data [{start}, {}) lies past the end of the file (size {size})",
            start + 136
        )
    );
    // An offset whose sum with the data offset overflows.
    let f = valid().tensor("c", &[8], G_F32, u64::MAX - 31);
    let err = parse(f.build()).unwrap_err();
    assert!(matches!(err, GgufError::TensorOutOfBounds { start: u64::MAX, .. }), "{err}");
    // The data section itself past the end (a file with a tensor but cut after the tensor table).
    let mut bytes = valid().tensor("c", &[0], G_F32, 0).build();
    bytes.truncate(bytes.len() - 100 - 1);
    assert!(parse(bytes).is_err());
}

#[test]
fn tensors_must_not_overlap() {
    // c starts inside b.
    let f = valid().tensor("c", &[8], G_F32, 64).data(vec![0; 160]);
    let (c0, b0) = (data_offset(&f) + 64, data_offset(&f) + 32);
    assert_eq!(
        message(parse(f.build())),
        format!("hostile.gguf: tensor c: data [{c0}, {}) overlaps tensor b at [{b0}, {})", c0 + 32, b0 + 68)
    );
    // The same range twice.
    let f = valid().tensor("c", &[8], G_F32, 0);
    assert!(matches!(parse(f.build()), Err(GgufError::OverlappingTensors { .. })));
    // A big tensor that swallows a later small one.
    let f = Gguf::new().tensor("big", &[64], G_F32, 0).tensor("small", &[4], G_F32, 128).data(vec![0; 256]);
    let msg = message(parse(f.build()));
    assert!(msg.contains("tensor small: data") && msg.contains("overlaps tensor big"), "{msg}");
    // Out of table order but disjoint is fine, and so are back-to-back tensors.
    let f = Gguf::new().tensor("second", &[8], G_F32, 32).tensor("first", &[8], G_F32, 0).data(vec![0; 64]);
    let file = parse(f.build()).unwrap();
    assert!(file.tensor("first").unwrap().file_offset() < file.tensor("second").unwrap().file_offset());
}

#[test]
fn files_without_tensors() {
    let bytes = Gguf::new().kv_str("general.architecture", "llama").build();
    let file = parse(bytes.clone()).unwrap();
    assert_eq!(file.tensors().len(), 0);
    // Without the padding after the metadata, too: nothing is read from the data section.
    let header_end = 24 + 8 + 20 + 4 + 8 + 5;
    assert!(header_end < bytes.len());
    let file = parse(bytes[..header_end].to_vec()).unwrap();
    assert_eq!(file.metadata().get_str("general.architecture").unwrap(), "llama");
}
