#!/usr/bin/env python3
"""Writes the reference fixtures that `gguf/tests/` compares tessera-gguf against.

Everything is produced by llama.cpp's own Python package, PyPI `gguf` (gguf-py), with numpy and a fixed
seed, so the output is reproducible:

- `dequant_<TYPE>.bin` / `dequant_<TYPE>.f32`: a few blocks of random bytes of every type that
  `gguf.quants.dequantize` handles and tessera-gguf dequantizes, and the little-endian f32 values that
  `gguf.quants.dequantize` turns them into. The f16 scale fields (d, dmin, m) are replaced by random
  *finite* f16 values (subnormals and both zeros included), so no block decodes to NaN or infinity; F16
  tensors are random finite halves, BF16 and F32 are random bits (NaNs included, they are bit operations).
- `quant_<TYPE>.f32` / `quant_<TYPE>.bin`: random f32 rows (blocks of very different magnitudes, plus an
  all-zero block, a block with one non-zero value and a block whose largest magnitude is negative) and the
  bytes `gguf.quants.quantize` turns them into.
- `writer.gguf` / `writer.json`: one small GGUF v3 file written by `gguf.GGUFWriter` with a metadata key of
  every GGUF value type, arrays of every element type (strings, nested arrays and non-UTF-8 strings
  included), a custom `general.alignment`, and tensors of several types and ranks; the JSON describes what
  the file contains (values with their GGUF types, floats as bit patterns; tensors with shape, type, data
  offset as gguf's own GGUFReader sees it, data bytes and, where dequantizable, the dequantized values).
- `manifest.json`: the list of the above with element and block counts.

How to run (from the repository root; target/ is git-ignored):

    python3 -m venv target/gguf-venv
    target/gguf-venv/bin/pip install gguf numpy
    target/gguf-venv/bin/python scripts/make_gguf_fixtures.py

It rewrites testdata/gguf/ and prints the gguf and numpy versions it used (recorded in manifest.json too).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

import gguf
from gguf import GGMLQuantizationType as T
from gguf import GGUFValueType as V
from gguf.quants import dequantize, quantize

SEED = 20240611
OUT = Path(__file__).resolve().parent.parent / "testdata" / "gguf"

# Byte offsets of the f16 scale fields inside one block, from ggml-common.h.
F16_FIELDS: dict[T, tuple[int, ...]] = {
    T.Q4_0: (0,),
    T.Q4_1: (0, 2),
    T.Q5_0: (0,),
    T.Q5_1: (0, 2),
    T.Q8_0: (0,),
    T.Q2_K: (80, 82),
    T.Q3_K: (108,),
    T.Q4_K: (0, 2),
    T.Q5_K: (0, 2),
    T.Q6_K: (208,),
}

# Number of blocks per dequantization fixture (elements for the float types).
DEQUANT_BLOCKS: dict[T, int] = {
    T.F32: 64,
    T.F16: 64,
    T.BF16: 64,
    T.Q4_0: 8,
    T.Q4_1: 8,
    T.Q5_0: 8,
    T.Q5_1: 8,
    T.Q8_0: 8,
    T.Q2_K: 4,
    T.Q3_K: 4,
    T.Q4_K: 4,
    T.Q5_K: 4,
    T.Q6_K: 4,
}

QUANT_TYPES = [T.F32, T.F16, T.BF16, T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1]
QUANT_BLOCKS = 16  # blocks of 32 values


def finite_f16(rng: np.random.Generator, n: int) -> np.ndarray:
    """n random f16 bit patterns, every one finite (exponent field not all ones)."""
    bits = rng.integers(0, 1 << 16, size=n, dtype=np.uint16)
    exp_all_ones = (bits & 0x7C00) == 0x7C00
    while exp_all_ones.any():
        bits[exp_all_ones] = rng.integers(0, 1 << 16, size=int(exp_all_ones.sum()), dtype=np.uint16)
        exp_all_ones = (bits & 0x7C00) == 0x7C00
    return bits


def random_blocks(rng: np.random.Generator, qtype: T, n_blocks: int) -> np.ndarray:
    """Random bytes for n_blocks blocks of qtype, shaped (1, n_blocks * type_size), f16 fields finite."""
    block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
    if qtype == T.F16:
        return finite_f16(rng, n_blocks).view(np.uint8).reshape(1, -1)
    raw = rng.integers(0, 256, size=(n_blocks, type_size), dtype=np.uint8)
    for off in F16_FIELDS.get(qtype, ()):
        raw[:, off : off + 2] = finite_f16(rng, n_blocks).view(np.uint8).reshape(n_blocks, 2)
    return raw.reshape(1, -1)


def quant_input(rng: np.random.Generator) -> np.ndarray:
    """QUANT_BLOCKS blocks of 32 f32 values with very different magnitudes, plus edge-case blocks."""
    x = rng.standard_normal((QUANT_BLOCKS, 32)).astype(np.float32)
    scales = (10.0 ** rng.uniform(-4, 4, size=(QUANT_BLOCKS, 1))).astype(np.float32)
    x = (x * scales).astype(np.float32)
    x[0] = 0.0  # all-zero block: d = 0 path
    x[1] = 0.0
    x[1, 7] = -3.5  # one non-zero value, and it is negative
    x[2] = np.abs(x[2])
    x[2, 5] = -2.0 * x[2].max()  # largest magnitude is negative (sign of d in Q4_0/Q5_0)
    x[3] = rng.uniform(-1, 1, size=32).astype(np.float32) + np.float32(100.0)  # offset far from zero (Q4_1/Q5_1)
    return x.reshape(1, -1)


def f32_bits(value: float) -> int:
    return int(np.array([value], dtype=np.float32).view(np.uint32)[0])


def f64_bits(value: float) -> int:
    return int(np.array([value], dtype=np.float64).view(np.uint64)[0])


def describe(value, vtype: V, sub_type: V | None = None) -> dict:
    """JSON description of a metadata value as the writer encodes it (floats as bit patterns)."""
    if vtype == V.ARRAY:
        if sub_type is None:
            if isinstance(value, (bytes, bytearray)):
                sub_type = V.UINT8
            else:
                sub_type = V.get_type(value[0])
        return {"type": "array", "elem": sub_type.name.lower(), "items": [describe(v, sub_type) for v in value]}
    if vtype == V.FLOAT32:
        return {"type": "float32", "bits": f32_bits(value)}
    if vtype == V.FLOAT64:
        return {"type": "float64", "bits": f64_bits(value)}
    if vtype == V.STRING:
        raw = value.encode("utf-8") if isinstance(value, str) else bytes(value)
        return {"type": "string", "hex": raw.hex()}
    if vtype == V.BOOL:
        return {"type": "bool", "value": bool(value)}
    return {"type": vtype.name.lower(), "value": int(value)}


def write_gguf(rng: np.random.Generator) -> dict:
    path = OUT / "writer.gguf"
    writer = gguf.GGUFWriter(path, arch="tessera-test")
    writer.add_custom_alignment(64)

    # (key, value, type, array element type)
    kvs: list[tuple[str, object, V, V | None]] = [
        ("general.name", "tiny fixture", V.STRING, None),
        ("test.u8", 200, V.UINT8, None),
        ("test.i8", -100, V.INT8, None),
        ("test.u16", 60000, V.UINT16, None),
        ("test.i16", -30000, V.INT16, None),
        ("test.u32", 4_000_000_000, V.UINT32, None),
        ("test.i32", -2_000_000_000, V.INT32, None),
        ("test.small_i32", 7, V.INT32, None),
        ("test.small_u64", 4096, V.UINT64, None),
        ("test.f32", 0.1, V.FLOAT32, None),
        ("test.bool_true", True, V.BOOL, None),
        ("test.bool_false", False, V.BOOL, None),
        ("test.string", "h\u00e9llo, w\u00f6rld \u2713 \U0001f600", V.STRING, None),
        ("test.not_utf8", b"ok\xff\xfe", V.STRING, None),
        ("test.u64", 2**63 + 5, V.UINT64, None),
        ("test.i64", -(2**62) - 3, V.INT64, None),
        ("test.f64", 1.0 / 3.0, V.FLOAT64, None),
        ("test.arr.u8", [0, 1, 255], V.ARRAY, V.UINT8),
        ("test.arr.i8", [-128, 0, 127], V.ARRAY, V.INT8),
        ("test.arr.u16", [0, 65535], V.ARRAY, V.UINT16),
        ("test.arr.i16", [-32768, 32767], V.ARRAY, V.INT16),
        ("test.arr.u32", [0, 1, 4_294_967_295], V.ARRAY, V.UINT32),
        ("test.arr.i32", [-5, 0, 2_147_483_647], V.ARRAY, V.INT32),
        ("test.arr.f32", [float(v) for v in rng.standard_normal(6).astype(np.float32)], V.ARRAY, V.FLOAT32),
        ("test.arr.bool", [True, False, True], V.ARRAY, V.BOOL),
        ("test.arr.string", ["", "a", "\u00fcml\u00e4ut", "tab\tand\nnewline"], V.ARRAY, V.STRING),
        ("test.arr.strings_not_utf8", ["fine", b"\xc3\x28"], V.ARRAY, V.STRING),
        ("test.arr.u64", [0, 2**64 - 1], V.ARRAY, V.UINT64),
        ("test.arr.i64", [-(2**63), 2**63 - 1], V.ARRAY, V.INT64),
        ("test.arr.f64", [0.5, -1e300, 2.0**-1074], V.ARRAY, V.FLOAT64),
        ("test.arr.nested_i32", [[1, 2, 3], [4, 5]], V.ARRAY, None),
        ("test.arr.nested_mixed", [[1, 2], ["x", "yz"], [[3], [4, 5]]], V.ARRAY, None),
        ("tokenizer.ggml.tokens", [f"tok{i}" for i in range(40)] + ["\u2581the", "<0x0A>"], V.ARRAY, V.STRING),
        ("tokenizer.ggml.scores", [float(-i) / 4 for i in range(42)], V.ARRAY, V.FLOAT32),
        ("tokenizer.ggml.token_type", [1] * 40 + [2, 6], V.ARRAY, None),  # python ints: written as INT32
    ]
    for key, value, vtype, sub in kvs:
        writer.add_key_value(key, value, vtype, sub_type=sub)

    tensors = []

    def add(name: str, ne: list[int], qtype: T, raw: np.ndarray) -> None:
        """raw: uint8 bytes of the tensor in ggml layout; ne: GGUF shape (ne[0] fastest)."""
        np_shape = list(reversed(ne))
        block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
        byte_shape = np_shape[:-1] + [np_shape[-1] // block_size * type_size]
        data = np.ascontiguousarray(raw.reshape(byte_shape))
        writer.add_tensor(name, data, raw_dtype=qtype)
        entry = {"name": name, "shape": ne, "type": qtype.name, "type_id": int(qtype), "hex": data.tobytes().hex()}
        try:
            values = dequantize(data, qtype).astype(np.float32).reshape(-1)
            entry["f32_bits"] = [int(b) for b in values.view(np.uint32)]
        except NotImplementedError:
            pass
        tensors.append(entry)

    def blocks(qtype: T, n_elements: int) -> np.ndarray:
        block_size, _ = gguf.GGML_QUANT_SIZES[qtype]
        return random_blocks(rng, qtype, n_elements // block_size)

    add("token_embd.weight", [64, 3], T.Q8_0, blocks(T.Q8_0, 192))
    add("blk.0.attn_q.weight", [256, 2], T.Q4_K, blocks(T.Q4_K, 512))
    add("blk.0.ffn_down.weight", [256, 1], T.Q6_K, blocks(T.Q6_K, 256))
    add("blk.0.attn_norm.weight", [5], T.F32, rng.standard_normal(5).astype(np.float32).view(np.uint8))
    add("blk.0.f16.weight", [7, 3], T.F16, finite_f16(rng, 21).view(np.uint8))
    add("blk.0.bf16.weight", [4, 3, 2], T.BF16, rng.integers(0, 1 << 16, 24, dtype=np.uint16).view(np.uint8))
    add("blk.0.four_d", [2, 3, 1, 2], T.F32, rng.standard_normal(12).astype(np.float32).view(np.uint8))
    add("rope_freqs.i32", [3], T.I32, np.array([1, -2, 3], dtype=np.int32).view(np.uint8))
    add("blk.0.q5_1", [32, 2], T.Q5_1, blocks(T.Q5_1, 64))

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

    # What gguf's own reader sees: the data section start and each tensor's absolute data offset.
    reader = gguf.GGUFReader(path)
    by_name = {t.name: t for t in reader.tensors}
    for entry in tensors:
        rt = by_name[entry["name"]]
        entry["file_offset"] = int(rt.data_offset)
        entry["n_bytes"] = int(rt.n_bytes)

    metadata = [{"key": "general.architecture", **describe("tessera-test", V.STRING)}]
    metadata.append({"key": "general.alignment", **describe(64, V.UINT32)})
    metadata += [{"key": key, **describe(value, vtype, sub)} for key, value, vtype, sub in kvs]
    return {
        "file": "writer.gguf",
        "version": 3,
        "alignment": 64,
        "data_offset": int(reader.data_offset),
        "file_size": path.stat().st_size,
        "metadata": metadata,
        "tensors": tensors,
    }


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(SEED)
    manifest: dict = {
        "seed": SEED,
        "gguf_version": getattr(gguf, "__version__", None) or _dist_version("gguf"),
        "numpy_version": np.__version__,
        "dequantize": [],
        "quantize": [],
    }

    for qtype, n_blocks in DEQUANT_BLOCKS.items():
        block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
        raw = random_blocks(rng, qtype, n_blocks)
        values = dequantize(raw, qtype).astype(np.float32, copy=False).reshape(-1)
        assert values.size == n_blocks * block_size
        (OUT / f"dequant_{qtype.name}.bin").write_bytes(raw.tobytes())
        (OUT / f"dequant_{qtype.name}.f32").write_bytes(values.astype("<f4").tobytes())
        manifest["dequantize"].append({"type": qtype.name, "blocks": n_blocks, "elements": int(values.size)})

    for qtype in QUANT_TYPES:
        x = quant_input(rng)
        q = np.asarray(quantize(x, qtype))
        out = q.view(np.uint8).reshape(-1)
        (OUT / f"quant_{qtype.name}.f32").write_bytes(x.astype("<f4").tobytes())
        (OUT / f"quant_{qtype.name}.bin").write_bytes(out.tobytes())
        manifest["quantize"].append({"type": qtype.name, "elements": int(x.size), "bytes": int(out.size)})

    # The block and type sizes gguf-py knows, to compare with tessera-gguf's table.
    manifest["quant_sizes"] = {
        t.name: {"id": int(t), "block_size": bs, "type_size": ts} for t, (bs, ts) in gguf.GGML_QUANT_SIZES.items()
    }

    description = write_gguf(rng)
    (OUT / "writer.json").write_text(json.dumps(description, indent=1) + "\n")
    (OUT / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")

    total = sum(p.stat().st_size for p in OUT.iterdir())
    print(f"gguf {manifest['gguf_version']}, numpy {np.__version__}: wrote {OUT} ({total} bytes)", file=sys.stderr)


def _dist_version(name: str) -> str:
    from importlib.metadata import version

    return version(name)


if __name__ == "__main__":
    main()
