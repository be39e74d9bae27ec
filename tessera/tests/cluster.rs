//! Tensor parallelism across real worker processes: real gRPC on loopback, real TCP collectives.

mod common;

use std::{
    io::Read,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use serde_json::Value;
use tessera::local_cluster::LocalCluster;
use tessera_coordinator::engine::group::{GroupClient, GroupTimeouts};
use tessera_proto::auth::ClusterToken;
use tessera_proto::v1::{
    InfoRequest, LoadModelRequest, SamplingParams as PbParams, SequenceStep, StepRequest, worker_client::WorkerClient,
};
use tessera_worker::{Engine, Model, SamplingParams, Shard, StepSeq, collective::Single, kv_cache::KvCache};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn exe() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_tessera"))
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap()
}

fn golden_prompts(dir: &Path) -> Vec<Vec<u32>> {
    let g: Value = serde_json::from_str(&std::fs::read_to_string(dir.join("golden.json")).unwrap()).unwrap();
    g["cases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["prompt_ids"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect())
        .collect()
}

const BLOCKS: u32 = 8;
const STEPS: usize = 12;

/// Greedy-decodes all prompts together for STEPS tokens; returns per prompt the ids and each step's logits.
fn run(
    mut step: impl FnMut(&[StepSeq]) -> Vec<(u64, u32, Vec<f32>)>,
    prompts: &[Vec<u32>],
) -> Vec<(Vec<u32>, Vec<Vec<f32>>)> {
    let greedy = SamplingParams::greedy();
    let tables: Vec<Vec<u32>> = (0..prompts.len() as u32).map(|i| (i * BLOCKS..(i + 1) * BLOCKS).collect()).collect();
    let mut seqs: Vec<Vec<u32>> = prompts.to_vec();
    let mut out: Vec<(Vec<u32>, Vec<Vec<f32>>)> = vec![(Vec::new(), Vec::new()); prompts.len()];
    for s in 0..STEPS {
        let batch: Vec<StepSeq> = seqs
            .iter()
            .enumerate()
            .map(|(i, toks)| {
                let start = if s == 0 { 0 } else { toks.len() - 1 };
                StepSeq {
                    id: i as u64,
                    tokens: &toks[start..],
                    start_pos: start,
                    block_table: &tables[i],
                    sample: Some(&greedy),
                    penalty_context: if s == 0 { toks } else { &[] },
                    output_context: &[],
                    starts: false,
                    score_prompt: None,
                    allowed: None,
                    adapter: 0,
                }
            })
            .collect();
        for (id, tok, logits) in step(&batch) {
            let i = id as usize;
            out[i].0.push(tok);
            out[i].1.push(logits);
            seqs[i].push(tok);
        }
    }
    out
}

#[test]
fn tensor_parallel_groups_match_the_single_process_engine() {
    let models = [
        "models/stories260K",
        "testdata/models/tiny-llama3",
        "testdata/models/tiny-mistral",
        "testdata/models/tiny-qwen2",
        "testdata/models/tiny-llama-bf16-sharded",
    ];
    for m in models {
        let dir = repo().join(m);
        let prompts = golden_prompts(&dir);
        let model = Model::load(&dir, Shard::WHOLE).unwrap();
        let cache = KvCache::new(&model.kv_geometry(), prompts.len() * BLOCKS as usize, 16).unwrap();
        let mut engine = Engine::new(model, cache, Box::new(Single));
        let reference = run(
            |b| {
                let (s, l) = engine.step_with_logits(b).unwrap();
                let l = l.unwrap();
                let v = l.shape()[1];
                s.into_iter()
                    .enumerate()
                    .map(|(i, x)| (x.id, x.sampled.token, l.as_f32().unwrap()[i * v..(i + 1) * v].to_vec()))
                    .collect()
            },
            &prompts,
        );
        let tps: &[usize] = if m.ends_with("qwen2") { &[2] } else { &[2, 4] };
        for &tp in tps {
            let cluster = LocalCluster::start_with(exe(), tp, 1, 16).unwrap();
            let mut group = GroupClient::connect(
                &cluster.addrs,
                dir.to_str().unwrap(),
                16 << 20,
                16,
                &format!("test-{tp}"),
                GroupTimeouts::default(),
                &ClusterToken::none(),
            )
            .unwrap();
            let got = run(
                |b| group.step_full(b, true).unwrap().into_iter().map(|(s, l)| (s.id, s.sampled.token, l)).collect(),
                &prompts,
            );
            let mut worst = 0f32;
            for (g, r) in got.iter().zip(&reference) {
                assert_eq!(g.0, r.0, "{m} tp={tp}: greedy ids differ from tp=1");
                for (gl, rl) in g.1.iter().zip(&r.1) {
                    assert_eq!(gl.len(), rl.len());
                    worst = gl.iter().zip(rl).map(|(a, b)| (a - b).abs()).fold(worst, f32::max);
                }
            }
            println!("{m} tp={tp}: worst |logit - tp1| = {worst:.2e}");
            assert!(worst < 1e-4, "{m} tp={tp}: logits differ by {worst}");
        }
    }
}

#[test]
fn a_split_the_model_cannot_take_is_refused_clearly() {
    let qwen = repo().join("testdata/models/tiny-qwen2");
    let o = Command::new(exe())
        .args(["generate", "--tp", "4", "--model", qwen.to_str().unwrap(), "--prompt", "hi"])
        .output()
        .unwrap();
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("tp = 4 does not divide num_attention_heads = 6"), "{err}");
    assert!(!err.contains("panicked"));
}

