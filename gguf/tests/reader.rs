//! Reading testdata/gguf/writer.gguf, written by gguf-py's GGUFWriter, and checking every metadata value
//! and tensor against writer.json, which describes what the writer was given.

mod common;

use common::{fixture, fixture_dir, fixture_json, unhex};
use serde_json::Value as Json;
use tessera_gguf::{Array, GgmlType, GgufError, GgufFile, Metadata, Value, ValueType};

fn open_fixture() -> (GgufFile, Json) {
    let file = GgufFile::open(fixture_dir().join("writer.gguf")).expect("writer.gguf opens");
    (file, fixture_json("writer.json"))
}

/// `value` is what `json` (as make_gguf_fixtures.py's `describe` wrote it) says; `at` names it for messages.
fn check_value(value: &Value, json: &Json, at: &str) {
    let ty = json["type"].as_str().unwrap();
    match (ty, value) {
        ("array", Value::Array(array)) => check_array(array, json, at),
        ("float32", Value::F32(v)) => assert_eq!(v.to_bits() as u64, json["bits"].as_u64().unwrap(), "{at}"),
        ("float64", Value::F64(v)) => assert_eq!(v.to_bits(), json["bits"].as_u64().unwrap(), "{at}"),
        ("string", Value::String(s)) => assert_eq!(s.as_bytes(), unhex(json["hex"].as_str().unwrap()), "{at}"),
        ("bool", Value::Bool(b)) => assert_eq!(*b, json["value"].as_bool().unwrap(), "{at}"),
        ("uint64", Value::U64(v)) => assert_eq!(*v, json["value"].as_u64().unwrap(), "{at}"),
        ("int64", Value::I64(v)) => assert_eq!(*v, json["value"].as_i64().unwrap(), "{at}"),
        ("uint8" | "int8" | "uint16" | "int16" | "uint32" | "int32", v) => {
            let expected_type = match ty {
                "uint8" => ValueType::U8,
                "int8" => ValueType::I8,
                "uint16" => ValueType::U16,
                "int16" => ValueType::I16,
                "uint32" => ValueType::U32,
                _ => ValueType::I32,
            };
            assert_eq!(v.value_type(), expected_type, "{at}: type");
            assert_eq!(v.as_int(), Some(json["value"].as_i64().unwrap() as i128), "{at}");
        }
        (ty, v) => panic!("{at}: expected {ty}, read {v:?}"),
    }
}

fn check_array(array: &Array, json: &Json, at: &str) {
    let items = json["items"].as_array().unwrap();
    let elem = match json["elem"].as_str().unwrap() {
        "uint8" => ValueType::U8,
        "int8" => ValueType::I8,
        "uint16" => ValueType::U16,
        "int16" => ValueType::I16,
        "uint32" => ValueType::U32,
        "int32" => ValueType::I32,
        "float32" => ValueType::F32,
        "bool" => ValueType::Bool,
        "string" => ValueType::String,
        "array" => ValueType::Array,
        "uint64" => ValueType::U64,
        "int64" => ValueType::I64,
        "float64" => ValueType::F64,
        other => panic!("{at}: element type {other}"),
    };
    assert_eq!(array.elem_type(), elem, "{at}: element type");
    assert_eq!(array.len(), items.len(), "{at}: length");
    for (i, item) in items.iter().enumerate() {
        check_value(&array.get(i).unwrap(), item, &format!("{at}[{i}]"));
    }
    assert!(array.get(items.len()).is_none());
}

#[test]
fn header_matches_the_writer() {
    let (file, json) = open_fixture();
    assert_eq!(file.version(), json["version"].as_u64().unwrap() as u32);
    assert_eq!(file.alignment(), json["alignment"].as_u64().unwrap());
    // GGUFReader's idea of where the data section starts.
    assert_eq!(file.data_offset(), json["data_offset"].as_u64().unwrap());
    assert_eq!(file.file_size(), json["file_size"].as_u64().unwrap());
    assert_eq!(file.path(), fixture_dir().join("writer.gguf"));
}

