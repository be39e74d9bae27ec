//! (De)quantization against llama.cpp's gguf-py, bit for bit, on the random blocks in testdata/gguf/.

mod common;

use common::{f32s, fixture, fixture_json};
use tessera_gguf::{GgmlType, QuantError, dequantize, quantize};

fn ggml_type(name: &str) -> GgmlType {
    GgmlType::ALL.into_iter().find(|t| t.name() == name).unwrap_or_else(|| panic!("no type {name}"))
}

/// Every type the crate dequantizes has a fixture, and every fixture matches gguf-py to the bit.
#[test]
fn dequantize_matches_gguf_py_bit_for_bit() {
    let manifest = fixture_json("manifest.json");
    let cases = manifest["dequantize"].as_array().unwrap();
    let covered: Vec<GgmlType> = cases.iter().map(|c| ggml_type(c["type"].as_str().unwrap())).collect();
    for ty in GgmlType::ALL.into_iter().filter(|t| t.can_dequantize()) {
        assert!(covered.contains(&ty), "no dequantization fixture for {ty}");
    }

    for case in cases {
        let ty = ggml_type(case["type"].as_str().unwrap());
        let bytes = fixture(&format!("dequant_{ty}.bin"));
        let expected = f32s(&fixture(&format!("dequant_{ty}.f32")));
        assert_eq!(bytes.len() / ty.type_size() * ty.block_size(), expected.len(), "{ty}: fixture sizes");
        assert_eq!(expected.len() as u64, case["elements"].as_u64().unwrap());

        let mut out = vec![f32::NAN; expected.len()];
        dequantize(ty, &bytes, &mut out).unwrap();
        let mismatches: Vec<_> = (0..expected.len()).filter(|&i| out[i].to_bits() != expected[i].to_bits()).collect();
        assert!(
            mismatches.is_empty(),
            "{ty}: {} of {} values differ from gguf-py, first at {}: got {:e} ({:#010x}), want {:e} ({:#010x})",
            mismatches.len(),
            expected.len(),
            mismatches[0],
            out[mismatches[0]],
            out[mismatches[0]].to_bits(),
            expected[mismatches[0]],
            expected[mismatches[0]].to_bits(),
        );

        // The fixture is worth comparing against: many distinct values, most of them non-zero.
        let mut distinct: Vec<u32> = expected.iter().map(|v| v.to_bits()).collect();
        distinct.sort_unstable();
        distinct.dedup();
        assert!(distinct.len() >= expected.len() / 8, "{ty}: only {} distinct values", distinct.len());
        let non_zero = expected.iter().filter(|v| **v != 0.0).count();
        assert!(non_zero > expected.len() / 2, "{ty}: only {non_zero} non-zero values");

        // Block by block gives the same values as the whole buffer at once.
        let mut one = vec![0.0f32; ty.block_size()];
        for (block, want) in bytes.chunks_exact(ty.type_size()).zip(out.chunks_exact(ty.block_size())) {
            dequantize(ty, block, &mut one).unwrap();
            assert!(one.iter().zip(want).all(|(a, b)| a.to_bits() == b.to_bits()), "{ty}: block-wise differs");
        }
    }
}

/// Every type the crate quantizes has a fixture, and every fixture matches gguf-py byte for byte.
#[test]
fn quantize_matches_gguf_py_byte_for_byte() {
    let manifest = fixture_json("manifest.json");
    let cases = manifest["quantize"].as_array().unwrap();
    let covered: Vec<GgmlType> = cases.iter().map(|c| ggml_type(c["type"].as_str().unwrap())).collect();
    // gguf-py has no K-quant quantizer: Q4_K and Q6_K are checked against llama.cpp's own in
    // worker/tests/gguf_quantized.rs.
    let k_quants = [GgmlType::Q4_K, GgmlType::Q6_K];
    for ty in GgmlType::ALL.into_iter().filter(|t| t.can_quantize() && !k_quants.contains(t)) {
        assert!(covered.contains(&ty), "no quantization fixture for {ty}");
    }

    for case in cases {
        let ty = ggml_type(case["type"].as_str().unwrap());
        let input = f32s(&fixture(&format!("quant_{ty}.f32")));
        let expected = fixture(&format!("quant_{ty}.bin"));
        assert_eq!(expected.len() as u64, case["bytes"].as_u64().unwrap());

        // quantize appends: what was in the buffer stays.
        let mut out = vec![0xA5u8; 3];
        quantize(ty, &input, &mut out).unwrap();
        assert_eq!(&out[..3], &[0xA5; 3], "{ty}: quantize overwrote the buffer's start");
        let out = &out[3..];
        assert_eq!(out.len(), expected.len(), "{ty}: output length");
        if let Some(i) = (0..out.len()).find(|&i| out[i] != expected[i]) {
            let block = i / ty.type_size();
            panic!(
                "{ty}: byte {i} (block {block}, byte {} in the block) is {:#04x}, gguf-py wrote {:#04x}\n  got  {:02x?}\n  want {:02x?}",
                i % ty.type_size(),
                out[i],
                expected[i],
                &out[block * ty.type_size()..(block + 1) * ty.type_size()],
                &expected[block * ty.type_size()..(block + 1) * ty.type_size()],
            );
        }

        // Quantized blocks decode back near the input: within one quantization step of the block.
        if ty.block_size() > 1 {
            let mut back = vec![0.0f32; input.len()];
            dequantize(ty, out, &mut back).unwrap();
            for (b, (x, y)) in input.chunks_exact(32).zip(back.chunks_exact(32)).enumerate() {
                let amax = x.iter().fold(0.0f32, |m, v| m.max(v.abs()));
                let range = x.iter().fold(f32::MIN, |m, &v| m.max(v)) - x.iter().fold(f32::MAX, |m, &v| m.min(v));
                let step = match ty {
                    GgmlType::Q8_0 => amax / 127.0,
                    GgmlType::Q4_0 => amax / 8.0,
                    GgmlType::Q5_0 => amax / 16.0,
                    GgmlType::Q4_1 => range / 15.0,
                    GgmlType::Q5_1 => range / 31.0,
                    _ => unreachable!(),
                };
                let worst = x.iter().zip(y).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
                assert!(worst <= step * 1.01 + amax * 1e-3, "{ty} block {b}: error {worst} > step {step}");
            }
        }
    }
}

