//! The engine loop against hand-stepped backends.

use super::*;
use crate::{
    engine::{
        backend::{ModelInfo, RankFailure, StepFailure, WorkerTiming},
        contract::GenRequest,
    },
    replicas::Replicas,
};
use tessera_proto::step::SamplingParams;
use tessera_proto::step::{Sampled, SeqSampled, StepSeq};
use tokio::sync::mpsc::UnboundedSender;
use tokio::sync::mpsc::{UnboundedReceiver, error::TryRecvError, unbounded_channel};

/// What the test lets a waiting step do.
#[derive(Debug)]
enum Go {
    /// Finish.
    Finish,
    /// Pause if asked to (a pausable step), else finish.
    Check,
    /// Fail the step this way.
    Fail(StepFailure),
}

/// Samples `id % 1000` for every sequence that asks, one step per message on `go`; says on `entered`
/// which sequences a step holds once it is planned and waiting for that message. Pausable.
struct Stepped {
    go: mpsc::Receiver<Go>,
    entered: mpsc::Sender<Vec<u64>>,
    /// Adapters loaded, refusing steps that name any other (as a worker does); each load and unload is
    /// reported on `adapter_log`.
    adapters: std::collections::HashSet<u32>,
    adapter_log: mpsc::Sender<String>,
}

