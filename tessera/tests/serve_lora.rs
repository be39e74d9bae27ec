//! LoRA fine-tunes served end to end: `tessera serve --lora NAME=DIR`, requests choosing an adapter by
//! `model`, keys that reach only their own fine-tunes, the ledger and per-key metrics naming the adapter,
//! `/v1/models` listing adapters under their base, loading and unloading while another stream runs, and
//! tensor parallelism over worker processes. Outputs are checked against `peft` (testdata/lora/golden.json,
//! made by scripts/make_lora_fixtures.py).

mod common;

use std::path::PathBuf;

use common::*;
use serde_json::{Value, json};
use tessera_bench::http_client::HttpClient;
use tessera_coordinator::{api::output::token_text, tokenizer::Tokenizer};

const BASE: &str = "tiny-llama3";

fn lora(name: &str) -> PathBuf {
    repo().join("testdata/lora").join(BASE).join(name)
}

fn lora_arg(name: &str) -> String {
    format!("{name}={}", lora(name).display())
}

fn golden() -> Value {
    serde_json::from_str(&std::fs::read_to_string(repo().join("testdata/lora/golden.json")).unwrap()).unwrap()
}

/// `(prompt ids, greedy ids)` of each golden case of adapter `name` (or of the base model's golden file).
fn cases(name: &str) -> Vec<(Vec<u64>, Vec<u64>)> {
    let ids = |v: &Value| v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap()).collect::<Vec<_>>();
    let list = if name == BASE {
        let g: Value = serde_json::from_str(
            &std::fs::read_to_string(repo().join("testdata/models").join(BASE).join("golden.json")).unwrap(),
        )
        .unwrap();
        g["cases"].as_array().unwrap().clone()
    } else {
        golden()["models"][BASE][name].as_array().unwrap().clone()
    };
    list.iter().map(|c| (ids(&c["prompt_ids"]), ids(&c["greedy_ids"]))).collect()
}

/// Each token of `greedy` as completions' `logprobs.tokens` shows it.
fn token_texts(greedy: &[u64]) -> Vec<String> {
    let tok = Tokenizer::load(&repo().join("testdata/models").join(BASE)).unwrap();
    greedy.iter().map(|&id| token_text(&tok, id as u32).0).collect()
}

/// A greedy completion of `prompt` ids under `model`: (status, body).
async fn complete_ids(client: &HttpClient, s: &Server, model: &str, prompt: &[u64], n: usize) -> (u16, Value) {
    let body =
        json!({"model": model, "prompt": prompt, "max_tokens": n, "temperature": 0, "ignore_eos": true, "logprobs": 0});
    let r = client.post_json(&s.url("/v1/completions"), &body).await.unwrap();
    (r.status.as_u16(), r.json().unwrap_or(Value::Null))
}

/// Every golden case of `model` through the server, all at once, each checked against peft.
async fn check_all(client: &HttpClient, s: &Server, models: &[&str]) {
    let mut jobs = Vec::new();
    for &m in models {
        for (prompt, greedy) in cases(m) {
            let n = greedy.len().min(24);
            jobs.push(async move {
                let (status, v) = complete_ids(client, s, m, &prompt, n).await;
                assert_eq!(status, 200, "{m}: {v}");
                assert_eq!(v["model"], m);
                assert_eq!(v["usage"]["completion_tokens"], n);
                let got: Vec<&str> = v["choices"][0]["logprobs"]["tokens"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|t| t.as_str().unwrap())
                    .collect();
                assert_eq!(got, token_texts(&greedy[..n]), "{m}: greedy tokens differ from peft's");
            });
        }
    }
    futures_util::future::join_all(jobs).await;
}

