//! A bad model directory is a clear error naming the file and field or tensor, never a panic.

mod common;

use std::{collections::HashMap, path::Path};

use safetensors::{Dtype, SafeTensors, tensor::TensorView};
use tessera_worker::{Model, ModelError, Shard};

type ConfigEdit = Box<dyn Fn(&mut serde_json::Map<String, serde_json::Value>)>;

fn copy_model(dst: &Path) {
    let src = common::repo().join("models/stories260K");
    for e in std::fs::read_dir(&src).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), dst.join(e.file_name())).unwrap();
    }
}

fn load_err(dir: &Path) -> String {
    match Model::load(dir, Shard::WHOLE) {
        Ok(_) => panic!("{} loaded but should not have", dir.display()),
        Err(e) => e.to_string(),
    }
}

fn edit_config(dir: &Path, f: impl FnOnce(&mut serde_json::Map<String, serde_json::Value>)) {
    let p = dir.join("config.json");
    let mut v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    f(v.as_object_mut().unwrap());
    std::fs::write(p, serde_json::to_string(&v).unwrap()).unwrap();
}

/// Rewrites model.safetensors with `edit` applied to the (name → (dtype, shape, bytes)) map.
fn edit_weights(dir: &Path, edit: impl FnOnce(&mut HashMap<String, (Dtype, Vec<usize>, Vec<u8>)>)) {
    let p = dir.join("model.safetensors");
    let bytes = std::fs::read(&p).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let mut m: HashMap<String, (Dtype, Vec<usize>, Vec<u8>)> =
        st.tensors().into_iter().map(|(n, v)| (n, (v.dtype(), v.shape().to_vec(), v.data().to_vec()))).collect();
    edit(&mut m);
    let views: Vec<(String, TensorView)> =
        m.iter().map(|(n, (d, s, b))| (n.clone(), TensorView::new(*d, s.clone(), b).unwrap())).collect();
    std::fs::write(&p, safetensors::serialize(views, None).unwrap()).unwrap();
}

#[test]
fn missing_directory_and_files() {
    let tmp = tempfile::tempdir().unwrap();
    let e = load_err(&tmp.path().join("nope"));
    assert!(e.contains("nope") && e.contains("does not exist"), "{e}");

    let e = load_err(tmp.path());
    assert!(e.contains("config.json") && e.contains("cannot read"), "{e}");

    copy_model(tmp.path());
    std::fs::remove_file(tmp.path().join("model.safetensors")).unwrap();
    let e = load_err(tmp.path());
    assert!(e.contains("no model.safetensors"), "{e}");
}

#[test]
fn malformed_config_names_the_field() {
    let cases: Vec<(&str, ConfigEdit, &str)> = vec![
        (
            "hidden_size",
            Box::new(|m| {
                m.remove("hidden_size");
            }),
            "missing",
        ),
        (
            "num_attention_heads",
            Box::new(|m| {
                m.insert("num_attention_heads".into(), "eight".into());
            }),
            "positive integer",
        ),
        (
            "architectures",
            Box::new(|m| {
                m.insert("architectures".into(), serde_json::json!(["GPT2LMHeadModel"]));
            }),
            "unsupported architecture \"GPT2LMHeadModel\"",
        ),
        (
            "num_key_value_heads",
            Box::new(|m| {
                m.insert("num_key_value_heads".into(), 3.into());
            }),
            "does not divide",
        ),
        (
            "rope_scaling.rope_type",
            Box::new(|m| {
                m.insert("rope_scaling".into(), serde_json::json!({"rope_type": "yarn", "factor": 2.0}));
            }),
            "unsupported rope_type",
        ),
        (
            "rope_scaling.low_freq_factor",
            Box::new(|m| {
                m.insert("rope_scaling".into(), serde_json::json!({"rope_type": "llama3", "factor": 8.0}));
            }),
            "missing",
        ),
        // Sizes from the file are checked before anything is allocated (issue 23, item 4).
        (
            "rope_theta",
            Box::new(|m| {
                m.insert("rope_theta".into(), (-1.0).into());
            }),
            "must be a positive number",
        ),
        (
            "max_position_embeddings",
            Box::new(|m| {
                m.insert("max_position_embeddings".into(), (1u64 << 40).into());
            }),
            "outside 1..=4294967295",
        ),
        (
            "hidden_act",
            Box::new(|m| {
                m.insert("hidden_act".into(), "gelu".into());
            }),
            "only \"silu\"",
        ),
        (
            "rms_norm_eps",
            Box::new(|m| {
                m.insert("rms_norm_eps".into(), (-1.0).into());
            }),
            "positive",
        ),
    ];
    for (field, edit, msg) in cases {
        let tmp = tempfile::tempdir().unwrap();
        copy_model(tmp.path());
        edit_config(tmp.path(), edit);
        let e = load_err(tmp.path());
        assert!(e.contains("config.json") && e.contains(&format!("`{field}`")) && e.contains(msg), "{field}: {e}");
    }
    let tmp = tempfile::tempdir().unwrap();
    copy_model(tmp.path());
    std::fs::write(tmp.path().join("config.json"), "{\"hidden_size\": 64,").unwrap();
    let e = load_err(tmp.path());
    assert!(e.contains("config.json") && e.contains("not valid JSON"), "{e}");
}

