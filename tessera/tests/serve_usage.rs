//! The usage ledger end to end: `tessera serve --usage-db`, rows per request (completed, streamed,
//! cancelled), `GET /v1/usage` for admin keys only, `tessera usage`, per-key metrics, and crash safety
//! under SIGKILL.

mod common;

use std::{
    collections::HashMap,
    process::Command,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use common::*;
use serde_json::{Value, json};
use tessera_bench::http_client::HttpClient;

/// Every row of a ledger, by request id: (key_id, status, finish_reason, prompt, cached, completion).
type Row = (Option<String>, String, String, u64, u64, u64);

fn rows(db: &std::path::Path) -> HashMap<String, Row> {
    let conn = rusqlite::Connection::open(db).unwrap();
    let ok: String = conn.query_row("PRAGMA integrity_check", [], |r| r.get(0)).unwrap();
    assert_eq!(ok, "ok", "ledger corrupt");
    let mut stmt = conn
        .prepare(
            "SELECT request_id, key_id, status, finish_reason, prompt_tokens, cached_tokens, completion_tokens FROM usage",
        )
        .unwrap();
    stmt.query_map([], |r| {
        let n = |i| r.get::<_, i64>(i).map(|v| v as u64);
        Ok((r.get::<_, String>(0)?, (r.get(1)?, r.get(2)?, r.get(3)?, n(4)?, n(5)?, n(6)?)))
    })
    .unwrap()
    .map(Result::unwrap)
    .collect()
}

/// What a client has read of a streamed completion: the response id, the usage chunk, whether `[DONE]`
/// came, and how many events.
#[derive(Default)]
struct Streamed {
    id: String,
    usage: Option<Value>,
    done: bool,
    events: usize,
}

impl Streamed {
    /// Takes one `data:` payload; false once the stream is over.
    fn see(&mut self, data: &str) -> bool {
        self.events += 1;
        if data == "[DONE]" {
            self.done = true;
            return false;
        }
        let v: Value = serde_json::from_str(data).unwrap();
        if self.id.is_empty() {
            self.id = v["id"].as_str().unwrap().to_string();
        }
        if !v["usage"].is_null() {
            self.usage = Some(v["usage"].clone());
        }
        true
    }
}

fn stream_body(prompt: &str, max_tokens: usize) -> Value {
    json!({"model": "stories260K", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
        "ignore_eos": true, "stream": true, "stream_options": {"include_usage": true}})
}

/// A streamed completion read to the end or until `hang_up_after` events.
async fn stream(client: &HttpClient, s: &Server, max_tokens: usize, hang_up_after: Option<usize>) -> Streamed {
    let mut st = Streamed::default();
    let status = client
        .post_stream(&s.url("/v1/completions"), &stream_body("Once upon a time", max_tokens), |ev| {
            st.see(&ev.data) && hang_up_after.is_none_or(|n| st.events < n)
        })
        .await
        .unwrap();
    assert_eq!(status, 200);
    st
}

#[test]
fn usage_is_billed_per_request_and_readable_by_admins_only() {
    let (alice, alice_entry) = create_key("acme", "alice", None);
    let (ops, mut ops_entry) = create_key("operator", "ops", None);
    ops_entry["admin"] = json!(true);
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("keys.json");
    std::fs::write(&keys, json!({"keys": [alice_entry, ops_entry]}).to_string()).unwrap();
    let db = dir.path().join("usage.db");
    let s = Server::start(&["--api-keys", keys.to_str().unwrap(), "--usage-db", db.to_str().unwrap()]);
    let client = HttpClient::new();
    let (as_alice, as_ops) = (client.with_key(&alice), client.with_key(&ops));
    rt().block_on(async {
        let body = json!({"model": "stories260K", "prompt": "Once upon a time", "max_tokens": 5, "temperature": 0});
        let whole = as_alice.post_json(&s.url("/v1/completions"), &body).await.unwrap().json().unwrap();
        let Streamed { id: streamed_id, usage: streamed_usage, done, .. } = stream(&as_alice, &s, 7, None).await;
        assert!(done);
        // Hung up after three events: billed for what was produced, marked cancelled.
        let Streamed { id: cut_id, done: cut_done, .. } = stream(&as_alice, &s, 400, Some(3)).await;
        assert!(!cut_done);
        let body_ops = json!({"model": "stories260K", "prompt": "Once", "max_tokens": 2, "temperature": 0});
        let by_ops = as_ops.post_json(&s.url("/v1/completions"), &body_ops).await.unwrap().json().unwrap();

        // The cancelled row is written when the server notices the hang-up.
        let deadline = Instant::now() + Duration::from_secs(20);
        while !rows(&db).contains_key(&cut_id) {
            assert!(Instant::now() < deadline, "no ledger row for the cancelled stream");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let r = rows(&db);
        assert_eq!(r.len(), 4, "{r:?}");
        let u = &whole["usage"];
        let row = &r[whole["id"].as_str().unwrap()];
        assert_eq!(
            (row.0.as_deref(), row.1.as_str(), row.2.as_str(), row.3, row.5),
            (Some("alice"), "completed", "length", u["prompt_tokens"].as_u64().unwrap(), 5)
        );
        let su = streamed_usage.unwrap();
        let row = &r[&streamed_id];
        assert_eq!((row.1.as_str(), row.3, row.5), ("completed", su["prompt_tokens"].as_u64().unwrap(), 7));
        let row = &r[&cut_id];
        assert_eq!((row.1.as_str(), row.2.as_str()), ("cancelled", "abort"));
        assert!((1..400).contains(&row.5), "cancelled stream billed {} tokens", row.5);
        assert_eq!(r[by_ops["id"].as_str().unwrap()].0.as_deref(), Some("ops"));

        // Only admins read usage; totals match the rows.
        let denied = as_alice.get(&s.url("/v1/usage")).await.unwrap();
        assert_eq!(denied.status, 403);
        assert_eq!(denied.json().unwrap()["error"]["type"], "permission_error");
        let v = as_ops.get(&s.url("/v1/usage?by=key")).await.unwrap().json().unwrap();
        let alice_total = v["data"].as_array().unwrap().iter().find(|t| t["group"] == "alice").unwrap().clone();
        assert_eq!(alice_total["requests"], 3);
        assert_eq!(alice_total["completion_tokens"].as_u64().unwrap(), 5 + 7 + r[&cut_id].5);
        let v = as_ops.get(&s.url("/v1/usage?by=tenant&since=1h")).await.unwrap().json().unwrap();
        let groups: Vec<&str> = v["data"].as_array().unwrap().iter().map(|t| t["group"].as_str().unwrap()).collect();
        assert_eq!(groups, ["acme", "operator"]);
        for bad in ["/v1/usage?by=planet", "/v1/usage?since=yesterday", "/v1/usage?color=red"] {
            let resp = as_ops.get(&s.url(bad)).await.unwrap();
            assert_eq!(resp.status, 400, "{bad}");
            assert!(resp.json().unwrap()["error"]["message"].is_string());
        }

        // Per-key counters: by key id, never the secret.
        let metrics = String::from_utf8(client.get(&s.url("/metrics")).await.unwrap().body.to_vec()).unwrap();
        let line = |status: &str| {
            metrics
                .lines()
                .find(|l| {
                    l.starts_with("tessera:key_requests_total{")
                        && l.contains("key_id=\"alice\"")
                        && l.contains(&format!("status=\"{status}\""))
                })
                .map(|l| l.rsplit(' ').next().unwrap().to_string())
        };
        assert_eq!(line("completed").as_deref(), Some("2"));
        assert_eq!(line("cancelled").as_deref(), Some("1"));
        assert!(metrics.contains("tessera:key_tokens_total{"));
        assert!(!metrics.contains(&alice) && !metrics.contains(&ops), "a secret leaked into /metrics");
    });

    // The CLI reads the same file, even while the server holds it.
    let o = Command::new(env!("CARGO_BIN_EXE_tessera"))
        .args(["usage", "--db", db.to_str().unwrap(), "--by", "key", "--json"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    let groups: Vec<&str> = v["data"].as_array().unwrap().iter().map(|t| t["group"].as_str().unwrap()).collect();
    assert_eq!(groups, ["alice", "ops"]);
    let o = Command::new(env!("CARGO_BIN_EXE_tessera")).args(["usage", "--db", "/no/such/usage.db"]).output().unwrap();
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("/no/such/usage.db"));
}

#[test]
fn a_server_without_a_ledger_says_so() {
    let s = Server::start(&[]);
    rt().block_on(async {
        let resp = HttpClient::new().get(&s.url("/v1/usage")).await.unwrap();
        assert_eq!(resp.status, 404);
        assert!(resp.json().unwrap()["error"]["message"].as_str().unwrap().contains("--usage-db"));
    });
}

/// SIGKILL while 64 streams run: after a restart, every response received in full has exactly one row
/// with its token counts, and the file is intact.
#[test]
fn a_killed_server_leaves_one_intact_row_per_finished_response() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("usage.db");
    let s = Server::start(&["--usage-db", db.to_str().unwrap(), "--max-num-seqs", "64"]);
    let finished: Arc<Mutex<Vec<(String, Value)>>> = Arc::default();
    let streaming = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let rt = rt();
    let short = 32;
    rt.block_on(async {
        let client = HttpClient::new();
        let mut tasks = Vec::new();
        for i in 0..64usize {
            let (client, url, finished, streaming) =
                (client.clone(), s.url("/v1/completions"), finished.clone(), streaming.clone());
            // Half finish quickly, half would run for hundreds of tokens.
            let max_tokens = if i < short { 4 + i % 13 } else { 480 };
            tasks.push(tokio::spawn(async move {
                let mut st = Streamed::default();
                let r = client
                    .post_stream(&url, &stream_body(&format!("Once upon a time {i}"), max_tokens), |ev| {
                        if st.events == 0 {
                            streaming.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        }
                        let more = st.see(&ev.data);
                        if st.done
                            && let Some(u) = st.usage.take()
                        {
                            finished.lock().unwrap().push((st.id.clone(), u));
                        }
                        more
                    })
                    .await;
                // The long ones end with a broken connection when the server dies.
                let _ = r;
            }));
        }
        // Kill once every short stream is complete and every long one is under way.
        let deadline = Instant::now() + Duration::from_secs(120);
        while finished.lock().unwrap().len() < short || streaming.load(std::sync::atomic::Ordering::SeqCst) < 64 {
            assert!(Instant::now() < deadline, "streams did not get going");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        drop(s); // SIGKILL
        for t in tasks {
            let _ = t.await;
        }
    });
    let finished = finished.lock().unwrap().clone();
    assert!(finished.len() >= short, "{} finished", finished.len());
    assert!(finished.len() < 64, "every stream finished before the kill: the test proved nothing");

    // The restarted server opens the same file, and its rows are exactly the finished responses'.
    let s = Server::start(&["--usage-db", db.to_str().unwrap()]);
    drop(s);
    let r = rows(&db);
    for (id, usage) in &finished {
        let row = r.get(id).unwrap_or_else(|| panic!("response {id} was received in full but has no row"));
        assert_eq!(row.1, "completed");
        assert_eq!(
            (row.3, row.5),
            (usage["prompt_tokens"].as_u64().unwrap(), usage["completion_tokens"].as_u64().unwrap()),
            "{id}"
        );
    }
    let conn = rusqlite::Connection::open(&db).unwrap();
    let dupes: i64 =
        conn.query_row("SELECT COUNT(*) - COUNT(DISTINCT request_id) FROM usage", [], |r| r.get(0)).unwrap();
    assert_eq!(dupes, 0);
}