#[test]
fn fine_tunes_are_served_by_name_and_each_key_reaches_only_its_own() {
    let (admin, mut admin_entry) = create_key("operator", "ops", None);
    admin_entry["admin"] = json!(true);
    let (sql, sql_entry) = create_key("acme", "acme-key", Some("qv-r8"));
    let (both, both_entry) = create_key("globex", "globex-key", Some(&format!("all-r4-rslora,{BASE}")));
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("keys.json");
    std::fs::write(&keys, json!({"keys": [admin_entry, sql_entry, both_entry]}).to_string()).unwrap();
    let db = dir.path().join("usage.db");
    let model = repo().join("testdata/models").join(BASE);
    let s = Server::start(&[
        "--model",
        model.to_str().unwrap(),
        "--lora",
        &lora_arg("qv-r8"),
        "--lora",
        &lora_arg("all-r4-rslora"),
        "--lora",
        &lora_arg("mlp-o-r16"),
        "--api-keys",
        keys.to_str().unwrap(),
        "--usage-db",
        db.to_str().unwrap(),
    ]);
    let client = HttpClient::new();
    let (as_admin, as_sql, as_both) = (client.with_key(&admin), client.with_key(&sql), client.with_key(&both));
    rt().block_on(async {
        // Three adapters and the base model in one batch, each exactly as peft computes it.
        check_all(&as_admin, &s, &["qv-r8", "all-r4-rslora", "mlp-o-r16", BASE]).await;

        let models = as_admin.get(&s.url("/v1/models")).await.unwrap().json().unwrap();
        let ids: Vec<&str> = models["data"].as_array().unwrap().iter().map(|m| m["id"].as_str().unwrap()).collect();
        assert_eq!(ids, [BASE, "all-r4-rslora", "mlp-o-r16", "qv-r8"]);
        let card = &models["data"][3];
        assert_eq!((card["parent"].as_str(), card["object"].as_str()), (Some(BASE), Some("model")));
        assert_eq!(card["root"].as_str().unwrap(), lora("qv-r8").to_str().unwrap(), "admins see the directory");
        assert!(models["data"][0]["parent"].is_null(), "the base has no parent");
        // A customer's key lists its own fine-tune only, without where it lives on the server, and learns
        // nothing of other tenants' adapters: 403 for every name outside its list, served or not.
        let mine = as_sql.get(&s.url("/v1/models")).await.unwrap().json().unwrap();
        assert_eq!(mine["data"].as_array().unwrap().len(), 1, "{mine}");
        assert_eq!(mine["data"][0]["id"], "qv-r8");
        assert!(mine["data"][0]["root"].is_null(), "{mine}");
        assert_eq!(as_sql.get(&s.url("/v1/models/mlp-o-r16")).await.unwrap().status.as_u16(), 404);
        for other in ["mlp-o-r16", "no-such-adapter"] {
            let (status, v) = complete_ids(&as_sql, &s, other, &cases("qv-r8")[0].0, 1).await;
            assert_eq!(status, 403, "{other}: {v}");
        }
        let one = as_sql.get(&s.url("/v1/models/qv-r8")).await.unwrap();
        assert_eq!(
            (one.status.as_u16(), one.json().unwrap()["parent"].as_str().map(String::from)),
            (200, Some(BASE.into()))
        );

        // A customer's key reaches its fine-tune and nothing else.
        let (prompt, _) = &cases("qv-r8")[0];
        assert_eq!(complete_ids(&as_sql, &s, "qv-r8", prompt, 3).await.0, 200);
        for other in [BASE, "all-r4-rslora"] {
            let (status, v) = complete_ids(&as_sql, &s, other, prompt, 3).await;
            assert_eq!((status, v["error"]["code"].as_str()), (403, Some("model_not_allowed")), "{other}: {v}");
        }
        assert_eq!(complete_ids(&as_both, &s, "all-r4-rslora", prompt, 3).await.0, 200);
        assert_eq!(complete_ids(&as_both, &s, BASE, prompt, 3).await.0, 200);
        let (status, v) = complete_ids(&as_admin, &s, "no-such-adapter", prompt, 3).await;
        assert_eq!((status, v["error"]["code"].as_str()), (404, Some("model_not_found")), "{v}");

        // Chat over an adapter: the base's template, the adapter's weights, the adapter's name back.
        let chat = json!({"model": "qv-r8", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4});
        let r = as_sql.post_json(&s.url("/v1/chat/completions"), &chat).await.unwrap();
        assert_eq!(r.status, 200);
        assert_eq!(r.json().unwrap()["model"], "qv-r8");

        // Only an admin key loads or unloads adapters.
        let body = json!({"lora_name": "x", "lora_path": lora("qv-r8").to_str().unwrap()});
        let r = as_sql.post_json(&s.url("/v1/load_lora_adapter"), &body).await.unwrap();
        assert_eq!(r.status.as_u16(), 403, "{}", String::from_utf8_lossy(&r.body));
        let r = as_sql.post_json(&s.url("/v1/unload_lora_adapter"), &json!({"lora_name": "qv-r8"})).await.unwrap();
        assert_eq!(r.status.as_u16(), 403);

        // The prefix cache keeps each adapter's blocks to itself: a prompt of several blocks that the base
        // has just computed is computed again for an adapter, and only a second run of the same adapter
        // hits its own blocks.
        let long: Vec<u64> = (0..70).map(|i| 3 + (i * 37) % 500).collect();
        let cached = |model: &'static str| {
            let (as_both, long, s) = (&as_both, &long, &s);
            async move {
                let (status, v) = complete_ids(as_both, s, model, long, 2).await;
                assert_eq!(status, 200, "{v}");
                v["usage"]["prompt_tokens_details"]["cached_tokens"].as_u64().unwrap()
            }
        };
        assert_eq!(cached(BASE).await, 0);
        assert!(cached(BASE).await >= 64, "the base hits its own blocks");
        assert_eq!(cached("all-r4-rslora").await, 0, "an adapter was served the base's KV blocks");
        assert!(cached("all-r4-rslora").await >= 64, "an adapter hits its own blocks");

        // The ledger and the per-key metrics name the adapter.
        let conn = rusqlite::Connection::open(&db).unwrap();
        let by_key: Vec<(String, String)> = conn
            .prepare("SELECT DISTINCT key_id, model FROM usage WHERE status = 'completed' ORDER BY key_id, model")
            .unwrap()
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
            .unwrap()
            .map(Result::unwrap)
            .collect();
        let want = [("acme-key", "qv-r8"), ("globex-key", "all-r4-rslora"), ("globex-key", BASE)];
        for (k, m) in want {
            assert!(by_key.iter().any(|(a, b)| a == k && b == m), "no ledger row of {k} on {m}: {by_key:?}");
        }
        assert!(!by_key.iter().any(|(k, m)| k == "acme-key" && m != "qv-r8"), "{by_key:?}");
        let metrics = String::from_utf8(as_admin.get(&s.url("/metrics")).await.unwrap().body.to_vec()).unwrap();
        assert!(
            metrics.lines().any(|l| l.starts_with("tessera:key_tokens_total{")
                && l.contains("key_id=\"acme-key\"")
                && l.contains("adapter=\"qv-r8\"")
                && l.contains("kind=\"completion\"")),
            "{metrics}"
        );
    });
}

