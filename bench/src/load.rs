//! `tessera bench serve`: a load generator for a running Tessera (or any OpenAI-compatible) server.
//!
//! `--concurrency` clients each send streaming completions one after another until `--requests` have been
//! sent (`--no-stream`: whole responses, and no time to first token or inter-token latency to report). Prompts are random token ids (distinct per request, so the prefix cache does not flatter the
//! numbers) and generation ignores EOS, so every request produces exactly `--max-tokens` tokens. Reports
//! request and token throughput and TTFT, inter-token and end-to-end latency percentiles; against a
//! Tessera server also the scheduler's own CPU time per step, read from `/metrics`.

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use clap::Args;
use serde::Serialize;
use serde_json::{Value, json};

use crate::http_client::HttpClient;

#[derive(Args, Debug, Clone)]
pub struct ServeBenchArgs {
    /// Base URL of the server.
    #[arg(long, default_value = "http://127.0.0.1:8000")]
    pub url: String,
    /// Requests in flight at once.
    #[arg(long, default_value_t = 8)]
    pub concurrency: usize,
    /// Requests in total.
    #[arg(long, default_value_t = 64)]
    pub requests: usize,
    /// Prompt length in tokens.
    #[arg(long, default_value_t = 128)]
    pub prompt_len: usize,
    /// Tokens generated per request.
    #[arg(long, default_value_t = 128)]
    pub max_tokens: usize,
    /// Model name (default: the first one `/v1/models` lists); several, comma-separated, take turns
    /// request by request (LoRA adapters over one base).
    #[arg(long)]
    pub model: Option<String>,
    /// Vocabulary to draw prompt ids from (ids 3..vocab).
    #[arg(long, default_value_t = 500)]
    pub vocab: u32,
    /// API key, sent as `Authorization: Bearer`.
    #[arg(long, value_name = "KEY")]
    pub api_key: Option<String>,
    /// Ask for whole responses instead of event streams (clients that do not stream; only end-to-end
    /// latency is measured).
    #[arg(long)]
    pub no_stream: bool,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
    /// A JSON object merged into every request body (e.g. a `response_format`, to measure constrained
    /// decoding).
    #[arg(long, value_name = "JSON", value_parser = parse_object)]
    pub extra_body: Option<serde_json::Map<String, Value>>,
}

fn parse_object(s: &str) -> Result<serde_json::Map<String, Value>, String> {
    match serde_json::from_str(s) {
        Ok(Value::Object(o)) => Ok(o),
        Ok(_) => Err("expected a JSON object".into()),
        Err(e) => Err(e.to_string()),
    }
}

#[derive(Serialize, Debug, Default)]
pub struct Percentiles {
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub mean: f64,
    /// The longest (for inter-token latency: the longest any stream waited between two tokens).
    pub max: f64,
}

fn percentiles(mut v: Vec<f64>) -> Percentiles {
    if v.is_empty() {
        return Percentiles::default();
    }
    v.sort_by(f64::total_cmp);
    let at = |q: f64| v[((q * (v.len() - 1) as f64).round() as usize).min(v.len() - 1)];
    let mean = v.iter().sum::<f64>() / v.len() as f64;
    Percentiles { p50: at(0.5), p90: at(0.9), p99: at(0.99), mean, max: v[v.len() - 1] }
}

#[derive(Serialize, Debug)]
pub struct ServeReport {
    pub concurrency: usize,
    pub requests: usize,
    pub failed: usize,
    pub seconds: f64,
    pub requests_per_s: f64,
    pub output_tokens_per_s: f64,
    pub ttft_ms: Percentiles,
    pub itl_ms: Percentiles,
    pub e2e_ms: Percentiles,
    /// Mean coordinator CPU time per step during the run (Tessera only).
    pub scheduler_us_per_step: Option<f64>,
    pub steps: Option<f64>,
}

#[derive(Default)]
struct Samples {
    ttft: Vec<f64>,
    itl: Vec<f64>,
    e2e: Vec<f64>,
    tokens: usize,
    failed: usize,
}