#[test]
fn every_metadata_value_matches_the_writer() {
    let (file, json) = open_fixture();
    let md = file.metadata();
    let expected = json["metadata"].as_array().unwrap();
    assert_eq!(md.len(), expected.len());
    // In file order.
    let keys: Vec<&str> = md.keys().collect();
    let want: Vec<&str> = expected.iter().map(|e| e["key"].as_str().unwrap()).collect();
    assert_eq!(keys, want);
    for entry in expected {
        let key = entry["key"].as_str().unwrap();
        let value = md.get(key).unwrap_or_else(|| panic!("{key} missing"));
        check_value(value, entry, key);
    }
    // Every value type occurs, top-level and as array elements.
    for ty in 0..13 {
        let ty = ValueType::from_id(ty).unwrap();
        assert!(md.iter().any(|(_, v)| v.value_type() == ty), "no top-level {ty}");
        if ty != ValueType::Array {
            let mut arrays = md.iter().filter_map(|(_, v)| v.as_array());
            assert!(arrays.any(|a| a.elem_type() == ty), "no array of {ty}");
        }
    }
}

#[test]
fn typed_getters() {
    let (file, _) = open_fixture();
    let md = file.metadata();
    assert_eq!(md.get_str("general.architecture").unwrap(), "tessera-test");
    assert_eq!(md.get_u32("general.alignment").unwrap(), 64);
    assert_eq!(md.get_u32("test.u32").unwrap(), 4_000_000_000);
    assert_eq!(md.get_u8("test.u8").unwrap(), 200);
    // Integer widths are accepted when the value fits.
    assert_eq!(md.get_u32("test.small_i32").unwrap(), 7);
    assert_eq!(md.get_u32("test.small_u64").unwrap(), 4096);
    assert_eq!(md.get_usize("test.small_u64").unwrap(), 4096);
    assert_eq!(md.get_i32("test.u8").unwrap(), 200);
    assert_eq!(md.get_i64("test.i16").unwrap(), -30000);
    assert_eq!(md.get_u64("test.u64").unwrap(), (1 << 63) + 5);
    assert_eq!(md.get_i64("test.i64").unwrap(), -(1 << 62) - 3);
    assert_eq!(md.get_f32("test.f32").unwrap(), 0.1f32);
    assert_eq!(md.get_f64("test.f32").unwrap(), f64::from(0.1f32));
    assert_eq!(md.get_f64("test.f64").unwrap(), 1.0 / 3.0);
    assert!(md.get_bool("test.bool_true").unwrap());
    assert!(!md.get_bool("test.bool_false").unwrap());
    assert_eq!(md.get_str("test.string").unwrap(), "h\u{e9}llo, w\u{f6}rld \u{2713} \u{1f600}");
    assert_eq!(md.get_bytes("test.not_utf8").unwrap(), b"ok\xff\xfe");

    let tokens = md.get_str_array("tokenizer.ggml.tokens").unwrap();
    assert_eq!(tokens.len(), 42);
    assert_eq!((tokens[0], tokens[39], tokens[40], tokens[41]), ("tok0", "tok39", "\u{2581}the", "<0x0A>"));
    let scores = md.get_f32_array("tokenizer.ggml.scores").unwrap();
    assert_eq!(scores.len(), 42);
    assert_eq!(scores[5], -1.25);
    // gguf-py writes Python ints in arrays as i32.
    assert_eq!(md.get_array("tokenizer.ggml.token_type").unwrap().elem_type(), ValueType::I32);
    let types = md.get_i32_array("tokenizer.ggml.token_type").unwrap();
    assert_eq!((types.len(), types[0], types[40], types[41]), (42, 1, 2, 6));
    assert_eq!(md.get_u32_array("tokenizer.ggml.token_type").unwrap()[41], 6);
    assert_eq!(md.get_i32_array("test.arr.u8").unwrap(), vec![0, 1, 255]);
    assert_eq!(md.get_str_array("test.arr.string").unwrap(), vec!["", "a", "\u{fc}ml\u{e4}ut", "tab\tand\nnewline"]);
    assert_eq!(md.get_bytes_array("test.arr.strings_not_utf8").unwrap(), vec![&b"fine"[..], &b"\xc3\x28"[..]]);
    let Array::Array(nested) = md.get_array("test.arr.nested_mixed").unwrap() else { panic!("not nested") };
    assert_eq!(
        nested.iter().map(Array::elem_type).collect::<Vec<_>>(),
        [ValueType::I32, ValueType::String, ValueType::Array]
    );

    assert_eq!(md.optional("test.u32", Metadata::get_u32).unwrap(), Some(4_000_000_000));
    assert_eq!(md.optional("no.such.key", Metadata::get_u32).unwrap(), None);
    assert_eq!(
        md.optional("test.string", Metadata::get_str).unwrap(),
        Some("h\u{e9}llo, w\u{f6}rld \u{2713} \u{1f600}")
    );
    assert!(md.optional("test.string", Metadata::get_u32).is_err());
}

