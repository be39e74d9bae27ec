//! Cluster mode with real processes: an etcd server, `tessera worker --etcd` processes and a
//! `tessera coordinator`, all on loopback. Replicas form from registered workers, serve like one
//! process, survive a worker's death without losing a token, an etcd outage, and a coordinator restart.

mod common;

use std::{
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use common::{
    Server,
    etcd::{self, Etcd, Worker},
    repo, rt,
};
use serde_json::{Value, json};
use tessera_bench::http_client::HttpClient;
use tessera_coordinator::{api::output::token_text, tokenizer::Tokenizer};

fn prompts(n: usize) -> Vec<String> {
    let names = ["Lily", "Tom", "Ben", "Sue", "Max", "Anna", "Sam", "Mia"];
    let things = ["a ball", "a cat", "a tree", "the sun"];
    (0..n).map(|i| format!("Once upon a time, {} saw {}", names[i % 8], things[(i / 8) % 4])).collect()
}

/// A greedy completion's text, or the error the server sent.
async fn complete(client: &HttpClient, s: &Server, prompt: &str, max_tokens: usize) -> Result<String, String> {
    let body = json!({"model": "stories260K", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": true});
    let r = client.post_json(&s.url("/v1/completions"), &body).await.map_err(|e| e.to_string())?;
    if r.status != 200 {
        return Err(format!("{}: {}", r.status, String::from_utf8_lossy(&r.body)));
    }
    let v: Value = r.json().unwrap();
    Ok(v["choices"][0]["text"].as_str().unwrap().to_string())
}

/// A streamed greedy completion: its text, and the arrival time of each chunk. `on_chunk` hears each
/// chunk's index as it arrives.
async fn stream(
    client: &HttpClient,
    s: &Server,
    prompt: &str,
    max_tokens: usize,
    on_chunk: impl Fn(usize),
) -> Result<(String, Vec<Instant>), String> {
    let body = json!({"model": "stories260K", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
        "ignore_eos": true, "stream": true});
    let mut text = String::new();
    let mut times = Vec::new();
    let mut error = None;
    let status = client
        .post_stream(&s.url("/v1/completions"), &body, |ev| {
            if ev.data == "[DONE]" {
                return false;
            }
            let v: Value = serde_json::from_str(&ev.data).unwrap();
            if v.get("error").is_some() {
                error = Some(v.to_string());
                return true;
            }
            text.push_str(v["choices"][0]["text"].as_str().unwrap_or(""));
            times.push(ev.at);
            on_chunk(times.len());
            true
        })
        .await
        .map_err(|e| e.to_string())?;
    if status != 200 {
        return Err(format!("status {status}"));
    }
    match error {
        Some(e) => Err(e),
        None => Ok((text, times)),
    }
}

/// Fires its receiver once `n` streams have each reached chunk `at` (the moment to break something).
struct Latch {
    left: AtomicUsize,
    tx: std::sync::Mutex<Option<tokio::sync::oneshot::Sender<()>>>,
}

impl Latch {
    fn new(n: usize) -> (Latch, tokio::sync::oneshot::Receiver<()>) {
        let (tx, rx) = tokio::sync::oneshot::channel();
        (Latch { left: AtomicUsize::new(n), tx: std::sync::Mutex::new(Some(tx)) }, rx)
    }

    /// A stream's chunk `i` arrived; it counts when it is chunk `at`.
    fn arrive_at(&self, i: usize, at: usize) {
        if i == at
            && self.left.fetch_sub(1, Ordering::SeqCst) == 1
            && let Some(tx) = self.tx.lock().unwrap().take()
        {
            let _ = tx.send(());
        }
    }
}

fn requests(v: &Value) -> Vec<u64> {
    v["replicas"].as_array().unwrap().iter().map(|r| r["requests"].as_u64().unwrap()).collect()
}

#[test]
fn four_workers_make_two_replicas_that_serve_like_one_process() {
    rt().block_on(async {
        let client = HttpClient::new();
        let etcd = Etcd::start();
        // Two records the coordinator cannot use: it says so and goes on.
        let mut ec = etcd.client().await;
        ec.put("/tessera/c1/workers/garbled", "not json", None).await.unwrap();
        let old = json!({"id": "old", "address": "127.0.0.1:1", "device": "cpu", "memory_bytes": 1,
            "version": "0.0.1", "protocol": "tessera.v0"});
        ec.put("/tessera/c1/workers/old", old.to_string(), None).await.unwrap();
        // Workers that require the cluster token, and a coordinator that has it.
        let secret = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(secret.path(), "a-cluster-token-for-this-test\n").unwrap();
        let token = ["--cluster-token-file", secret.path().to_str().unwrap()];
        let workers: Vec<Worker> = (1..=4).map(|i| Worker::start_with(&etcd, "c1", &format!("w{i}"), &token)).collect();
        let coord =
            Server::coordinator(&["--etcd", &etcd.endpoint, "--cluster", "c1", "--tp", "2", token[0], token[1]]);
        let (v, took) =
            etcd::wait_for(&client, &coord, Duration::from_secs(60), "two replicas", |v| etcd::replicas(v) == 2).await;
        eprintln!("two replicas of tp 2 serving {took:?} after the coordinator started");
        for w in &workers {
            assert_eq!(etcd::worker_state(&v, &w.id).as_deref(), Some("serving"), "{v:#}");
        }
        for bad in ["garbled", "old"] {
            assert_eq!(etcd::worker_state(&v, bad).as_deref(), Some("ignored"), "{v:#}");
        }
        let old_reason = v["workers"].as_array().unwrap().iter().find(|w| w["id"] == "old").unwrap()["reason"].clone();
        assert!(old_reason.as_str().unwrap().contains("tessera.v0"), "{old_reason}");
        assert!(coord.logged("ignoring worker"), "the coordinator logs what it ignores");

        // The same text as one process, whichever replica serves, with requests spread over both.
        let single = Server::start(&[]);
        let ps = prompts(8);
        let outs = futures_util::future::join_all(ps.iter().map(|p| complete(&client, &coord, p, 40))).await;
        for (p, out) in ps.iter().zip(outs) {
            assert_eq!(out.unwrap(), complete(&client, &single, p, 40).await.unwrap(), "prompt {p:?}");
        }
        let v = etcd::cluster(&client, &coord).await;
        assert!(requests(&v).iter().all(|&n| n > 0), "both replicas serve: {v:#}");

        // Prefix affinity: a prompt sharing a long prefix with the last one goes where that one went.
        let long = "Once upon a time, there was a little girl named Lily who loved to play in the park with her dog.";
        let before = requests(&etcd::cluster(&client, &coord).await);
        complete(&client, &coord, &format!("{long} One day"), 4).await.unwrap();
        let mid = requests(&etcd::cluster(&client, &coord).await);
        complete(&client, &coord, &format!("{long} The next"), 4).await.unwrap();
        let after = requests(&etcd::cluster(&client, &coord).await);
        let first: Vec<u64> = mid.iter().zip(&before).map(|(a, b)| a - b).collect();
        let second: Vec<u64> = after.iter().zip(&mid).map(|(a, b)| a - b).collect();
        assert_eq!(first, second, "the shared prefix went to the same replica");
        assert!(coord.metric(&client, "tessera:prefix_cache_hits_total").await > 0.0);

        let metrics = String::from_utf8(client.get(&coord.url("/metrics")).await.unwrap().body.to_vec()).unwrap();
        assert!(
            metrics.contains("tessera:replicas_serving{model=\"stories260K\",model_name=\"stories260K\"} 2"),
            "{metrics}"
        );
        assert!(
            metrics.contains(
                "tessera:cluster_workers{model=\"stories260K\",model_name=\"stories260K\",state=\"ignored\"} 2"
            )
        );
        assert!(
            metrics.contains(
                "tessera:cluster_workers{model=\"stories260K\",model_name=\"stories260K\",state=\"serving\"} 4"
            )
        );
        assert!(
            metrics.contains(
                "tessera:cluster_groups{model=\"stories260K\",model_name=\"stories260K\",state=\"serving\"} 2"
            )
        );
        assert_eq!(client.get(&coord.url("/ready")).await.unwrap().status, 200);
    });
}

#[test]
fn a_killed_worker_loses_no_token_and_a_new_one_restores_capacity() {
    rt().block_on(async {
        let client = HttpClient::new();
        let etcd = Etcd::start();
        let mut workers: Vec<Worker> = (1..=4).map(|i| Worker::start(&etcd, "c2", &format!("w{i}"))).collect();
        let coord = Server::coordinator(&["--etcd", &etcd.endpoint, "--cluster", "c2", "--tp", "2"]);
        etcd::wait_for(&client, &coord, Duration::from_secs(60), "two replicas", |v| etcd::replicas(v) == 2).await;
        let single = Server::start(&[]);
        let ps = prompts(16);
        let max_tokens = 200;
        let mut expected = Vec::new();
        for p in &ps {
            expected.push(complete(&client, &single, p, max_tokens).await.unwrap());
        }
        drop(single);

        // Every stream has had a few tokens when the worker dies.
        let (latch, ready_rx) = Latch::new(16);
        let runs = futures_util::future::join_all(ps.iter().map(|p| {
            let latch = &latch;
            stream(&client, &coord, p, max_tokens, move |i| latch.arrive_at(i, 3))
        }));
        let killer = async {
            ready_rx.await.unwrap();
            let v = etcd::cluster(&client, &coord).await;
            let busiest = v["replicas"].as_array().unwrap().iter().max_by_key(|r| r["running"].as_u64()).unwrap().clone();
            let victim_addr = busiest["workers"][1].as_str().unwrap().to_string();
            let victim = workers.iter_mut().find(|w| w.addr == victim_addr).unwrap();
            victim.kill();
            (Instant::now(), victim.id.clone(), busiest["workers"][0].as_str().unwrap().to_string())
        };
        let (results, (killed_at, victim, survivor_addr)) = tokio::join!(runs, killer);
        let mut resumed_after = Duration::ZERO;
        for ((p, r), want) in ps.iter().zip(results).zip(&expected) {
            let (text, times) = r.unwrap_or_else(|e| panic!("{p:?} failed: {e}"));
            assert_eq!(&text, want, "{p:?}: the stream differs from an undisturbed run");
            assert!(times.len() >= 3, "{p:?}");
            if let Some(t) = times.iter().find(|&&t| t > killed_at) {
                resumed_after = resumed_after.max(*t - killed_at);
            }
        }
        eprintln!("FIGURE failover: every stream had a token again {resumed_after:?} after the worker died");
        assert!(coord.metric(&client, "tessera:migrated_sequences_total").await >= 1.0);
        assert_eq!(coord.metric(&client, "tessera:replica_failures_total").await, 1.0);

        // The lost group's survivor is free again; a new worker makes the second replica.
        let survivor = workers.iter().find(|w| w.addr == survivor_addr).unwrap().id.clone();
        let (v, _) = etcd::wait_for(&client, &coord, Duration::from_secs(10), "the survivor free", |v| {
            etcd::worker_state(v, &survivor).as_deref() == Some("free")
        })
        .await;
        assert_eq!(etcd::replicas(&v), 1);
        assert_ne!(etcd::worker_state(&v, &victim).as_deref(), Some("serving"));
        let t = Instant::now();
        workers.push(Worker::start(&etcd, "c2", "w5"));
        let (_, took) =
            etcd::wait_for(&client, &coord, Duration::from_secs(15), "a second replica", |v| etcd::replicas(v) == 2)
                .await;
        eprintln!(
            "FIGURE capacity: a new worker was serving capacity {:?} after it was started ({took:?} after it registered)",
            t.elapsed()
        );
        // The dead worker's record expires with its lease.
        etcd::wait_for(&client, &coord, Duration::from_secs(20), "the dead worker gone", |v| {
            etcd::worker_state(v, &victim).is_none()
        })
        .await;
        for p in &ps[..4] {
            complete(&client, &coord, p, 8).await.unwrap();
        }
    });
}

#[test]
fn serving_survives_an_etcd_outage_and_picks_up_workers_after_it() {
    rt().block_on(async {
        let client = HttpClient::new();
        let mut etcd = Etcd::start();
        let workers: Vec<Worker> = (1..=2).map(|i| Worker::start(&etcd, "c3", &format!("w{i}"))).collect();
        let coord = Server::coordinator(&["--etcd", &etcd.endpoint, "--cluster", "c3"]);
        etcd::wait_for(&client, &coord, Duration::from_secs(60), "two replicas", |v| etcd::replicas(v) == 2).await;

        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let load = {
            let (client, stop, base) = (client.clone(), stop.clone(), coord.base.clone());
            tokio::spawn(async move {
                let (mut ok, mut failed) = (0, Vec::new());
                let ps = prompts(8);
                while !stop.load(Ordering::Relaxed) {
                    let body =
                        json!({"model": "stories260K", "prompt": ps[ok % 8], "max_tokens": 16, "temperature": 0});
                    match client.post_json(&format!("{base}/v1/completions"), &body).await {
                        Ok(r) if r.status == 200 => ok += 1,
                        Ok(r) => failed.push(format!("{}: {}", r.status, String::from_utf8_lossy(&r.body))),
                        Err(e) => failed.push(e.to_string()),
                    }
                }
                (ok, failed)
            })
        };
        etcd.stop();
        // The outage itself: twenty seconds with no etcd while requests keep coming.
        tokio::time::sleep(Duration::from_secs(20)).await;
        let v = etcd::cluster(&client, &coord).await;
        assert_eq!(v["etcd_connected"], false, "{v:#}");
        assert_eq!(etcd::replicas(&v), 2, "serving goes on with the last known membership");
        etcd.restart();
        let _w3 = Worker::start(&etcd, "c3", "w3");
        let (v, took) = etcd::wait_for(&client, &coord, Duration::from_secs(30), "the new worker serving", |v| {
            etcd::replicas(v) == 3 && v["etcd_connected"] == true
        })
        .await;
        eprintln!("a worker started after etcd came back was serving {took:?} later");
        stop.store(true, Ordering::Relaxed);
        let (ok, failed) = load.await.unwrap();
        assert!(failed.is_empty(), "requests failed during the outage: {failed:?}");
        assert!(ok > 20, "only {ok} requests ran");
        for w in &workers {
            assert_eq!(etcd::worker_state(&v, &w.id).as_deref(), Some("serving"), "{v:#}");
        }
        assert_eq!(coord.metric(&client, "tessera:replica_failures_total").await, 0.0);
    });
}

#[test]
fn a_restarted_coordinator_rebuilds_its_groups_and_workers_deregister_on_shutdown() {
    rt().block_on(async {
        let client = HttpClient::new();
        let etcd = Etcd::start();
        let mut workers: Vec<Worker> = (1..=2).map(|i| Worker::start(&etcd, "c4", &format!("w{i}"))).collect();
        let args = ["--etcd", etcd.endpoint.as_str(), "--cluster", "c4"];
        let mut first = Server::coordinator(&args);
        etcd::wait_for(&client, &first, Duration::from_secs(60), "two replicas", |v| etcd::replicas(v) == 2).await;
        let want = complete(&client, &first, "Once upon a time", 24).await.unwrap();
        first.kill();

        let t = Instant::now();
        let second = Server::coordinator(&args);
        let (_, _) =
            etcd::wait_for(&client, &second, Duration::from_secs(20), "replicas again", |v| etcd::replicas(v) == 2)
                .await;
        assert_eq!(complete(&client, &second, "Once upon a time", 24).await.unwrap(), want);
        let took = t.elapsed();
        eprintln!("FIGURE restart: a restarted coordinator served again {took:?} after it started");
        assert!(took < Duration::from_secs(20));

        // A clean shutdown deregisters at once (the lease is 10 s; this must be much sooner).
        let t = Instant::now();
        workers[1].terminate();
        let (v, _) = etcd::wait_for(&client, &second, Duration::from_secs(5), "w2 gone", |v| {
            etcd::worker_state(v, "w2").is_none()
        })
        .await;
        eprintln!("a terminated worker left the cluster {:?} after SIGTERM", t.elapsed());
        assert_eq!(etcd::replicas(&v), 1);
        assert_eq!(complete(&client, &second, "Once upon a time", 24).await.unwrap(), want);
    });
}

#[test]
fn with_no_replica_left_requests_end_with_a_clear_error() {
    rt().block_on(async {
        let client = HttpClient::new();
        let etcd = Etcd::start();
        let mut workers: Vec<Worker> = (1..=2).map(|i| Worker::start(&etcd, "c5", &format!("w{i}"))).collect();
        let coord = Server::coordinator(&["--etcd", &etcd.endpoint, "--cluster", "c5", "--tp", "2"]);
        etcd::wait_for(&client, &coord, Duration::from_secs(60), "a replica", |v| etcd::replicas(v) == 1).await;
        let (latch, rx) = Latch::new(1);
        let run = stream(&client, &coord, "Once upon a time", 400, |i| latch.arrive_at(i, 3));
        let kill = async {
            rx.await.unwrap();
            workers[0].kill();
        };
        let (r, ()) = tokio::join!(run, kill);
        let e = r.expect_err("the stream ends with an error event");
        assert!(e.contains("no healthy replica"), "{e}");
        // Nothing serves now: /ready says so, and a new request gets a 503 with Retry-After.
        assert_eq!(client.get(&coord.url("/ready")).await.unwrap().status, 503);
        let body = json!({"model": "stories260K", "prompt": "Once", "max_tokens": 4});
        let r = client.post_json(&coord.url("/v1/completions"), &body).await.unwrap();
        assert_eq!(r.status, 503, "{}", String::from_utf8_lossy(&r.body));
        assert!(r.headers.contains_key("retry-after"));
        assert_eq!(r.json().unwrap()["error"]["type"], "service_unavailable");
    });
}

#[test]
fn two_coordinators_split_the_workers_and_hand_them_over_on_shutdown() {
    rt().block_on(async {
        let client = HttpClient::new();
        let etcd = Etcd::start();
        let mut workers: Vec<Worker> = (1..=2).map(|i| Worker::start(&etcd, "c6", &format!("w{i}"))).collect();
        let args = ["--etcd", etcd.endpoint.as_str(), "--cluster", "c6"];
        let mut a = Server::coordinator(&args);
        etcd::wait_for(&client, &a, Duration::from_secs(30), "two replicas", |v| etcd::replicas(v) == 2).await;
        // B finds every worker taken; a third worker goes to whichever claims it first.
        let b = Server::coordinator(&args);
        workers.push(Worker::start(&etcd, "c6", "w3"));
        let workers_of = |v: &Value| -> Vec<String> {
            v["replicas"]
                .as_array()
                .unwrap()
                .iter()
                .flat_map(|r| r["workers"].as_array().unwrap().clone())
                .map(|w| w.as_str().unwrap().to_string())
                .collect()
        };
        let elsewhere =
            |v: &Value| v["workers"].as_array().unwrap().iter().filter(|w| w["state"] == "elsewhere").count();
        // Settled: every worker serves one of them, and each sees the other's as taken (claims arrive by
        // the watch, a moment after the other coordinator made them).
        let deadline = Instant::now() + Duration::from_secs(30);
        let (va, vb) = loop {
            let (va, vb) = (etcd::cluster(&client, &a).await, etcd::cluster(&client, &b).await);
            let (wa, wb) = (workers_of(&va), workers_of(&vb));
            if wa.len() + wb.len() == 3 && elsewhere(&va) == wb.len() && elsewhere(&vb) == wa.len() {
                break (va, vb);
            }
            assert!(Instant::now() < deadline, "the workers did not settle: {va:#} {vb:#}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        let (wa, wb) = (workers_of(&va), workers_of(&vb));
        assert!(wa.iter().all(|w| !wb.contains(w)), "a worker serves two coordinators: {wa:?} {wb:?}");
        assert!(wa.len() >= 2, "the first coordinator kept its workers: {va:#}");

        // A stops cleanly: its workers are B's within moments, not a lease TTL later.
        a.terminate();
        let (_, took) =
            etcd::wait_for(&client, &b, Duration::from_secs(5), "all three replicas", |v| etcd::replicas(v) == 3).await;
        eprintln!("a stopped coordinator's workers served the other {took:?} later");
        complete(&client, &b, "Once upon a time", 8).await.unwrap();
    });
}

#[test]
fn a_hung_worker_fails_its_group_at_the_step_deadline_and_loses_no_token() {
    rt().block_on(async {
        let client = HttpClient::new();
        let etcd = Etcd::start();
        let workers: Vec<Worker> = (1..=2).map(|i| Worker::start(&etcd, "c7", &format!("w{i}"))).collect();
        let coord = Server::coordinator(&["--etcd", &etcd.endpoint, "--cluster", "c7", "--step-timeout", "2"]);
        etcd::wait_for(&client, &coord, Duration::from_secs(60), "two replicas", |v| etcd::replicas(v) == 2).await;
        let single = Server::start(&[]);
        let ps = prompts(4);
        let mut expected = Vec::new();
        for p in &ps {
            expected.push(complete(&client, &single, p, 150).await.unwrap());
        }
        let (latch, rx) = Latch::new(4);
        let runs = futures_util::future::join_all(ps.iter().map(|p| {
            let latch = &latch;
            stream(&client, &coord, p, 150, move |i| latch.arrive_at(i, 3))
        }));
        // The worker stops answering (SIGSTOP) without closing anything: only the deadline can tell.
        let hang = async {
            rx.await.unwrap();
            workers[0].signal(libc::SIGSTOP);
            Instant::now()
        };
        let (results, hung_at) = tokio::join!(runs, hang);
        for ((p, r), want) in ps.iter().zip(results).zip(&expected) {
            let (text, times) = r.unwrap_or_else(|e| panic!("{p:?} failed: {e}"));
            assert_eq!(&text, want, "{p:?}");
            if let Some(gap) = times.windows(2).map(|w| w[1] - w[0]).max() {
                assert!(gap < Duration::from_secs(10), "{p:?} stalled {gap:?}");
            }
        }
        eprintln!("streams done {:?} after the worker hung", hung_at.elapsed());
        assert_eq!(coord.metric(&client, "tessera:replica_failures_total").await, 1.0);
        let v = etcd::cluster(&client, &coord).await;
        assert_eq!(etcd::replicas(&v), 1, "{v:#}");
        // The worker is killed when dropped.
        workers[0].signal(libc::SIGCONT);
    });
}

#[test]
fn a_model_the_workers_cannot_load_is_retried_with_backoff_and_explained() {
    rt().block_on(async {
        let client = HttpClient::new();
        let etcd = Etcd::start();
        // Everything the coordinator reads (config, tokenizer), but no weights for the workers.
        let dir = tempfile::tempdir().unwrap();
        for f in std::fs::read_dir(common::repo().join("models/stories260K")).unwrap() {
            let f = f.unwrap().path();
            if f.extension().is_none_or(|e| e != "safetensors") {
                std::fs::copy(&f, dir.path().join(f.file_name().unwrap())).unwrap();
            }
        }
        let _workers: Vec<Worker> = (1..=2).map(|i| Worker::start(&etcd, "c8", &format!("w{i}"))).collect();
        let model = dir.path().to_str().unwrap();
        let coord = Server::coordinator(&["--etcd", &etcd.endpoint, "--cluster", "c8", "--model", model]);
        let failures = |v: &Value| {
            v["workers"]
                .as_array()
                .unwrap()
                .iter()
                .map(|w| w["failed_formations"].as_u64().unwrap_or(0))
                .max()
                .unwrap_or(0)
        };
        etcd::wait_for(&client, &coord, Duration::from_secs(20), "a failed formation", |v| failures(v) >= 1).await;
        let first = Instant::now();
        let (v, _) =
            etcd::wait_for(&client, &coord, Duration::from_secs(20), "three failed formations", |v| failures(v) >= 3)
                .await;
        // 1 s, then 2 s between attempts: not a loop.
        assert!(first.elapsed() >= Duration::from_millis(2900), "retried after {:?}: {v:#}", first.elapsed());
        let w = &v["workers"].as_array().unwrap()[0];
        assert!(w["last_error"].as_str().unwrap().contains("model.safetensors"), "{v:#}");
        assert_eq!(etcd::replicas(&v), 0);
        assert_eq!(client.get(&coord.url("/ready")).await.unwrap().status, 503);
    });
}

/// LoRA adapters in cluster mode: one given at start (`--lora`, as the chart passes it) and one loaded
/// while serving reach a tp = 2 group formed from etcd, and answer as `peft` does (the group loads them
/// on its own thread: the manager that forms it runs on the coordinator's runtime).
#[test]
fn a_group_formed_from_etcd_serves_adapters_given_at_start_and_loaded_later() {
    let model = repo().join("testdata/models/tiny-llama3");
    let adapter = |name: &str| repo().join("testdata/lora/tiny-llama3").join(name);
    let golden: Value =
        serde_json::from_str(&std::fs::read_to_string(repo().join("testdata/lora/golden.json")).unwrap()).unwrap();
    rt().block_on(async {
        let client = HttpClient::new();
        let etcd = Etcd::start();
        let _workers: Vec<Worker> = (1..=2).map(|i| Worker::start(&etcd, "lora", &format!("w{i}"))).collect();
        let at_start = format!("qv-r8={}", adapter("qv-r8").display());
        let coord = Server::coordinator(&[
            "--etcd",
            &etcd.endpoint,
            "--cluster",
            "lora",
            "--tp",
            "2",
            "--model",
            model.to_str().unwrap(),
            "--lora",
            &at_start,
        ]);
        etcd::wait_for(&client, &coord, Duration::from_secs(60), "one replica", |v| etcd::replicas(v) == 1).await;
        let body = json!({"lora_name": "all-r4-rslora", "lora_path": adapter("all-r4-rslora").to_str().unwrap()});
        let r = client.post_json(&coord.url("/v1/load_lora_adapter"), &body).await.unwrap();
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
        for name in ["qv-r8", "all-r4-rslora"] {
            let case = &golden["models"]["tiny-llama3"][name][0];
            let n = case["greedy_ids"].as_array().unwrap().len();
            let body = json!({"model": name, "prompt": case["prompt_ids"], "max_tokens": n, "temperature": 0,
                "ignore_eos": true, "logprobs": 0});
            let r = client.post_json(&coord.url("/v1/completions"), &body).await.unwrap();
            let v = r.json().unwrap();
            assert_eq!(r.status, 200, "{name}: {v}");
            // Same tokens as peft's greedy ids, each as completions' logprobs show a token.
            assert_eq!(v["usage"]["completion_tokens"], n, "{name}: {v}");
            let tok = Tokenizer::load(&model).unwrap();
            let want: Vec<String> = case["greedy_ids"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| token_text(&tok, x.as_u64().unwrap() as u32).0)
                .collect();
            let got: Vec<&str> =
                v["choices"][0]["logprobs"]["tokens"].as_array().unwrap().iter().map(|t| t.as_str().unwrap()).collect();
            assert_eq!(got, want, "{name}: tokens differ from peft's");
        }
    });
}