/// Sum and count of a histogram in a Prometheus exposition.
fn histogram(metrics: &str, name: &str) -> Option<(f64, f64)> {
    let get = |suffix: &str| {
        metrics
            .lines()
            .find(|l| l.starts_with(&format!("{name}_{suffix}{{")) || l.starts_with(&format!("{name}_{suffix} ")))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse::<f64>().ok())
    };
    Some((get("sum")?, get("count")?))
}

/// One request without streaming: its end-to-end latency and completion tokens.
async fn one_whole(client: &HttpClient, url: &str, body: &Value, samples: &Mutex<Samples>) {
    let start = Instant::now();
    let tokens = match client.post_json(url, body).await {
        Ok(r) if r.status.is_success() => r.json().ok().and_then(|v| v["usage"]["completion_tokens"].as_u64()),
        _ => None,
    };
    let mut s = samples.lock().expect("samples");
    match tokens {
        Some(t) => {
            s.e2e.push(start.elapsed().as_secs_f64());
            s.tokens += t as usize;
        }
        None => s.failed += 1,
    }
}

async fn one(client: &HttpClient, url: &str, body: &Value, samples: &Mutex<Samples>) {
    let start = Instant::now();
    let mut last: Option<Instant> = None;
    let mut ttft = None;
    let mut itl = Vec::new();
    let mut tokens = 0;
    let mut error = false;
    let status = client
        .post_stream(url, body, |ev| {
            if ev.data == "[DONE]" {
                return true;
            }
            let Ok(v) = serde_json::from_str::<Value>(&ev.data) else {
                error = true;
                return false;
            };
            if v.get("error").is_some() {
                error = true;
                return false;
            }
            if let Some(u) = v.get("usage").and_then(|u| u.get("completion_tokens")).and_then(Value::as_u64) {
                tokens = u as usize;
            }
            let has_text = v["choices"].get(0).and_then(|c| c["text"].as_str()).is_some_and(|t| !t.is_empty());
            if has_text {
                match last {
                    None => ttft = Some((ev.at - start).as_secs_f64()),
                    Some(prev) => itl.push((ev.at - prev).as_secs_f64()),
                }
                last = Some(ev.at);
            }
            true
        })
        .await;
    let mut s = samples.lock().expect("samples");
    match status {
        Ok(st) if st.is_success() && !error => {
            s.e2e.push(start.elapsed().as_secs_f64());
            if let Some(t) = ttft {
                s.ttft.push(t);
            }
            s.itl.extend(itl);
            s.tokens += tokens;
        }
        _ => s.failed += 1,
    }
}

/// Request `i`'s prompt: `len` pseudo-random token ids below `vocab` (xorshift, seeded by `i`), never
/// the first three (special tokens in most vocabularies).
fn prompt_tokens(i: usize, len: usize, vocab: u32) -> Vec<u32> {
    let mut x = (i as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            3 + (x % (vocab.max(4) as u64 - 3)) as u32
        })
        .collect()
}

/// The scheduler's mean CPU time per step (µs) and the steps taken, from the server's metrics before and
/// after the run.
fn scheduler_cost(before: Option<String>, after: Option<String>) -> Option<(f64, f64)> {
    let name = "tessera:scheduler_step_seconds";
    match (histogram(&before?, name), histogram(&after?, name)) {
        (Some((s0, c0)), Some((s1, c1))) if c1 > c0 => Some(((s1 - s0) / (c1 - c0) * 1e6, c1 - c0)),
        _ => None,
    }
}