/// The type table agrees with gguf-py's GGML_QUANT_SIZES, except where gguf-py is known to differ from
/// ggml (Q8_1, whose scales became f16 in ggml but not in gguf-py's table).
#[test]
fn type_table_matches_gguf_py() {
    let manifest = fixture_json("manifest.json");
    let sizes = manifest["quant_sizes"].as_object().unwrap();
    for (name, entry) in sizes {
        let id = entry["id"].as_u64().unwrap() as u32;
        let ty = GgmlType::from_id(id).unwrap_or_else(|| panic!("gguf-py's {name} (id {id}) is unknown here"));
        assert_eq!(ty.name(), name);
        assert_eq!(ty.block_size() as u64, entry["block_size"].as_u64().unwrap(), "{name} block size");
        let py_size = entry["type_size"].as_u64().unwrap();
        if ty == GgmlType::Q8_1 {
            assert_eq!((ty.type_size(), py_size), (36, 40), "Q8_1: did gguf-py fix its size? update the doc");
        } else {
            assert_eq!(ty.type_size() as u64, py_size, "{name} type size");
        }
    }
    for ty in GgmlType::ALL {
        // Q2_0 is newer than gguf-py 0.19.
        assert!(sizes.contains_key(ty.name()) || ty == GgmlType::Q2_0, "{ty} is not in gguf-py's table");
    }
}

#[test]
fn unsupported_types_and_bad_lengths_are_errors() {
    let mut out = vec![0.0f32; 256];
    let err = dequantize(GgmlType::IQ2_XXS, &[0; 66], &mut out).unwrap_err();
    assert_eq!(err, QuantError::DequantizeUnsupported(GgmlType::IQ2_XXS));
    assert_eq!(err.to_string(), "dequantizing IQ2_XXS is not supported");
    for ty in [GgmlType::Q8_1, GgmlType::Q8_K, GgmlType::I32, GgmlType::F64, GgmlType::MXFP4, GgmlType::TQ2_0] {
        assert!(!ty.can_dequantize());
        assert!(matches!(dequantize(ty, &[], &mut []), Err(QuantError::DequantizeUnsupported(t)) if t == ty));
    }

    let err = quantize(GgmlType::Q3_K, &[0.0; 256], &mut Vec::new()).unwrap_err();
    assert_eq!(err.to_string(), "quantizing to Q3_K is not supported");

    let err = dequantize(GgmlType::Q4_K, &[0; 143], &mut out).unwrap_err();
    assert_eq!(err.to_string(), "Q4_K: 143 bytes is not a whole number of 144-byte blocks");
    let err = dequantize(GgmlType::Q4_K, &[0; 144], &mut out[..255]).unwrap_err();
    assert_eq!(err.to_string(), "Q4_K: the input holds 256 values but the output has room for 255");
    let err = quantize(GgmlType::Q8_0, &[1.0; 31], &mut Vec::new()).unwrap_err();
    assert_eq!(err.to_string(), "Q8_0: 31 values is not a whole number of 32-value blocks");

    // Empty input is zero blocks, not an error.
    dequantize(GgmlType::Q6_K, &[], &mut []).unwrap();
    let mut bytes = Vec::new();
    quantize(GgmlType::Q4_0, &[], &mut bytes).unwrap();
    assert!(bytes.is_empty());
}

#[test]
fn f16_special_values_decode_exactly() {
    let halves: [u16; 6] = [0x7c00, 0xfc00, 0x0001, 0x8000, 0x7bff, 0x3c00];
    let bytes: Vec<u8> = halves.iter().flat_map(|h| h.to_le_bytes()).collect();
    let mut out = [0.0f32; 6];
    dequantize(GgmlType::F16, &bytes, &mut out).unwrap();
    assert_eq!(out[0], f32::INFINITY);
    assert_eq!(out[1], f32::NEG_INFINITY);
    assert_eq!(out[2], 2f32.powi(-24));
    assert_eq!(out[3].to_bits(), 0x8000_0000);
    assert_eq!(out[4], 65504.0);
    assert_eq!(out[5], 1.0);
}