#[test]
fn getter_errors_name_the_file_and_key() {
    let (file, _) = open_fixture();
    let md = file.metadata();
    let path = fixture_dir().join("writer.gguf").display().to_string();
    let msg = |r: Result<_, GgufError>| -> String {
        let e = r.map(|_: ()| ()).unwrap_err().to_string();
        assert!(e.starts_with(&format!("{path}: ")), "{e}");
        e[path.len() + 2..].to_string()
    };
    assert_eq!(msg(md.get_u32("no.such.key").map(drop)), "metadata key no.such.key is missing");
    assert_eq!(msg(md.get_str("test.u32").map(drop)), "metadata key test.u32: expected string, found u32");
    assert_eq!(msg(md.get_u32("test.string").map(drop)), "metadata key test.string: expected an integer, found string");
    assert_eq!(msg(md.get_u32("test.i32").map(drop)), "metadata key test.i32: value -2000000000 does not fit in u32");
    assert_eq!(
        msg(md.get_i64("test.u64").map(drop)),
        "metadata key test.u64: value 9223372036854775813 does not fit in i64"
    );
    assert_eq!(msg(md.get_f32("test.f64").map(drop)), "metadata key test.f64: expected f32, found f64");
    assert_eq!(msg(md.get_bool("test.u8").map(drop)), "metadata key test.u8: expected bool, found u8");
    assert_eq!(msg(md.get_str("test.not_utf8").map(drop)), "metadata key test.not_utf8: string is not valid UTF-8");
    assert_eq!(
        msg(md.get_str_array("test.arr.strings_not_utf8").map(drop)),
        "metadata key test.arr.strings_not_utf8: string (element 1) is not valid UTF-8"
    );
    assert_eq!(
        msg(md.get_f32_array("test.arr.string").map(drop)),
        "metadata key test.arr.string: expected array of f32, found array of string"
    );
    assert_eq!(
        msg(md.get_i32_array("test.arr.u32").map(drop)),
        "metadata key test.arr.u32: value 4294967295 (element 2) does not fit in i32"
    );
    assert_eq!(
        msg(md.get_u32_array("test.arr.i32").map(drop)),
        "metadata key test.arr.i32: value -5 (element 0) does not fit in u32"
    );
    assert_eq!(
        msg(md.get_i32_array("test.arr.f64").map(drop)),
        "metadata key test.arr.f64: expected array of an integer type, found array of f64"
    );
    assert_eq!(msg(md.get_array("test.u8").map(drop)), "metadata key test.u8: expected array, found u8");
    assert_eq!(
        msg(md.get_str("test.arr.nested_i32").map(drop)),
        "metadata key test.arr.nested_i32: expected string, found array of array"
    );
}

