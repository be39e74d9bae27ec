//! Traces across processes: a real OTLP receiver (tonic, from opentelemetry-proto's generated collector
//! service), `tessera serve --tp 2` exporting to it, one request carrying a W3C `traceparent`.

mod common;

use std::{
    collections::HashSet,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use common::*;
use opentelemetry_proto::tonic::{
    collector::trace::v1::{
        ExportTraceServiceRequest, ExportTraceServiceResponse,
        trace_service_server::{TraceService, TraceServiceServer},
    },
    common::v1::{AnyValue, KeyValue, any_value::Value as Av},
    trace::v1::Span,
};
use serde_json::json;
use tessera_bench::http_client::HttpClient;

#[derive(Clone, Debug)]
struct Got {
    service: String,
    pid: i64,
    span: Span,
}

#[derive(Clone, Default)]
struct Sink(Arc<Mutex<Vec<Got>>>);

fn attr<'a>(attrs: &'a [KeyValue], key: &str) -> Option<&'a Av> {
    attrs.iter().find(|a| a.key == key).and_then(|a| a.value.as_ref()).and_then(|v: &AnyValue| v.value.as_ref())
}

#[tonic::async_trait]
impl TraceService for Sink {
    async fn export(
        &self,
        req: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut all = self.0.lock().unwrap();
        for rs in req.into_inner().resource_spans {
            let ra = rs.resource.map(|r| r.attributes).unwrap_or_default();
            let service = match attr(&ra, "service.name") {
                Some(Av::StringValue(s)) => s.clone(),
                _ => String::new(),
            };
            let pid = match attr(&ra, "process.pid") {
                Some(Av::IntValue(p)) => *p,
                _ => 0,
            };
            for ss in rs.scope_spans {
                for span in ss.spans {
                    all.push(Got { service: service.clone(), pid, span });
                }
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse { partial_success: None }))
    }
}