/// Starts `tessera generate --tp 2` on a model slow enough that a 4000-token generation is surely still
/// running when a test strikes, and returns once text has arrived (generation has started).
fn long_tp2_generation(stderr: Stdio) -> (tempfile::TempDir, std::process::Child, std::process::ChildStdout) {
    let tmp = tempfile::tempdir().unwrap();
    let shape = tessera_bench::synth::Shape {
        hidden: 256,
        intermediate: 512,
        layers: 6,
        heads: 8,
        kv_heads: 4,
        vocab: 512,
        context: 4096,
    };
    tessera_bench::synth::write_model(tmp.path(), shape, 5).unwrap();
    for f in ["tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(repo().join("models/stories260K").join(f), tmp.path().join(f)).unwrap();
    }
    let mut child = Command::new(exe())
        .args(["generate", "--tp", "2", "--model", tmp.path().to_str().unwrap(), "--prompt", "Once upon a time"])
        .args(["--max-tokens", "4000", "--ignore-eos", "--temperature", "0"])
        .stdout(Stdio::piped())
        .stderr(stderr)
        .spawn()
        .unwrap();
    let mut stdout = child.stdout.take().unwrap();
    let mut first = [0u8; 1];
    stdout.read_exact(&mut first).unwrap();
    (tmp, child, stdout)
}

fn alive(pid: u32) -> bool {
    // A zombie has exited; only its parent's wait is missing.
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| !s[s.rfind(')').unwrap() + 2..].starts_with('Z'))
}

