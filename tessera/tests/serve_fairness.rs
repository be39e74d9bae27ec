//! Fair share across API keys, measured with the load generator (`tessera bench serve`'s engine): key A
//! keeps 200 requests in flight against 64 slots while key B sends one request at a time.
//!
//! What is asserted is isolation: B's requests do not queue behind A's backlog. B's p99 time to first token
//! under the flood must be a small fraction of what one more request of A's waits (the backlog), where
//! arrival order would make them equal; and B's prefills ran in the middle of A's steps, paused between
//! layers (on the CPU a step of 64 decodes costs several times B's prefill). B's TTFT is also compared with
//! its idle value and printed, not asserted: on a 2-core machine, shared with the load generator's 200
//! streams, it swings between 1.9x and 4.4x from round to round of the same release binary, against an
//! idle p99 of about 0.5 ms. What sets the tail there is the engine loop's thread waiting for a core
//! (BENCHMARKS.md, seventh session); `scripts/bench_fairness.sh` measures it side by side. The test takes
//! all of nextest's threads (`.config/nextest.toml`), so that other tests are not part of the measurement.

mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::json;
use tessera_bench::{
    http_client::HttpClient,
    load::{ServeBenchArgs, run_load},
};

fn load(s: &Server, key: &str, concurrency: usize, requests: usize, max_tokens: usize) -> ServeBenchArgs {
    ServeBenchArgs {
        url: s.base.clone(),
        concurrency,
        requests,
        prompt_len: 16,
        max_tokens,
        model: Some("stories260K".into()),
        vocab: 500,
        api_key: Some(key.to_string()),
        no_stream: false,
        json: true,
        extra_body: None,
    }
}

#[test]
fn one_keys_flood_does_not_starve_another_key() {
    let (a, a_entry) = create_key("flood", "flood", None);
    let (b, b_entry) = create_key("single", "single", None);
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("keys.json");
    std::fs::write(&keys, json!({"keys": [a_entry, b_entry]}).to_string()).unwrap();
    let s = Server::start(&["--api-keys", keys.to_str().unwrap(), "--max-num-seqs", "64"]);
    // A and B are different clients: each has its own runtime, so B's timings are not A's 200 streams'
    // turn in one task queue.
    let rt = rt();
    let rt_b = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let b_load = load(&s, &b, 1, 300, 8);
    // Warm-up: the first requests touch cold weights and code, and would make the idle p99.
    rt_b.block_on(run_load(&load(&s, &b, 1, 5, 8))).unwrap();
    let idle = rt_b.block_on(run_load(&b_load)).unwrap();
    assert_eq!(idle.failed, 0);

    let a_load = load(&s, &a, 200, 100_000, 128);
    let flood = rt.spawn(async move { run_load(&a_load).await });
    // Wait until A holds every slot and has a backlog.
    let client = HttpClient::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    rt.block_on(async {
        while s.metric(&client, "tessera:num_requests_waiting").await < 100.0 {
            assert!(Instant::now() < deadline, "key A never built a backlog");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    });
    let loaded = rt_b.block_on(run_load(&b_load)).unwrap();
    // One more request of A's, alone: it waits behind A's own backlog.
    let a_probe = rt.block_on(run_load(&load(&s, &a, 1, 3, 8))).unwrap();
    let still_waiting = rt.block_on(s.metric(&client, "tessera:num_requests_waiting"));
    let newcomer_steps = rt.block_on(s.metric(&client, "tessera:newcomer_steps_total"));
    let steps_paused = rt.block_on(s.metric(&client, "tessera:steps_paused_total"));
    flood.abort();
    assert_eq!((loaded.failed, a_probe.failed), (0, 0));
    assert!(still_waiting >= 50.0, "A's backlog drained during the measurement ({still_waiting}): nothing was tested");
    println!(
        "B's time to first token, p50/p99 ms: idle {:.1}/{:.1}, under A's flood {:.1}/{:.1}; one more of A's: {:.1}; \
         newcomer steps {newcomer_steps}, of which in a paused step {steps_paused}",
        idle.ttft_ms.p50, idle.ttft_ms.p99, loaded.ttft_ms.p50, loaded.ttft_ms.p99, a_probe.ttft_ms.p50
    );
    // On the CPU a step of 64 decodes costs many times B's prefill: B's prefills ran alone, and many of them
    // without waiting for the rest of the step in flight.
    // (295-300 newcomer steps in every run here, alone or beside two busy loops; at the step-cost ratio of 2,
    // in release builds, only 159-228 of B's prefills got a step of their own in half the runs.)
    assert!(newcomer_steps >= 240.0, "B's prefills shared A's steps: {newcomer_steps} newcomer steps for 300 requests");
    // How many of them paused a step depends on the machine's load: a step pauses again only once it has run
    // as long as its pauses did, and a descheduled thread stretches both. Alone here: 280-296; beside one busy
    // loop 201-243, two 157-163; on CI, run beside other tests (before the test ran alone), 105.
    assert!(steps_paused >= 60.0, "A's steps were paused for B only {steps_paused} times in 300 requests");
    assert!(
        loaded.ttft_ms.p99 * 10.0 < a_probe.ttft_ms.p50,
        "B waited like A: B's p99 TTFT {:.1} ms, A's {:.1} ms",
        loaded.ttft_ms.p99,
        a_probe.ttft_ms.p50
    );
}

/// `tessera bench serve --no-stream`: whole responses, their tokens counted from `usage`, and no time to
/// first token (there is no first token to time).
#[test]
fn the_load_generator_measures_whole_responses_without_streaming() {
    let s = Server::start(&[]);
    let args = ServeBenchArgs { api_key: None, no_stream: true, ..load(&s, "", 4, 8, 5) };
    let r = rt().block_on(run_load(&args)).unwrap();
    assert_eq!(r.failed, 0);
    assert_eq!((r.output_tokens_per_s * r.seconds).round() as usize, 8 * 5);
    assert!(r.e2e_ms.p50 > 0.0);
    assert_eq!((r.ttft_ms.p50, r.itl_ms.p50), (0.0, 0.0));
}