/// A receiver on a free port; dropping the returned sender stops it.
fn receiver(rt: &tokio::runtime::Runtime) -> (Sink, String, tokio::sync::oneshot::Sender<()>) {
    let sink = Sink::default();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let listener = rt.block_on(tokio::net::TcpListener::bind("127.0.0.1:0")).unwrap();
    let addr = listener.local_addr().unwrap();
    let svc = TraceServiceServer::new(sink.clone());
    rt.spawn(async move {
        tonic::transport::Server::builder()
            .add_service(svc)
            .serve_with_incoming_shutdown(tonic::transport::server::TcpIncoming::from(listener), async {
                let _ = rx.await;
            })
            .await
            .unwrap();
    });
    (sink, format!("http://{addr}"), tx)
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CLIENT_SPAN: &str = "00f067aa0ba902b7";

#[test]
fn one_trace_spans_coordinator_and_both_workers_with_correct_parents() {
    let rt = rt();
    let (sink, endpoint, _stop) = receiver(&rt);
    let s = Server::start_env(&["--tp", "2", "--otlp-endpoint", &endpoint], &[("OTEL_BSP_SCHEDULE_DELAY", "100")]);
    rt.block_on(async {
        let req = hyper::Request::builder()
            .method("POST")
            .uri(s.url("/v1/completions"))
            .header("traceparent", format!("00-{TRACE}-{CLIENT_SPAN}-01"))
            .body(
                json!({"model": "stories260K", "prompt": "Once upon a time", "max_tokens": 4, "temperature": 0})
                    .to_string(),
            )
            .unwrap();
        let http =
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new()).build_http::<String>();
        let resp = http.request(req).await.unwrap();
        assert_eq!(resp.status(), 200);
        http_body_util::BodyExt::collect(resp.into_body()).await.unwrap();
    });
    let deadline = Instant::now() + Duration::from_secs(30);
    let spans = loop {
        let got: Vec<Got> = sink.0.lock().unwrap().iter().filter(|g| hex(&g.span.trace_id) == TRACE).cloned().collect();
        let worker_pids: HashSet<i64> = got
            .iter()
            .filter(|g| g.service == "tessera-worker" && g.span.name == "collective")
            .map(|g| g.pid)
            .collect();
        let names: HashSet<&str> =
            got.iter().filter(|g| g.service == "tessera-coordinator").map(|g| g.span.name.as_str()).collect();
        if worker_pids.len() == 2
            && ["http.request", "validate", "generate", "queue", "step", "finish"].iter().all(|n| names.contains(n))
        {
            break got;
        }
        assert!(
            Instant::now() < deadline,
            "incomplete trace after 30 s: coordinator {names:?}, workers {worker_pids:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let by_name = |svc: &str, name: &str| -> Vec<&Got> {
        spans.iter().filter(|g| g.service == svc && g.span.name == name).collect()
    };
    let id = |g: &Got| hex(&g.span.span_id);
    let parent = |g: &Got| hex(&g.span.parent_span_id);

    let http = by_name("tessera-coordinator", "http.request");
    assert_eq!(http.len(), 1);
    assert_eq!(parent(http[0]), CLIENT_SPAN, "the HTTP span continues the client's trace");
    let generate = by_name("tessera-coordinator", "generate")[0];
    assert_eq!(parent(by_name("tessera-coordinator", "validate")[0]), id(http[0]));
    assert_eq!(parent(generate), id(http[0]));
    assert_eq!(parent(by_name("tessera-coordinator", "queue")[0]), id(generate));
    assert_eq!(parent(by_name("tessera-coordinator", "finish")[0]), id(generate));
    let a = &generate.span.attributes;
    assert!(matches!(attr(a, "model"), Some(Av::StringValue(m)) if m == "stories260K"));
    assert!(matches!(attr(a, "prompt_tokens"), Some(Av::IntValue(5))));
    assert!(matches!(attr(a, "completion_tokens"), Some(Av::IntValue(4))));
    assert!(matches!(attr(a, "finish_reason"), Some(Av::StringValue(r)) if r == "length"));
    assert!(attr(a, "request_id").is_some());
    assert!(
        spans.iter().all(|g| g.span.attributes.iter().all(|kv| !format!("{kv:?}").contains("Once upon"))),
        "prompt text must not be exported"
    );

    // Four tokens: one prefill step and three decodes, each a child of the request's span.
    let steps = by_name("tessera-coordinator", "step");
    assert_eq!(steps.len(), 4);
    assert!(steps.iter().all(|s| parent(s) == id(generate)));
    let step_ids: HashSet<String> = steps.iter().map(|s| id(s)).collect();

    // Each worker process: grpc (child of a coordinator step) → worker.step → forward → collective.
    let pids: HashSet<i64> = by_name("tessera-worker", "grpc").iter().map(|g| g.pid).collect();
    assert_eq!(pids.len(), 2);
    for pid in pids {
        let of = |name: &str| -> Vec<&Got> {
            by_name("tessera-worker", name).into_iter().filter(|g| g.pid == pid).collect()
        };
        let grpc = of("grpc");
        assert_eq!(grpc.len(), 4, "worker {pid}: one grpc span per step");
        assert!(
            grpc.iter().all(|g| step_ids.contains(&parent(g))),
            "worker {pid}: grpc spans are children of the steps"
        );
        let grpc_ids: HashSet<String> = grpc.iter().map(|g| id(g)).collect();
        let wsteps = of("worker.step");
        assert!(wsteps.iter().all(|g| grpc_ids.contains(&parent(g))));
        let wstep_ids: HashSet<String> = wsteps.iter().map(|g| id(g)).collect();
        let forwards = of("forward");
        assert_eq!(forwards.len(), 4);
        assert!(forwards.iter().all(|g| wstep_ids.contains(&parent(g))));
        let fwd_ids: HashSet<String> = forwards.iter().map(|g| id(g)).collect();
        let coll = of("collective");
        assert!(
            !coll.is_empty() && coll.iter().all(|g| fwd_ids.contains(&parent(g))),
            "worker {pid}: collectives inside the forward pass"
        );
    }
}

#[test]
fn serving_goes_on_unharmed_when_the_collector_goes_away() {
    let rt = rt();
    let (_sink, endpoint, stop) = receiver(&rt);
    let s = Server::start_env(&["--otlp-endpoint", &endpoint], &[("OTEL_BSP_SCHEDULE_DELAY", "100")]);
    let client = HttpClient::new();
    let timed = |n: usize| {
        rt.block_on(async {
            let mut t = Vec::new();
            for _ in 0..n {
                let start = Instant::now();
                assert_eq!(complete(&client, &s, "Once upon a time", 8).await, ", there was a little girl");
                t.push(start.elapsed().as_secs_f64());
            }
            t.sort_by(f64::total_cmp);
            t[n / 2]
        })
    };
    let up = timed(30);
    drop(stop); // the collector is gone: exports now fail
    std::thread::sleep(Duration::from_millis(300));
    let down = timed(30);
    // Exports are batched off the serving path: the median must not move beyond noise.
    assert!(down < up * 2.0 + 0.005, "median latency {up:.4}s with the collector, {down:.4}s without");
}

#[test]
fn a_step_shared_by_two_requests_is_one_span_linked_to_both_traces() {
    let rt = rt();
    let (sink, endpoint, _stop) = receiver(&rt);
    let s = Server::start_env(&["--otlp-endpoint", &endpoint], &[("OTEL_BSP_SCHEDULE_DELAY", "100")]);
    let traces = ["11111111111111111111111111111111", "22222222222222222222222222222222"];
    rt.block_on(async {
        let http =
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new()).build_http::<String>();
        let calls = traces.iter().map(|t| {
            let req = hyper::Request::builder()
                .method("POST")
                .uri(s.url("/v1/completions"))
                .header("traceparent", format!("00-{t}-{CLIENT_SPAN}-01"))
                .body(
                    json!({"model": "stories260K", "prompt": "Once upon a time", "max_tokens": 40, "ignore_eos": true})
                        .to_string(),
                )
                .unwrap();
            let http = http.clone();
            async move {
                let resp = http.request(req).await.unwrap();
                assert_eq!(resp.status(), 200);
                http_body_util::BodyExt::collect(resp.into_body()).await.unwrap();
            }
        });
        futures_util::future::join_all(calls).await;
    });
    let deadline = Instant::now() + Duration::from_secs(30);
    let steps = loop {
        let got = sink.0.lock().unwrap().clone();
        let finished =
            traces.iter().all(|t| got.iter().any(|g| hex(&g.span.trace_id) == *t && g.span.name == "finish"));
        if finished {
            std::thread::sleep(Duration::from_millis(300)); // the last batch of steps
            break sink.0.lock().unwrap().iter().filter(|g| g.span.name == "step").cloned().collect::<Vec<_>>();
        }
        assert!(Instant::now() < deadline, "traces incomplete");
        std::thread::sleep(Duration::from_millis(50));
    };
    // Every step span is unique, and steps that served both requests link to the other trace.
    let ids: HashSet<String> = steps.iter().map(|g| hex(&g.span.span_id)).collect();
    assert_eq!(ids.len(), steps.len());
    let shared: Vec<&Got> = steps.iter().filter(|g| !g.span.links.is_empty()).collect();
    assert!(!shared.is_empty(), "the two requests ran in the same steps: those must be linked");
    for g in &shared {
        let own = hex(&g.span.trace_id);
        assert!(traces.contains(&own.as_str()));
        assert!(g.span.links.iter().all(|l| hex(&l.trace_id) != own && traces.contains(&hex(&l.trace_id).as_str())));
    }
    // 40 tokens each: 80 step spans if nothing were shared; shared steps count once.
    assert!(steps.len() < 80, "{} step spans for two 40-token requests that shared steps", steps.len());
}