impl Stepped {
    fn wait(
        &mut self,
        batch: &[StepSeq<'_>],
        pause: &(dyn Fn() -> bool + Sync),
    ) -> Result<Option<Vec<SeqSampled>>, StepFailure> {
        if let Some(s) = batch.iter().find(|s| s.adapter != 0 && !self.adapters.contains(&s.adapter)) {
            return Err(StepFailure::Refused(format!("adapter {} is not loaded", s.adapter)));
        }
        let _ = self.entered.send(batch.iter().map(|s| s.id).collect());
        let go = self.go.recv().map_err(|_| StepFailure::Internal("the test is over".into()))?;
        match go {
            Go::Fail(f) => return Err(f),
            Go::Check if pause() => return Ok(None),
            _ => {}
        }
        Ok(Some(
            batch
                .iter()
                .filter(|s| s.sample.is_some())
                .map(|s| SeqSampled {
                    id: s.id,
                    sampled: Sampled { token: (s.id % 1000) as u32, logprob: None, top_logprobs: vec![] },
                })
                .collect(),
        ))
    }
}

impl Backend for Stepped {
    fn info(&self) -> ModelInfo {
        ModelInfo { vocab_size: 2000, max_position_embeddings: 64, num_blocks: 64, block_size: 4, world_size: 1 }
    }
    fn step(&mut self, batch: &[StepSeq<'_>]) -> Result<Vec<SeqSampled>, StepFailure> {
        Ok(self.wait(batch, &|| false)?.unwrap_or_default())
    }
    fn can_pause(&self) -> bool {
        true
    }
    fn step_pausable(
        &mut self,
        batch: &[StepSeq<'_>],
        pause: &(dyn Fn() -> bool + Sync),
    ) -> Result<Option<Vec<SeqSampled>>, StepFailure> {
        self.wait(batch, pause)
    }
    fn resume(
        &mut self,
        batch: &[StepSeq<'_>],
        pause: &(dyn Fn() -> bool + Sync),
    ) -> Result<Option<Vec<SeqSampled>>, StepFailure> {
        self.wait(batch, pause)
    }
    fn release(&mut self, _: &[u64]) {}
    fn last_timings(&self) -> Vec<WorkerTiming> {
        Vec::new()
    }
    fn load_adapter(&mut self, spec: &tessera_proto::step::AdapterSpec) -> Result<(), String> {
        if spec.path.contains("bad") {
            return Err(format!("{}: no adapter_config.json", spec.path));
        }
        self.adapters.insert(spec.id);
        let _ = self.adapter_log.send(format!("load {}", spec.id));
        Ok(())
    }
    fn unload_adapter(&mut self, id: u32) -> Result<(), String> {
        self.adapters.remove(&id);
        let _ = self.adapter_log.send(format!("unload {id}"));
        Ok(())
    }
}

fn token(rx: &mut UnboundedReceiver<Event>) -> u32 {
    match rx.blocking_recv() {
        Some(Event::Token { token, .. }) => token,
        other => panic!("expected a token, got {other:?}"),
    }
}

/// The token of a one-token request, and its end.
fn only_token(rx: &mut UnboundedReceiver<Event>) -> u32 {
    let t = token(rx);
    assert!(matches!(rx.blocking_recv(), Some(Event::Finished { .. })));
    t
}

struct Harness {
    replicas: Arc<Replicas>,
    metrics: Arc<Metrics>,
    go: mpsc::Sender<Go>,
    entered: mpsc::Receiver<Vec<u64>>,
    adapter_log: mpsc::Receiver<String>,
}

impl Harness {
    fn new(max_num_seqs: usize) -> Self {
        let (go, steps) = mpsc::channel();
        let (entered_tx, entered) = mpsc::channel();
        let (log_tx, adapter_log) = mpsc::channel();
        let backend = Stepped { go: steps, entered: entered_tx, adapters: Default::default(), adapter_log: log_tx };
        let metrics = Arc::new(Metrics::new("m"));
        let replicas = Replicas::new(backend.info(), metrics.clone());
        let cfg = SchedulerConfig { max_num_seqs, max_batched_tokens: 64, max_model_len: 64, overlap: true };
        replicas.add(Box::new(backend), cfg, vec![], "g", vec![], Box::new(()));
        Harness { replicas, metrics, go, entered, adapter_log }
    }

    /// Submits a request of `flow` reporting to `events`; returns the token its sequence samples.
    fn submit(&self, flow: &str, max_tokens: usize, events: &UnboundedSender<Event>) -> u32 {
        self.submit_n(flow, max_tokens, 1, events)[0]
    }

    /// A request of `n` choices: the tokens of its sequences.
    fn submit_n(&self, flow: &str, max_tokens: usize, n: usize, events: &UnboundedSender<Event>) -> Vec<u32> {
        self.submit_with(flow, max_tokens, n, 0, events)
    }

    /// [`Harness::submit_n`] with LoRA adapter `adapter`.
    fn submit_with(
        &self,
        flow: &str,
        max_tokens: usize,
        n: usize,
        adapter: u32,
        events: &UnboundedSender<Event>,
    ) -> Vec<u32> {
        let id = self.replicas.next_request_id();
        let req = GenRequest {
            ignore_eos: true,
            adapter,
            n,
            flow: Some(flow.into()),
            ..GenRequest::one(id, vec![1, 2, 3], SamplingParams::greedy(), max_tokens, events.clone())
        };
        assert!(self.replicas.submit(req));
        (0..n).map(|c| (seq_id(id, c) % 1000) as u32).collect()
    }

    /// Waits for the next step to be planned; returns its sequences' tokens.
    fn entered(&self) -> Vec<u32> {
        self.entered.recv().unwrap().into_iter().map(|id| (id % 1000) as u32).collect()
    }

    fn step(&self) -> Vec<u32> {
        let ids = self.entered();
        self.go.send(Go::Finish).unwrap();
        ids
    }
}

/// The next event, whatever it is (the loop runs on its own thread).
fn next(rx: &mut UnboundedReceiver<Event>) -> Event {
    rx.blocking_recv().expect("the loop keeps the channel open until the request ends")
}

#[test]
fn a_refused_step_fails_only_its_sequences_and_the_replica_serves_on() {
    let h = Harness::new(4);
    let (events, mut rx) = unbounded_channel();
    h.submit("a", 4, &events);
    h.entered();
    h.go.send(Go::Fail(StepFailure::Refused("worker rank 0 at x refused the step: bad".into()))).unwrap();
    match next(&mut rx) {
        Event::Error { message, .. } => assert!(message.contains("refused the step: bad"), "{message}"),
        other => panic!("expected the refusal, got {other:?}"),
    }
    assert!(h.replicas.is_ready(), "a refused step leaves the replica in routing");
    let (events, mut rx) = unbounded_channel();
    let t = h.submit("a", 1, &events);
    h.step();
    assert_eq!(only_token(&mut rx), t, "the replica still serves");
    let refused = h.metrics.request_failure.get_or_create(&vec![("kind", "refused")]).get();
    assert_eq!(refused, 1);
}

#[test]
fn a_lost_rank_retires_the_replica_and_names_the_rank() {
    let h = Harness::new(4);
    let (events, mut rx) = unbounded_channel();
    h.submit("a", 4, &events);
    h.entered();
    let lost = RankFailure::Lost { rank: 1, address: "10.0.0.7:50051".into(), message: "unreachable".into() };
    h.go.send(Go::Fail(StepFailure::Group(vec![lost]))).unwrap();
    match next(&mut rx) {
        Event::Error { message, .. } => {
            assert!(message.contains("no healthy replica"), "{message}");
            assert!(message.contains("worker rank 1 at 10.0.0.7:50051 failed: unreachable"), "{message}");
        }
        other => panic!("expected the failure, got {other:?}"),
    }
    assert!(!h.replicas.is_ready(), "the only replica is gone");
}

#[test]
fn a_groups_failures_name_causes_before_consequences() {
    let mut f = vec![
        RankFailure::CollectiveBroken { rank: 0, address: "a:1".into(), message: "peer closed".into() },
        RankFailure::Timeout { rank: 2, address: "c:1".into(), timeout: Duration::from_secs(5) },
        RankFailure::Lost { rank: 1, address: "b:1".into(), message: "unreachable".into() },
    ];
    RankFailure::sort(&mut f);
    let failure = StepFailure::Group(f);
    assert!(failure.is_fatal());
    assert_eq!(
        failure.to_string(),
        "tensor-parallel group failed: worker rank 1 at b:1 failed: unreachable; \
         worker rank 2 at c:1 did not answer within 5s; worker rank 0 at a:1: peer closed"
    );
    assert!(!StepFailure::Refused("x".into()).is_fatal());
}

#[test]
fn a_first_token_goes_out_before_the_tokens_of_streams_already_flowing() {
    let h = Harness::new(4);
    // Both requests report to one channel, so the order of their events is visible.
    let (events, mut rx) = unbounded_channel();
    let flowing = h.submit("a", 8, &events);
    h.step();
    assert_eq!(token(&mut rx), flowing, "its prefill");
    // Once the loop has planned `flowing`'s next decode, the new request can only join the step after.
    h.entered();
    let new = h.submit("a", 8, &events);
    h.go.send(Go::Finish).unwrap();
    assert_eq!(token(&mut rx), flowing);
    h.step();
    // One step: `flowing`'s decode is planned first, the newcomer's first token is sent first.
    assert_eq!([token(&mut rx), token(&mut rx)], [new, flowing]);
}

#[test]
fn a_newcomer_runs_while_the_step_in_flight_is_paused() {
    let h = Harness::new(2);
    let (a_events, mut a) = unbounded_channel();
    let (b_events, mut b) = unbounded_channel();
    // A holds both slots (one request of two choices): its prefills, then a decode step in flight.
    let a12 = h.submit_n("a", 8, 2, &a_events);
    let (a1, a2) = (a12[0], a12[1]);
    assert_eq!(h.step(), [a1, a2]);
    assert_eq!((token(&mut a), token(&mut a)), (a1, a2));
    assert_eq!(h.entered(), [a1, a2]);

    // The submission raises the replica's flag; the step pauses when it next looks.
    let newcomer = h.submit("b", 8, &b_events);
    h.go.send(Go::Check).unwrap();
    // B's prefill runs in the middle, over the full slots, and its first token goes out at once.
    assert_eq!(h.step(), [newcomer]);
    assert_eq!(token(&mut b), newcomer);
    assert!(matches!(a.try_recv(), Err(TryRecvError::Empty)), "A's step has not finished");
    // A's step goes on, and is not paused again.
    assert_eq!(h.entered(), [a1, a2]);
    h.go.send(Go::Check).unwrap();
    assert_eq!((token(&mut a), token(&mut a)), (a1, a2));
    // The slot B took is given back before the next step: A's newest waits.
    assert_eq!(h.step(), [a1, newcomer]);
    // (Its tokens go out after the metrics are published.)
    assert_eq!((token(&mut a), token(&mut b)), (a1, newcomer));
    assert_eq!(h.metrics.steps_paused.get(), 1);
    assert_eq!(h.metrics.newcomer_steps.get(), 1);
    assert_eq!(h.metrics.num_preemptions.get(), 1);
}

#[test]
fn newcomers_get_at_most_as_much_time_in_a_paused_step_as_the_step_itself() {
    // Step durations here are the test's: a step "computes" for as long as the test holds it.
    let compute = || std::thread::sleep(Duration::from_millis(150));
    let h = Harness::new(16);
    let (a_events, mut a) = unbounded_channel();
    let (n_events, mut n) = unbounded_channel();
    let a_seqs = h.submit_n("a", 8, 8, &a_events);
    h.entered();
    compute();
    h.go.send(Go::Finish).unwrap();
    for _ in 0..8 {
        token(&mut a);
    }
    let decodes = |ids: Vec<u32>| assert_eq!(ids, a_seqs);

    // A's decode step computes for a while, then pauses for newcomer B (one token, done at once).
    decodes(h.entered());
    compute();
    let b = h.submit("b", 1, &n_events);
    h.go.send(Go::Check).unwrap();
    assert_eq!(h.step(), [b]);
    assert_eq!(only_token(&mut n), b);
    // B took little of the step's time: it pauses again at once for newcomer C.
    decodes(h.entered());
    let c = h.submit("c", 1, &n_events);
    h.go.send(Go::Check).unwrap();
    assert_eq!(h.step(), [c]);
    assert_eq!(only_token(&mut n), c);
    decodes(h.step());
    for _ in 0..8 {
        token(&mut a);
    }

    // The next decode step pauses at once for D, whose step takes long.
    decodes(h.entered());
    let d = h.submit("d", 1, &n_events);
    h.go.send(Go::Check).unwrap();
    assert_eq!(h.entered(), [d]);
    compute();
    h.go.send(Go::Finish).unwrap();
    assert_eq!(only_token(&mut n), d);
    // E arrives: the step owes its decodes D's time first, so it finishes instead of pausing.
    decodes(h.entered());
    let e = h.submit("e", 1, &n_events);
    h.go.send(Go::Check).unwrap();
    for _ in 0..8 {
        token(&mut a);
    }
    assert!(matches!(n.try_recv(), Err(TryRecvError::Empty)), "E waited for the step");
    assert!(h.step().contains(&e));
    assert_eq!(only_token(&mut n), e);
    assert_eq!(h.metrics.steps_paused.get(), 3);
}

#[test]
fn a_request_of_a_flow_already_running_does_not_pause_the_step() {
    let h = Harness::new(4);
    let (events, mut a) = unbounded_channel();
    let a1 = h.submit("a", 8, &events);
    h.step();
    assert_eq!(token(&mut a), a1);
    assert_eq!(h.entered(), [a1]);
    let a2 = h.submit("a", 8, &events);
    h.go.send(Go::Check).unwrap();
    // The step finished instead of pausing; A's second request joins the next one.
    assert_eq!(token(&mut a), a1);
    assert_eq!(h.step(), [a1, a2]);
    assert_eq!(h.metrics.steps_paused.get(), 0);
}

#[test]
fn an_adapter_unloaded_while_in_use_goes_once_its_sequences_finish_and_a_failed_load_leaves_nothing() {
    let h = Harness::new(4);
    let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
    let err = rt.block_on(h.replicas.load_adapter("broken", "/bad/dir", "m")).unwrap_err();
    assert!(err.to_string().contains("/bad/dir: no adapter_config.json"), "{err}");
    assert_eq!(h.replicas.adapters.resolve("broken"), None, "a failed load registers nothing");
    // Replicas that did load a failed adapter drop it again (here none had).
    assert_eq!(h.adapter_log.recv().unwrap(), "unload 1");
    let spec = rt.block_on(h.replicas.load_adapter("sql", "/adapters/sql", "m")).unwrap();
    assert_eq!(spec.id, 2, "ids are never reused");
    assert_eq!(h.adapter_log.recv().unwrap(), "load 2");
    assert_eq!(h.replicas.adapters.resolve("sql"), Some(spec.id));

    let (tx, mut rx) = unbounded_channel();
    h.submit_with("a", 3, 1, spec.id, &tx);
    h.step();
    assert!(matches!(next(&mut rx), Event::Token { .. }));
    h.replicas.unload_adapter("sql").unwrap();
    assert_eq!(h.replicas.adapters.resolve("sql"), None, "new requests cannot name it");
    // The loop takes the unload in before its next step, and keeps the adapter for the sequence.
    h.step();
    assert!(matches!(next(&mut rx), Event::Token { .. }));
    assert_eq!(h.adapter_log.try_recv(), Err(mpsc::TryRecvError::Empty), "unloaded under a running sequence");
    h.step();
    assert!(matches!(next(&mut rx), Event::Token { .. }));
    assert!(matches!(next(&mut rx), Event::Finished { .. }));
    assert_eq!(h.adapter_log.recv().unwrap(), format!("unload {}", spec.id));

    // A request that resolved the adapter before its unload and arrives after it fails alone; a step
    // naming the adapter would be refused whole.
    let (late_tx, mut late) = unbounded_channel();
    h.submit_with("b", 2, 1, spec.id, &late_tx);
    match next(&mut late) {
        Event::Error { message, .. } => assert!(message.contains("is not loaded"), "{message}"),
        other => panic!("expected an error, got {other:?}"),
    }
    let (base_tx, mut base) = unbounded_channel();
    h.submit("c", 1, &base_tx);
    h.step();
    assert!(matches!(next(&mut base), Event::Token { .. }));
}

/// The end-of-sequence token of [`Overlapping`] replicas.
const EOS: u32 = 999;

/// How the test lands an overlapped step.
#[derive(Debug)]
enum Land {
    /// Every sampling sequence gets `id % 1000`, but those named here (by that token) get [`EOS`].
    Tokens(Vec<u32>),
    /// The workers hold none of the step's sequences: send it again in full.
    Resend,
}

/// A hand-stepped backend whose steps overlap the loop. It logs what it is asked (`submit` and `again`
/// with the step's tokens, `wait`), and a step lands when the test says so on `go`.
struct Overlapping {
    go: mpsc::Receiver<Land>,
    log: mpsc::Sender<String>,
    /// The submitted step's sampling sequences.
    submitted: Option<Vec<u64>>,
}

fn short(id: u64) -> u32 {
    (id % 1000) as u32
}

fn sample(id: u64, eos: &[u32]) -> SeqSampled {
    let token = if eos.contains(&short(id)) { EOS } else { short(id) };
    SeqSampled { id, sampled: Sampled { token, logprob: None, top_logprobs: vec![] } }
}

fn describe(what: &str, batch: &[StepSeq<'_>]) -> String {
    let seqs: Vec<String> = batch
        .iter()
        .map(|s| {
            assert!(!s.tokens.contains(&u32::MAX), "a step carried a placeholder");
            format!("{}{}", short(s.id), if s.starts { "*" } else { "" })
        })
        .collect();
    format!("{what} {}", seqs.join(","))
}

impl Backend for Overlapping {
    fn info(&self) -> ModelInfo {
        ModelInfo { vocab_size: 2000, max_position_embeddings: 64, num_blocks: 64, block_size: 4, world_size: 1 }
    }
    fn step(&mut self, batch: &[StepSeq<'_>]) -> Result<Vec<SeqSampled>, StepFailure> {
        let _ = self.log.send(describe("again", batch));
        Ok(batch.iter().filter(|s| s.sample.is_some()).map(|s| sample(s.id, &[])).collect())
    }
    fn can_overlap(&self) -> bool {
        true
    }
    fn submit(&mut self, batch: &[StepSeq<'_>]) -> Result<(), StepFailure> {
        assert!(self.submitted.is_none(), "two steps in flight");
        let _ = self.log.send(describe("submit", batch));
        self.submitted = Some(batch.iter().filter(|s| s.sample.is_some()).map(|s| s.id).collect());
        Ok(())
    }
    fn wait(&mut self) -> Result<Vec<SeqSampled>, StepFailure> {
        let ids = self.submitted.take().expect("a step was submitted");
        let _ = self.log.send("wait".into());
        match self.go.recv().map_err(|_| StepFailure::Internal("the test is over".into()))? {
            Land::Tokens(eos) => Ok(ids.iter().map(|&id| sample(id, &eos)).collect()),
            Land::Resend => Err(StepFailure::Resend(ids)),
        }
    }
    fn release(&mut self, _: &[u64]) {}
    fn last_timings(&self) -> Vec<WorkerTiming> {
        Vec::new()
    }
}

struct Overlap {
    replicas: Arc<Replicas>,
    go: mpsc::Sender<Land>,
    log: mpsc::Receiver<String>,
}

impl Overlap {
    fn new() -> Self {
        let (go, steps) = mpsc::channel();
        let (log_tx, log) = mpsc::channel();
        let backend = Overlapping { go: steps, log: log_tx, submitted: None };
        let replicas = Replicas::new(backend.info(), Arc::new(Metrics::new("m")));
        let cfg = SchedulerConfig { max_num_seqs: 8, max_batched_tokens: 64, max_model_len: 64, overlap: true };
        replicas.add(Box::new(backend), cfg, vec![EOS], "g", vec![], Box::new(()));
        Overlap { replicas, go, log }
    }

    /// Submits a one-choice request that stops at [`EOS`]; returns the token its sequence samples.
    fn submit(&self, max_tokens: usize, events: &UnboundedSender<Event>) -> u32 {
        let id = self.replicas.next_request_id();
        let req = GenRequest::one(id, vec![1, 2, 3], SamplingParams::greedy(), max_tokens, events.clone());
        assert!(self.replicas.submit(req));
        short(seq_id(id, 0))
    }

    fn log(&self) -> String {
        self.log.recv().unwrap()
    }

    fn running(&self) -> usize {
        self.replicas.view()[0].running
    }
}

/// The tokens of a stream to its end, and how it ended.
fn stream(rx: &mut UnboundedReceiver<Event>) -> (Vec<u32>, FinishReason) {
    let mut tokens = Vec::new();
    loop {
        match next(rx) {
            Event::Token { token, .. } => tokens.push(token),
            Event::Finished { reason, .. } => return (tokens, reason),
            other => panic!("unexpected {other:?}"),
        }
    }
}

#[test]
fn the_next_step_is_planned_while_one_runs_and_leaves_without_what_that_one_finished() {
    let h = Overlap::new();
    let (events, mut rx_a) = unbounded_channel();
    let a = h.submit(10, &events);
    assert_eq!(h.log(), format!("submit {a}*"));
    assert_eq!(h.log(), "wait");
    // Step 2 is planned by now: B, arriving while step 1 runs, waits for step 3.
    let (events, mut rx_b) = unbounded_channel();
    let b = h.submit(2, &events);
    h.go.send(Land::Tokens(vec![])).unwrap();
    assert_eq!(h.log(), format!("submit {a}"), "step 2: A's decode, sent as soon as step 1 landed");
    assert_eq!(h.log(), "wait");
    // While step 2 runs, step 3 is ready: B admitted (and counted running) before step 2's token is out.
    assert_eq!(h.running(), 2);
    assert!(matches!(next(&mut rx_a), Event::Token { token, .. } if token == a), "step 1's token");
    assert!(matches!(rx_a.try_recv(), Err(TryRecvError::Empty)), "step 2 has not landed");
    // Step 2 samples A's end of sequence: step 3, planned with A's decode in it, leaves without it.
    h.go.send(Land::Tokens(vec![a])).unwrap();
    assert_eq!(h.log(), format!("submit {b}*"));
    assert_eq!(stream(&mut rx_a), (vec![EOS], FinishReason::Stop));
    assert_eq!(h.log(), "wait");
    h.go.send(Land::Tokens(vec![])).unwrap();
    // B's second token is its last: the step that samples it is the last planned for B.
    assert_eq!(h.log(), format!("submit {b}"));
    assert_eq!(h.log(), "wait");
    h.go.send(Land::Tokens(vec![])).unwrap();
    assert_eq!(stream(&mut rx_b), (vec![b, b], FinishReason::Length));
    assert!(h.log.recv_timeout(Duration::from_millis(50)).is_err(), "no step after the last");
    assert_eq!(h.running(), 0);
}

#[test]
fn a_step_whose_sequences_the_workers_do_not_hold_goes_again_in_full_and_the_stream_is_unchanged() {
    let h = Overlap::new();
    let (events, mut rx) = unbounded_channel();
    let a = h.submit(3, &events);
    assert_eq!(h.log(), format!("submit {a}*"));
    assert_eq!(h.log(), "wait");
    h.go.send(Land::Tokens(vec![])).unwrap();
    assert_eq!(h.log(), format!("submit {a}"));
    assert_eq!(h.log(), "wait");
    // The workers lost A (a restart): the step goes again, A in full, as it was planned.
    h.go.send(Land::Resend).unwrap();
    assert_eq!(h.log(), format!("again {a}"));
    assert_eq!(h.log(), format!("submit {a}"));
    assert_eq!(h.log(), "wait");
    h.go.send(Land::Tokens(vec![])).unwrap();
    assert_eq!(stream(&mut rx), (vec![a, a, a], FinishReason::Length));
}