#[test]
fn a_worker_killed_mid_generation_fails_the_request_fast_and_leaves_no_process() {
    let (_model, mut child, mut stdout) = long_tp2_generation(Stdio::piped());
    let workers = common::children_of(child.id());
    assert_eq!(workers.len(), 2, "expected two worker processes, found {workers:?}");
    let victim = workers[1];
    let killed_at = Instant::now();
    assert!(Command::new("kill").args(["-9", &victim.to_string()]).status().unwrap().success());
    std::thread::spawn(move || std::io::copy(&mut stdout, &mut std::io::sink()));
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(
            killed_at.elapsed() < Duration::from_secs(10),
            "tessera generate still running 10 s after a worker died"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    let waited = killed_at.elapsed();
    let mut err = String::new();
    child.stderr.take().unwrap().read_to_string(&mut err).unwrap();
    assert!(!status.success());
    assert!(waited < Duration::from_secs(5), "took {waited:?} to notice");
    assert!(err.contains("tensor-parallel group failed") && err.contains("worker rank"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    // The surviving worker is stopped too.
    let deadline = Instant::now() + Duration::from_secs(5);
    while workers.iter().any(|&p| alive(p)) {
        assert!(
            Instant::now() < deadline,
            "worker processes left behind: {:?}",
            workers.iter().filter(|&&p| alive(p)).collect::<Vec<_>>()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn malformed_steps_get_invalid_argument_and_the_worker_keeps_serving() {
    let rt = rt();
    let cluster = LocalCluster::start_with(exe(), 1, 1, 4).unwrap();
    let dir = repo().join("models/stories260K");
    rt.block_on(async {
        let mut c = WorkerClient::connect(format!("http://{}", cluster.addrs[0])).await.unwrap();
        let info = c.info(InfoRequest::default()).await.unwrap().into_inner();
        assert_eq!(info.protocol, "tessera.v1");
        assert!(info.model.is_empty());
        assert_eq!(info.device, "cpu");
        // A CPU worker makes no NCCL id; a coordinator then keeps the group on TCP collectives.
        let info = c.info(InfoRequest { create_nccl_id: true }).await.unwrap().into_inner();
        assert!(info.nccl_unique_id.is_empty());
        let nccl = LoadModelRequest {
            model_path: dir.to_string_lossy().into(),
            world_size: 2,
            rendezvous: Some(tessera_proto::v1::Rendezvous {
                kind: Some(tessera_proto::v1::rendezvous::Kind::NcclUniqueId(vec![0; 128])),
            }),
            ..Default::default()
        };
        let e = c.load_model(nccl).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
        assert!(e.message().contains("NCCL rendezvous on a CPU worker"), "{}", e.message());
        let step = |seq: SequenceStep| StepRequest { sequences: vec![seq], ..Default::default() };
        // Before LoadModel: no model.
        let e = c
            .step(step(SequenceStep { sequence_id: 1, token_ids: vec![1], block_table: vec![0], ..Default::default() }))
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::FailedPrecondition);
        let e = c
            .load_model(LoadModelRequest { model_path: "/no/such/dir".into(), world_size: 1, ..Default::default() })
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
        assert!(e.message().contains("/no/such/dir"), "{}", e.message());
        let loaded = c
            .load_model(LoadModelRequest {
                model_path: dir.to_string_lossy().into(),
                world_size: 1,
                kv_cache_bytes: 1 << 20,
                block_size: 16,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        let blocks = loaded.num_kv_blocks;
        assert!(blocks > 2);
        let bad = [
            (
                SequenceStep {
                    sequence_id: 9,
                    token_ids: vec![5],
                    start_position: 7,
                    block_table: vec![0],
                    ..Default::default()
                },
                "unknown sequence",
            ),
            (
                SequenceStep {
                    sequence_id: 9,
                    token_ids: vec![5],
                    block_table: vec![blocks + 3],
                    ..Default::default()
                },
                "out of range",
            ),
            (
                SequenceStep {
                    sequence_id: 9,
                    token_ids: vec![5],
                    start_position: 900,
                    block_table: vec![0],
                    ..Default::default()
                },
                "exceed the model's context",
            ),
            (
                SequenceStep { sequence_id: 9, token_ids: vec![], block_table: vec![0], ..Default::default() },
                "no tokens",
            ),
        ];
        for (seq, msg) in bad {
            let e = c.step(step(seq)).await.unwrap_err();
            assert_eq!(e.code(), tonic::Code::InvalidArgument, "{}", e.message());
            assert!(e.message().contains(msg), "expected {msg:?}: {}", e.message());
        }
        // Still serving: the golden first token.
        let good = SequenceStep {
            sequence_id: 9,
            token_ids: vec![1, 403, 407, 261, 378],
            block_table: vec![0],
            sample: true,
            sampling: Some(PbParams { temperature: 0.0, top_p: 1.0, repetition_penalty: 1.0, ..Default::default() }),
            ..Default::default()
        };
        let r = c.step(step(good)).await.unwrap().into_inner();
        assert_eq!(r.tokens[0].token_id, 432);
        // Later steps carry what changed: the new token, no block table, no sampling parameters; the
        // worker uses what it kept (the golden second token).
        let delta = SequenceStep {
            sequence_id: 9,
            token_ids: vec![432],
            start_position: 5,
            sample: true,
            incremental: true,
            ..Default::default()
        };
        let r = c.step(step(delta.clone())).await.unwrap().into_inner();
        assert_eq!(r.tokens[0].token_id, 383);
        // An incremental step of a sequence the worker holds nothing of: refused, with the ids to resend.
        let e = c.step(step(SequenceStep { sequence_id: 77, ..delta })).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{}", e.message());
        assert!(e.message().contains("77") && e.message().contains("send them in full"), "{}", e.message());
        assert_eq!(e.metadata().get("tessera-resend").and_then(|v| v.to_str().ok()), Some("77"));
        let info = c.info(InfoRequest::default()).await.unwrap().into_inner();
        assert_eq!(info.num_kv_blocks, blocks);
    });
}

/// Sequence 1's greedy step of `tokens` from position 0 over `block_table`.
fn greedy_step<'a>(tokens: &'a [u32], block_table: &'a [u32], greedy: &'a SamplingParams) -> StepSeq<'a> {
    tessera_bench::cpu::greedy_step(1, tokens, 0, block_table, greedy)
}

#[test]
fn a_group_refuses_a_bad_step_without_failing() {
    let cluster = LocalCluster::start_with(exe(), 2, 1, 4).unwrap();
    let dir = repo().join("models/stories260K");
    let mut group = GroupClient::connect(
        &cluster.addrs,
        dir.to_str().unwrap(),
        1 << 20,
        16,
        "g",
        GroupTimeouts::default(),
        &ClusterToken::none(),
    )
    .unwrap();
    let greedy = SamplingParams::greedy();
    let prompt = [1u32, 403, 407, 261, 378];
    let bad = [greedy_step(&prompt, &[9999], &greedy)];
    let e = group.step_full(&bad, false).unwrap_err().to_string();
    assert!(e.contains("refused the step") && e.contains("block 9999"), "{e}");
    let good = [greedy_step(&prompt, &[0], &greedy)];
    assert_eq!(group.step_full(&good, false).unwrap()[0].0.sampled.token, 432);
}

#[test]
fn calls_without_the_cluster_token_and_steps_for_one_rank_are_refused_and_the_group_keeps_serving() {
    let token = ClusterToken::generate();
    let cluster = LocalCluster::start_with_args(exe(), 2, 1, 4, &[], &token).unwrap();
    let dir = repo().join("models/stories260K");
    // Without the token a coordinator cannot even form the group.
    let e = GroupClient::connect(
        &cluster.addrs,
        dir.to_str().unwrap(),
        1 << 20,
        16,
        "g",
        GroupTimeouts::default(),
        &ClusterToken::none(),
    )
    .err()
    .unwrap();
    assert!(format!("{e:#}").contains("cluster token"), "{e:#}");
    let mut group =
        GroupClient::connect(&cluster.addrs, dir.to_str().unwrap(), 1 << 20, 16, "g", GroupTimeouts::default(), &token)
            .unwrap();
    let prompt = [1u32, 403, 407, 261, 378];
    let stray = |group_id: &str| StepRequest {
        group_id: group_id.into(),
        sequences: vec![SequenceStep {
            sequence_id: 77,
            token_ids: prompt.to_vec(),
            block_table: vec![3],
            sample: true,
            sampling: Some(PbParams { temperature: 0.0, top_p: 1.0, repetition_penalty: 1.0, ..Default::default() }),
            ..Default::default()
        }],
        ..Default::default()
    };
    rt().block_on(async {
        let addr = format!("http://{}", cluster.addrs[0]);
        // A stranger: no token, so nothing runs, whatever the step says.
        let mut c = WorkerClient::connect(addr.clone()).await.unwrap();
        for call in [c.step(stray("g")).await.map(|_| ()), c.load_model(LoadModelRequest::default()).await.map(|_| ())]
        {
            assert_eq!(call.unwrap_err().code(), tonic::Code::Unauthenticated);
        }
        // A member sending to rank 0 alone, with no group id or another group's.
        let channel = tonic::transport::Endpoint::from_shared(addr).unwrap().connect().await.unwrap();
        let mut c = WorkerClient::with_interceptor(channel, token.clone());
        for group_id in ["", "other"] {
            let e = c.step(stray(group_id)).await.unwrap_err();
            assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{e}");
            assert!(e.message().contains("this worker serves group g"), "{e}");
        }
    });
    let greedy = SamplingParams::greedy();
    let good = [greedy_step(&prompt, &[0], &greedy)];
    assert_eq!(group.step_full(&good, false).unwrap()[0].0.sampled.token, 432);
}

#[test]
fn workers_exit_when_their_parent_is_killed_outright() {
    for signal in ["-9", "-2"] {
        let (_model, mut child, _stdout) = long_tp2_generation(Stdio::null());
        let workers = common::children_of(child.id());
        assert_eq!(workers.len(), 2);
        // SIGKILL gives the parent no chance to clean up; SIGINT sent to it alone (not its process group,
        // as a terminal's Ctrl-C would) ends it with the default action, also without cleanup.
        assert!(Command::new("kill").args([signal, &child.id().to_string()]).status().unwrap().success());
        child.wait().unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        while workers.iter().any(|&p| alive(p)) {
            assert!(Instant::now() < deadline, "kill {signal}: workers outlived their parent: {workers:?}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}