#[test]
fn bad_tensors_name_the_tensor() {
    let q = "model.layers.2.self_attn.q_proj.weight";
    let tmp = tempfile::tempdir().unwrap();
    copy_model(tmp.path());
    edit_weights(tmp.path(), |m| {
        m.remove(q);
    });
    let e = load_err(tmp.path());
    assert!(e.contains("model.safetensors") && e.contains(q) && e.contains("missing"), "{e}");

    let tmp = tempfile::tempdir().unwrap();
    copy_model(tmp.path());
    edit_weights(tmp.path(), |m| {
        let t = m.get_mut(q).unwrap();
        t.1 = vec![32, 128];
    });
    let e = load_err(tmp.path());
    assert!(e.contains(q) && e.contains("expected shape [64, 64], found [32, 128]"), "{e}");

    let tmp = tempfile::tempdir().unwrap();
    copy_model(tmp.path());
    edit_weights(tmp.path(), |m| m.get_mut(q).unwrap().0 = Dtype::I32);
    let e = load_err(tmp.path());
    assert!(e.contains(q) && e.contains("unsupported dtype I32"), "{e}");
}

#[test]
fn truncated_safetensors_is_reported() {
    let tmp = tempfile::tempdir().unwrap();
    copy_model(tmp.path());
    let p = tmp.path().join("model.safetensors");
    let bytes = std::fs::read(&p).unwrap();
    std::fs::write(&p, &bytes[..bytes.len() - 1000]).unwrap();
    let e = load_err(tmp.path());
    assert!(e.contains("model.safetensors") && e.contains("truncated"), "{e}");
}

#[test]
fn sharded_index_errors_name_the_index() {
    let src = common::repo().join("testdata/models/tiny-llama-bf16-sharded");
    let tmp = tempfile::tempdir().unwrap();
    for e in std::fs::read_dir(&src).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), tmp.path().join(e.file_name())).unwrap();
    }
    std::fs::remove_file(tmp.path().join("model-00003-of-00004.safetensors")).unwrap();
    let e = load_err(tmp.path());
    assert!(e.contains("model-00003-of-00004.safetensors") && e.contains("cannot read"), "{e}");
    std::fs::write(tmp.path().join("model.safetensors.index.json"), "{\"metadata\": {}}").unwrap();
    let e = load_err(tmp.path());
    assert!(e.contains("model.safetensors.index.json") && e.contains("`weight_map`"), "{e}");
}

#[test]
fn tensor_parallel_degree_must_divide_heads_and_features() {
    let qwen = common::repo().join("testdata/models/tiny-qwen2");
    let err = Model::load(&qwen, Shard { rank: 0, world: 4 }).err().expect("tp=4 must be refused");
    assert!(matches!(err, ModelError::Sharding(_)));
    assert!(err.to_string().contains("tp = 4 does not divide num_attention_heads = 6"), "{err}");
    assert!(Model::load(&qwen, Shard { rank: 1, world: 2 }).is_ok());
}

/// Replaces `name` in `dir` with a FIFO: opening one for reading blocks until a writer comes.
fn make_fifo(dir: &Path, name: &str) {
    let p = dir.join(name);
    std::fs::remove_file(&p).unwrap();
    let ok = std::process::Command::new("mkfifo").arg(&p).status().unwrap().success();
    assert!(ok, "mkfifo {}", p.display());
}

#[test]
fn a_model_file_that_is_not_a_regular_file_is_an_error_not_a_hang() {
    for name in ["config.json", "model.safetensors"] {
        let tmp = tempfile::tempdir().unwrap();
        copy_model(tmp.path());
        make_fifo(tmp.path(), name);
        let dir = tmp.path().to_path_buf();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(load_err(&dir));
        });
        let e = rx
            .recv_timeout(std::time::Duration::from_secs(20))
            .unwrap_or_else(|_| panic!("loading a model whose {name} is a FIFO hangs"));
        assert!(e.contains(name) && e.contains("not a regular file"), "{name}: {e}");
    }
}

#[test]
fn a_huge_layer_count_or_kv_cache_is_an_error_not_an_abort() {
    let tmp = tempfile::tempdir().unwrap();
    copy_model(tmp.path());
    edit_config(tmp.path(), |m| {
        m.insert("num_hidden_layers".into(), 2147483647.into());
    });
    let e = load_err(tmp.path());
    assert!(e.contains("model.layers.") && e.contains("model.safetensors"), "{e}");

    let model = Model::load(&common::repo().join("models/stories260K"), Shard::WHOLE).unwrap();
    let g = model.kv_geometry();
    for (bytes, block) in [(usize::MAX / 2, 16), (1 << 20, 1 << 31), (1usize << 62, 1usize << 40)] {
        match tessera_worker::kv_cache::KvCache::with_budget(&g, bytes, block) {
            Ok(_) => panic!("a KV cache of {bytes} bytes in blocks of {block} was allocated"),
            Err(e) => {
                let e = e.to_string();
                assert!(e.contains("cannot allocate") || e.contains("more elements than fit"), "{e}");
            }
        }
    }
}