pub async fn run_load(a: &ServeBenchArgs) -> Result<ServeReport> {
    if a.concurrency == 0 || a.requests == 0 || a.prompt_len == 0 || a.max_tokens == 0 {
        bail!("--concurrency, --requests, --prompt-len and --max-tokens must be at least 1");
    }
    let client = match &a.api_key {
        Some(k) => HttpClient::new().with_key(k),
        None => HttpClient::new(),
    };
    let base = a.url.trim_end_matches('/').to_string();
    let models: Arc<Vec<String>> = Arc::new(match &a.model {
        Some(m) => m.split(',').map(str::to_string).collect(),
        None => {
            let v = client.get(&format!("{base}/v1/models")).await?.json()?;
            vec![v["data"][0]["id"].as_str().context("/v1/models lists no model")?.to_string()]
        }
    });
    let metrics_before =
        client.get(&format!("{base}/metrics")).await.ok().map(|r| String::from_utf8_lossy(&r.body).into_owned());
    let next = Arc::new(AtomicUsize::new(0));
    let samples = Arc::new(Mutex::new(Samples::default()));
    let url = format!("{base}/v1/completions");
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..a.concurrency {
        let (client, next, samples, url, models, a) =
            (client.clone(), next.clone(), samples.clone(), url.clone(), models.clone(), a.clone());
        tasks.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= a.requests {
                    break;
                }
                let prompt = prompt_tokens(i, a.prompt_len, a.vocab);
                let mut body = json!({
                    "model": models[i % models.len()], "prompt": prompt, "max_tokens": a.max_tokens, "temperature": 0,
                    "ignore_eos": true,
                });
                body.as_object_mut().expect("an object").extend(a.extra_body.clone().unwrap_or_default());
                if a.no_stream {
                    one_whole(&client, &url, &body, &samples).await;
                    continue;
                }
                body["stream"] = json!(true);
                body["stream_options"] = json!({"include_usage": true});
                one(&client, &url, &body, &samples).await;
            }
        }));
    }
    for t in tasks {
        t.await?;
    }
    let seconds = started.elapsed().as_secs_f64();
    let metrics_after =
        client.get(&format!("{base}/metrics")).await.ok().map(|r| String::from_utf8_lossy(&r.body).into_owned());
    let sched = scheduler_cost(metrics_before, metrics_after);
    let s = std::mem::take(&mut *samples.lock().expect("samples"));
    let ms = |v: Vec<f64>| {
        let p = percentiles(v);
        Percentiles { p50: p.p50 * 1e3, p90: p.p90 * 1e3, p99: p.p99 * 1e3, mean: p.mean * 1e3, max: p.max * 1e3 }
    };
    Ok(ServeReport {
        concurrency: a.concurrency,
        requests: a.requests,
        failed: s.failed,
        seconds,
        requests_per_s: (a.requests - s.failed) as f64 / seconds,
        output_tokens_per_s: s.tokens as f64 / seconds,
        ttft_ms: ms(s.ttft),
        itl_ms: ms(s.itl),
        e2e_ms: ms(s.e2e),
        scheduler_us_per_step: sched.map(|x| x.0),
        steps: sched.map(|x| x.1),
    })
}

pub fn run(a: ServeBenchArgs) -> Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let r = rt
        .block_on(async { tokio::time::timeout(Duration::from_secs(3600), run_load(&a)).await })
        .context("the load run took over an hour")??;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&r)?);
        return Ok(());
    }
    println!(
        "concurrency {}  requests {} ({} failed)  prompt {} tokens  output {} tokens",
        r.concurrency, r.requests, r.failed, a.prompt_len, a.max_tokens
    );
    println!(
        "duration {:.2} s  {:.2} requests/s  {:.1} output tokens/s",
        r.seconds, r.requests_per_s, r.output_tokens_per_s
    );
    println!("{:<18} {:>10} {:>10} {:>10} {:>10}", "latency (ms)", "p50", "p90", "p99", "mean");
    for (name, p) in [("time to 1st token", &r.ttft_ms), ("inter-token", &r.itl_ms), ("end to end", &r.e2e_ms)] {
        println!("{name:<18} {:>10.1} {:>10.1} {:>10.1} {:>10.1}", p.p50, p.p90, p.p99, p.mean);
    }
    if let Some(us) = r.scheduler_us_per_step {
        println!("scheduler CPU time per step: {us:.1} µs (mean over {} steps)", r.steps.unwrap_or(0.0));
    }
    Ok(())
}
