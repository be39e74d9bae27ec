"""What the scripts that write llama GGUF files and quantize them with llama.cpp share
(`make_quant_fixtures.py`, `bench_gguf.py`): the hyperparameter metadata of a llama model, and
llama.cpp's own quantizer through llama-cpp-python."""

import ctypes

import gguf

# llama.cpp's `llama_ftype` values for the files we make.
FTYPES = {"q8_0": 7, "q4_0": 2, "q4_k_m": 15}


def add_llama_hparams(w, *, vocab, ctx, hidden, inter, layers, heads, kv_heads):
    """Writes a llama model's shape to GGUF writer `w`, as F16 weights with RoPE over whole heads."""
    w.add_vocab_size(vocab)
    w.add_context_length(ctx)
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(inter)
    w.add_block_count(layers)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_rope_dimension_count(hidden // heads)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16)


def quantize(src, dst, ftype):
    """llama.cpp's quantizer (2 threads) from GGUF `src` to `dst` in `ftype` (a value of FTYPES)."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = 2
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    assert rc == 0, f"llama_model_quantize {dst}: {rc}"