#[test]
fn every_tensor_matches_the_writer() {
    let (file, json) = open_fixture();
    let expected = json["tensors"].as_array().unwrap();
    assert_eq!(file.tensors().len(), expected.len());
    for (tensor, want) in file.tensors().zip(expected) {
        let name = want["name"].as_str().unwrap();
        assert_eq!(tensor.name(), name);
        let shape: Vec<u64> = want["shape"].as_array().unwrap().iter().map(|d| d.as_u64().unwrap()).collect();
        assert_eq!(tensor.shape(), shape, "{name}: shape (GGUF order)");
        assert_eq!(tensor.n_elements(), shape.iter().product::<u64>());
        assert_eq!(tensor.ggml_type().id() as u64, want["type_id"].as_u64().unwrap(), "{name}: type");
        assert_eq!(tensor.ggml_type().name(), want["type"].as_str().unwrap());
        assert_eq!(tensor.byte_size() as u64, want["n_bytes"].as_u64().unwrap(), "{name}: bytes");
        assert_eq!(tensor.file_offset(), want["file_offset"].as_u64().unwrap(), "{name}: offset");
        assert_eq!(tensor.offset() % file.alignment(), 0);
        assert_eq!(tensor.data(), unhex(want["hex"].as_str().unwrap()), "{name}: data");

        match want.get("f32_bits") {
            Some(bits) => {
                let values = tensor.dequantize().unwrap();
                let bits: Vec<u32> = bits.as_array().unwrap().iter().map(|b| b.as_u64().unwrap() as u32).collect();
                assert_eq!(values.iter().map(|v| v.to_bits()).collect::<Vec<_>>(), bits, "{name}: values");
            }
            None => {
                assert_eq!(tensor.ggml_type(), GgmlType::I32);
                let err = tensor.dequantize().unwrap_err();
                let path = fixture_dir().join("writer.gguf");
                assert_eq!(
                    err.to_string(),
                    format!("{}: tensor {name}: dequantizing I32 is not supported", path.display())
                );
            }
        }
        // Lookup by name gives the same tensor.
        assert_eq!(file.tensor(name).unwrap().info(), tensor.info());
    }
    assert!(file.tensor("no.such.tensor").is_none());
    let types: Vec<GgmlType> = file.tensors().map(|t| t.ggml_type()).collect();
    for ty in [GgmlType::Q8_0, GgmlType::Q4_K, GgmlType::Q6_K, GgmlType::F32, GgmlType::F16, GgmlType::BF16] {
        assert!(types.contains(&ty), "no {ty} tensor in the fixture");
    }
    assert!(file.tensors().any(|t| t.shape().len() == 4));
}

#[test]
fn from_bytes_reads_the_same_file() {
    let (file, _) = open_fixture();
    let mem = GgufFile::from_bytes("in-memory.gguf", fixture("writer.gguf")).unwrap();
    assert_eq!(mem.path().to_str(), Some("in-memory.gguf"));
    assert_eq!(mem.metadata().len(), file.metadata().len());
    assert!(mem.metadata().iter().zip(file.metadata().iter()).all(|(a, b)| a == b));
    assert_eq!(mem.tensor_infos(), file.tensor_infos());
    assert!(mem.tensors().zip(file.tensors()).all(|(a, b)| a.data() == b.data()));
}

/// Releasing a tensor's pages (after a loader copied it) changes nothing a reader sees: the bytes are read
/// from the file again, for it and for its neighbours.
#[test]
fn released_tensors_read_the_same_bytes_again() {
    let (file, _) = open_fixture();
    let before: Vec<Vec<u8>> = file.tensors().map(|t| t.data().to_vec()).collect();
    assert!(before.iter().any(|b| b.iter().any(|&x| x != 0)), "the fixture's tensors are all zeros");
    for t in file.tensors() {
        file.release(&t);
    }
    let after: Vec<Vec<u8>> = file.tensors().map(|t| t.data().to_vec()).collect();
    assert_eq!(before, after);
}
