//! Prometheus metrics of the coordinator, named as vLLM names them (under `tessera:`), each labelled with
//! the served model twice: `model_name` as vLLM labels it, and `model`.
//!
//! Gauges are set by the engine loop after every step; counters and histograms are fed where the event
//! happens (the engine loop for tokens and steps, the HTTP layer for request outcomes). Label values are
//! bounded: the model name and a handful of finish reasons.

use std::borrow::Cow;

use prometheus_client::{
    encoding::text::encode,
    metrics::{
        counter::Counter,
        family::Family,
        gauge::Gauge,
        histogram::{Histogram, exponential_buckets},
    },
    registry::Registry,
};

type Labels = Vec<(&'static str, &'static str)>;
/// `rank` label: at most the tensor-parallel degree of values.
type RankLabels = Vec<(&'static str, String)>;
type RankHistograms = Family<RankLabels, Histogram, fn() -> Histogram>;

fn worker_buckets() -> Histogram {
    // 50 µs … ~1.6 s.
    Histogram::new(exponential_buckets(0.000_05, 2.0, 16))
}

pub struct Metrics {
    registry: Registry,
    pub num_requests_running: Gauge,
    pub num_requests_waiting: Gauge,
    pub kv_cache_usage_perc: Gauge<f64, std::sync::atomic::AtomicU64>,
    pub prompt_tokens: Counter,
    pub generation_tokens: Counter,
    pub time_to_first_token: Histogram,
    pub inter_token_latency: Histogram,
    pub e2e_request_latency: Histogram,
    pub request_queue_time: Histogram,
    pub request_success: Family<Labels, Counter>,
    pub request_failure: Family<Labels, Counter>,
    pub prefix_cache_queries: Counter,
    pub prefix_cache_hits: Counter,
    pub num_preemptions: Counter,
    /// Steps that ran a newcomer's prefill alone, ahead of the decodes (fair share, compute-bound backends).
    pub newcomer_steps: Counter,
    pub steps_paused: Counter,
    /// The engine loop's CPU time per step: the whole loop iteration (planning, taking requests in, bookkeeping,
    /// events) less the time its thread spent in the backend.
    pub scheduler_step_seconds: Histogram,
    /// Wall time of the step on the workers, as the coordinator sees it.
    pub step_seconds: Histogram,
    /// Per rank: the step as the worker measured it, and its time in collectives.
    pub worker_step_seconds: RankHistograms,
    pub worker_collective_seconds: RankHistograms,
    /// Per rank: KV cache blocks the worker holds.
    pub worker_kv_cache_blocks: Family<RankLabels, Gauge>,
    /// Per API key id (never the secret): requests by status, and tokens billed by kind.
    pub key_requests: Family<KeyLabels, Counter>,
    pub key_tokens: Family<KeyLabels, Counter>,
    /// Cluster mode: registered workers by state (free, forming, serving, ignored).
    pub cluster_workers: Family<Labels, Gauge>,
    /// Cluster mode: groups by state (forming, serving).
    pub cluster_groups: Family<Labels, Gauge>,
    /// Replicas taking requests.
    pub replicas_serving: Gauge,
    /// Per replica (its group id): tokens routed to it and not yet finished (prompt + max_tokens), and
    /// requests routed to it.
    pub replica_outstanding_tokens: Family<KeyLabels, Gauge>,
    pub replica_requests: Family<KeyLabels, Counter>,
    /// Replicas that failed (a worker died, a step failed or timed out, a lease expired).
    pub replica_failures: Counter,
    /// Sequences moved from a failed replica to a healthy one mid-request.
    pub migrated_sequences: Counter,
}

/// `key_id` plus `status` (completed, cancelled, error) or `kind` (prompt, cached, completion). Key ids come
/// from the operator's key file, so their number is bounded by it.
pub type KeyLabels = Vec<(&'static str, String)>;

fn latency_buckets() -> impl Iterator<Item = f64> {
    // 0.5 ms … ~65 s.
    exponential_buckets(0.0005, 2.0, 18)
}

impl Metrics {
    pub fn new(model: &str) -> Self {
        // `model_name` is vLLM's label, so its dashboards and autoscalers work unchanged; `model` is the one
        // this project's Grafana dashboard (and existing alerts) select on.
        let labels = [
            (Cow::Borrowed("model"), Cow::Owned(model.to_string())),
            (Cow::Borrowed("model_name"), Cow::Owned(model.to_string())),
        ];
        let mut registry = Registry::with_labels(labels.into_iter());
        let m = Metrics {
            num_requests_running: Gauge::default(),
            num_requests_waiting: Gauge::default(),
            kv_cache_usage_perc: Gauge::default(),
            prompt_tokens: Counter::default(),
            generation_tokens: Counter::default(),
            time_to_first_token: Histogram::new(latency_buckets()),
            inter_token_latency: Histogram::new(latency_buckets()),
            e2e_request_latency: Histogram::new(latency_buckets()),
            request_queue_time: Histogram::new(latency_buckets()),
            request_success: Family::default(),
            request_failure: Family::default(),
            prefix_cache_queries: Counter::default(),
            prefix_cache_hits: Counter::default(),
            num_preemptions: Counter::default(),
            newcomer_steps: Counter::default(),
            steps_paused: Counter::default(),
            scheduler_step_seconds: Histogram::new(exponential_buckets(0.000_005, 2.0, 16)),
            step_seconds: Histogram::new(latency_buckets()),
            worker_step_seconds: Family::new_with_constructor(worker_buckets),
            worker_collective_seconds: Family::new_with_constructor(worker_buckets),
            worker_kv_cache_blocks: Family::default(),
            key_requests: Family::default(),
            key_tokens: Family::default(),
            cluster_workers: Family::default(),
            cluster_groups: Family::default(),
            replicas_serving: Gauge::default(),
            replica_outstanding_tokens: Family::default(),
            replica_requests: Family::default(),
            replica_failures: Counter::default(),
            migrated_sequences: Counter::default(),
            registry: Registry::default(),
        };
        for register in
            [Self::register_requests, Self::register_scheduling, Self::register_steps, Self::register_keys_and_cluster]
        {
            register(&m, &mut registry);
        }
        for reason in ["stop", "length", "abort"] {
            let _ = m.request_success.get_or_create(&vec![("finished_reason", reason)]);
        }
        Metrics { registry, ..m }
    }

    /// Requests and tokens, with vLLM's names.
    fn register_requests(&self, r: &mut Registry) {
        r.register("tessera:num_requests_running", "Requests running on a replica", self.num_requests_running.clone());
        r.register(
            "tessera:num_requests_waiting",
            "Requests waiting to be scheduled",
            self.num_requests_waiting.clone(),
        );
        r.register(
            "tessera:kv_cache_usage_perc",
            "Fraction of KV cache blocks in use (1 = full)",
            self.kv_cache_usage_perc.clone(),
        );
        // Counters get `_total` appended by the encoder.
        r.register("tessera:prompt_tokens", "Prompt tokens processed", self.prompt_tokens.clone());
        r.register("tessera:generation_tokens", "Tokens generated", self.generation_tokens.clone());
        r.register("tessera:time_to_first_token_seconds", "Time to first token", self.time_to_first_token.clone());
        r.register(
            "tessera:inter_token_latency_seconds",
            "Time between consecutive output tokens",
            self.inter_token_latency.clone(),
        );
        r.register(
            "tessera:e2e_request_latency_seconds",
            "Request latency, arrival to last token",
            self.e2e_request_latency.clone(),
        );
        r.register(
            "tessera:request_queue_time_seconds",
            "Time a request waited before its first step",
            self.request_queue_time.clone(),
        );
        r.register(
            "tessera:request_success",
            "Requests finished, by reason (stop, length, abort)",
            self.request_success.clone(),
        );
        r.register(
            "tessera:request_failure",
            "Requests that ended with an error, by kind",
            self.request_failure.clone(),
        );
    }

    /// The prefix cache, preemptions and fair share.
    fn register_scheduling(&self, r: &mut Registry) {
        r.register(
            "tessera:prefix_cache_queries",
            "Prompt blocks looked up in the prefix cache",
            self.prefix_cache_queries.clone(),
        );
        r.register(
            "tessera:prefix_cache_hits",
            "Prompt blocks found in the prefix cache",
            self.prefix_cache_hits.clone(),
        );
        r.register(
            "tessera:num_preemptions",
            "Sequences preempted, for lack of KV blocks or for another key's fair share",
            self.num_preemptions.clone(),
        );
        r.register(
            "tessera:newcomer_steps",
            "Steps that ran the prefill of a key with nothing running alone, ahead of the decodes",
            self.newcomer_steps.clone(),
        );
        r.register(
            "tessera:steps_paused",
            "Steps paused inside the forward pass so that a newcomer's prefill (counted in newcomer_steps) ran first",
            self.steps_paused.clone(),
        );
    }

    /// Step times, on the coordinator and as each worker measured them.
    fn register_steps(&self, r: &mut Registry) {
        r.register(
            "tessera:scheduler_step_seconds",
            "Engine loop CPU time per step (planning, bookkeeping, events), excluding the backend's forward pass",
            self.scheduler_step_seconds.clone(),
        );
        r.register("tessera:step_seconds", "Step wall time on the workers", self.step_seconds.clone());
        r.register(
            "tessera:worker_step_seconds",
            "Step time measured by each worker, by rank",
            self.worker_step_seconds.clone(),
        );
        r.register(
            "tessera:worker_collective_seconds",
            "Time each worker spent in collectives per step, by rank",
            self.worker_collective_seconds.clone(),
        );
        r.register(
            "tessera:worker_kv_cache_blocks",
            "KV cache blocks each worker holds, by rank",
            self.worker_kv_cache_blocks.clone(),
        );
    }

    /// Per API key, cluster membership, and replicas.
    fn register_keys_and_cluster(&self, r: &mut Registry) {
        r.register(
            "tessera:key_requests",
            "Requests per API key id, by status (completed, cancelled, error, limited)",
            self.key_requests.clone(),
        );
        r.register(
            "tessera:key_tokens",
            "Tokens billed per API key id, by kind (prompt, cached, completion)",
            self.key_tokens.clone(),
        );
        r.register(
            "tessera:cluster_workers",
            "Registered workers by state (free, forming, serving, ignored)",
            self.cluster_workers.clone(),
        );
        r.register(
            "tessera:cluster_groups",
            "Tensor-parallel groups by state (forming, serving)",
            self.cluster_groups.clone(),
        );
        r.register("tessera:replicas_serving", "Model replicas taking requests", self.replicas_serving.clone());
        r.register(
            "tessera:replica_outstanding_tokens",
            "Per replica: tokens routed and not yet finished (prompt + max_tokens)",
            self.replica_outstanding_tokens.clone(),
        );
        r.register("tessera:replica_requests", "Per replica: requests routed to it", self.replica_requests.clone());
        r.register(
            "tessera:replica_failures",
            "Replicas failed (worker lost, step error or timeout, lease expired)",
            self.replica_failures.clone(),
        );
        r.register(
            "tessera:migrated_sequences",
            "Sequences moved from a failed replica to a healthy one mid-request",
            self.migrated_sequences.clone(),
        );
    }

    /// A request of key `key_id` refused by one of its limits (429).
    pub fn key_limited(&self, key_id: &str) {
        self.key_requests.get_or_create(&vec![("key_id", key_id.to_string()), ("status", "limited".into())]).inc();
    }

    /// The exposition, in the OpenMetrics text format.
    pub fn render(&self) -> String {
        let mut s = String::new();
        encode(&mut s, &self.registry).expect("writing to a String cannot fail");
        s
    }
}

/// Content type of [`Metrics::render`].
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_every_name_with_the_model_label() {
        let m = Metrics::new("stories260K");
        m.prompt_tokens.inc_by(5);
        m.time_to_first_token.observe(0.01);
        m.request_success.get_or_create(&vec![("finished_reason", "stop")]).inc();
        let text = m.render();
        for name in [
            "tessera:num_requests_running{model=\"stories260K\",model_name=\"stories260K\"} 0",
            "tessera:prompt_tokens_total{model=\"stories260K\",model_name=\"stories260K\"} 5",
            "tessera:time_to_first_token_seconds_count{model=\"stories260K\",model_name=\"stories260K\"} 1",
            "tessera:request_success_total{model=\"stories260K\",model_name=\"stories260K\",finished_reason=\"stop\"} 1",
            "tessera:kv_cache_usage_perc{model=\"stories260K\",model_name=\"stories260K\"} 0",
        ] {
            assert!(text.contains(name), "missing {name} in\n{text}");
        }
    }
}

#[cfg(test)]
mod dashboard_tests {
    use super::*;

    /// The Grafana dashboard in `deploy/grafana/` parses and queries only metrics Tessera exports.
    #[test]
    fn the_dashboard_queries_only_exported_metrics() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/grafana/tessera.json");
        let dash: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        let m = Metrics::new("m");
        m.request_failure.get_or_create(&vec![("kind", "backend")]).inc();
        m.worker_step_seconds.get_or_create(&vec![("rank", "0".to_string())]).observe(0.1);
        m.worker_collective_seconds.get_or_create(&vec![("rank", "0".to_string())]).observe(0.1);
        m.key_requests.get_or_create(&vec![("key_id", "k".into()), ("status", "completed".into())]).inc();
        m.key_tokens.get_or_create(&vec![("key_id", "k".into()), ("kind", "prompt".into())]).inc();
        m.replica_outstanding_tokens.get_or_create(&vec![("replica", "1".into())]).set(1);
        let exported: std::collections::HashSet<String> = m
            .render()
            .lines()
            .filter(|l| !l.starts_with('#'))
            .filter_map(|l| l.split(['{', ' ']).next().map(str::to_string))
            .collect();
        let mut queried = 0;
        for p in dash["panels"].as_array().unwrap() {
            for t in p["targets"].as_array().unwrap() {
                let expr = t["expr"].as_str().unwrap();
                for name in expr
                    .split(|c: char| !(c.is_alphanumeric() || c == '_' || c == ':'))
                    .filter(|w| w.starts_with("tessera:"))
                {
                    assert!(
                        exported.contains(name),
                        "panel {:?} queries {name}, which Tessera does not export",
                        p["title"]
                    );
                    queried += 1;
                }
            }
        }
        assert!(queried >= 20);
    }
}