#[test]
fn adapters_load_and_unload_while_another_stream_runs() {
    let model = repo().join("testdata/models").join(BASE);
    let s = Server::start(&["--model", model.to_str().unwrap(), "--max-loras", "2", "--max-lora-rank", "8"]);
    let client = HttpClient::new();
    rt().block_on(async {
        let load = |name: &str, path: PathBuf| {
            let body = json!({"lora_name": name, "lora_path": path.to_str().unwrap()});
            let url = s.url("/v1/load_lora_adapter");
            let client = &client;
            async move {
                let r = client.post_json(&url, &body).await.unwrap();
                (r.status.as_u16(), String::from_utf8(r.body.to_vec()).unwrap())
            }
        };
        let unload = |name: &str| {
            let body = json!({"lora_name": name});
            let url = s.url("/v1/unload_lora_adapter");
            let client = &client;
            async move {
                let r = client.post_json(&url, &body).await.unwrap();
                (r.status.as_u16(), String::from_utf8(r.body.to_vec()).unwrap())
            }
        };
        // A long stream on the base runs through every load and unload and loses nothing.
        let (prompt, _) = &cases(BASE)[0];
        let stream_body = json!({"model": BASE, "prompt": prompt, "max_tokens": 1000, "temperature": 0,
            "ignore_eos": true, "stream": true, "stream_options": {"include_usage": true}});
        let (mut finish, mut usage) = (None, None);
        // The loads start once the stream has a token, and the first must end before the stream does.
        let (first_token, streaming_now) = tokio::sync::oneshot::channel::<()>();
        let mut first_token = Some(first_token);
        let stream_over = std::sync::atomic::AtomicBool::new(false);
        let url = s.url("/v1/completions");
        let streaming = client.post_stream(&url, &stream_body, |ev| {
            if let Some(tx) = first_token.take() {
                let _ = tx.send(());
            }
            if ev.data == "[DONE]" {
                stream_over.store(true, std::sync::atomic::Ordering::SeqCst);
            } else {
                let v: Value = serde_json::from_str(&ev.data).unwrap();
                if let Some(f) = v["choices"][0]["finish_reason"].as_str() {
                    finish = Some(f.to_string());
                }
                if !v["usage"].is_null() {
                    usage = Some(v["usage"]["completion_tokens"].clone());
                }
            }
            true
        });
        let admin = async {
            streaming_now.await.unwrap();
            let (status, text) = load("qv-r8", lora("qv-r8")).await;
            assert_eq!((status, text.as_str()), (200, "Success: LoRA adapter 'qv-r8' added successfully."));
            assert!(!stream_over.load(std::sync::atomic::Ordering::SeqCst), "the load ran while the stream did");
            check_all(&client, &s, &["qv-r8"]).await;

            let (status, text) = load("qv-r8", lora("qv-r8")).await;
            assert_eq!(status, 400, "{text}");
            assert!(text.contains("already loaded"), "{text}");
            let (status, text) = load(BASE, lora("qv-r8")).await;
            assert!(status == 400 && text.contains("base model"), "{text}");
            // Rank 16 is above --max-lora-rank 8: the worker refuses it, naming the file and field.
            let (status, text) = load("mlp", lora("mlp-o-r16")).await;
            assert!(status == 400 && text.contains("adapter_config.json") && text.contains("rank 16"), "{text}");
            let (status, text) = load("missing", PathBuf::from("/no/such/adapter")).await;
            assert!(status == 400 && text.contains("/no/such/adapter"), "{text}");
            let (status, text) = load("all-r4-rslora", lora("all-r4-rslora")).await;
            assert_eq!(status, 200, "{text}");
            let (status, text) = load("third", lora("all-r4-rslora")).await;
            assert!(status == 400 && text.contains("--max-loras"), "{text}");
            // A failed load left nothing behind: the names are free and unlisted.
            let models = client.get(&s.url("/v1/models")).await.unwrap().json().unwrap();
            assert_eq!(models["data"].as_array().unwrap().len(), 3, "{models}");

            let (status, text) = unload("qv-r8").await;
            assert_eq!((status, text.as_str()), (200, "Success: LoRA adapter 'qv-r8' removed successfully."));
            let (prompt, _) = &cases("qv-r8")[0];
            let (status, v) = complete_ids(&client, &s, "qv-r8", prompt, 3).await;
            assert_eq!(status, 404, "{v}");
            assert_eq!(unload("qv-r8").await.0, 404);
            // Loaded again (under a new id), it computes what peft does, not what blocks cached before say.
            assert_eq!(load("qv-r8", lora("qv-r8")).await.0, 200);
            check_all(&client, &s, &["qv-r8", "all-r4-rslora"]).await;
        };
        let (status, ()) = tokio::join!(streaming, admin);
        assert_eq!(status.unwrap(), 200);
        assert_eq!((finish.as_deref(), usage), (Some("length"), Some(json!(1000))), "the stream on the base model");
    });
}

#[test]
fn a_tensor_parallel_pair_serves_adapters_loaded_at_start_and_while_serving() {
    let model = repo().join("testdata/models").join(BASE);
    let s = Server::start(&["--model", model.to_str().unwrap(), "--tp", "2", "--lora", &lora_arg("all-r4-rslora")]);
    let client = HttpClient::new();
    rt().block_on(async {
        check_all(&client, &s, &["all-r4-rslora", BASE]).await;
        let body = json!({"lora_name": "mlp-o-r16", "lora_path": lora("mlp-o-r16").to_str().unwrap()});
        let r = client.post_json(&s.url("/v1/load_lora_adapter"), &body).await.unwrap();
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
        check_all(&client, &s, &["mlp-o-r16", "all-r4-rslora"]).await;
    });
}
