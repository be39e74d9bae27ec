//! Keeps `tessera serve`'s one replica serving. When it fails (a worker of `--tp N` died or was killed, a
//! collective broke, a step timed out), the supervisor starts it again, with new worker processes and the
//! model loaded anew, while the sequences that were running wait ([`Replicas::expect_replacements`]); they
//! go on on the new replica without a token lost or repeated, as after a failover in cluster mode.
//!
//! Starts that fail, or replicas that fail soon after starting, are retried with a growing pause; after
//! [`MAX_FAILURES`] in a row the supervisor gives up ([`Replicas::give_up`]): waiting requests end with an
//! error and `/health` fails, so an orchestrator restarts the process.

use std::{
    sync::{Arc, Weak, mpsc},
    time::{Duration, Instant},
};

use anyhow::Result;
use tessera_coordinator::{engine::backend::Backend, replicas::Replicas, scheduler::SchedulerConfig};

/// Failures in a row (a start that failed, or a replica that failed within [`STABLE`] of starting) before
/// giving up.
pub const MAX_FAILURES: u32 = 5;
/// A replica that served this long before failing has shown it can: the failure count starts again.
const STABLE: Duration = Duration::from_secs(60);
/// The pause before the n-th attempt in a row doubles from this (the first attempt is at once).
const FIRST_PAUSE: Duration = Duration::from_millis(500);

/// A started replica: its backend, what must live as long as it does (worker processes), their addresses.
pub struct Started {
    pub backend: Box<dyn Backend>,
    pub keep_alive: Box<dyn Send>,
    pub workers: Vec<String>,
    /// Hears when one of its worker processes exits: the replica is failed then, rather than at its next
    /// step, so an idle server replaces it before a request finds it broken.
    pub exits: Option<mpsc::Receiver<String>>,
}

/// What every start of the replica shares.
pub struct Supervisor<F> {
    pub replicas: Arc<Replicas>,
    pub cfg: SchedulerConfig,
    pub eos: Vec<u32>,
    /// Starts the replica anew.
    pub start: F,
}

impl<F: FnMut() -> Result<Started> + Send + 'static> Supervisor<F> {
    /// Routes requests to `first`, and from then on replaces the replica whenever it fails.
    pub fn run(self, first: Started) {
        let (failed, failures) = mpsc::channel::<String>();
        self.replicas.expect_replacements();
        // The hook lives in `Replicas`, the supervisor holds it weakly: when the server drops its replicas,
        // the channel closes and the supervisor's thread ends.
        self.replicas.set_failure_hook(Box::new(move |_, reason| {
            let _ = failed.send(reason.to_string());
        }));
        let Supervisor { replicas, cfg, eos, start } = self;
        let replicas = Arc::downgrade(&replicas);
        add(&replicas, &cfg, &eos, first);
        let spawned = std::thread::Builder::new()
            .name("tessera-supervisor".into())
            .spawn(move || watch(replicas, cfg, eos, start, failures));
        if let Err(e) = spawned {
            tracing::error!(error = %e, "cannot start the replica supervisor: a failed replica will not be restarted");
        }
    }
}

/// Routes requests to a started replica, and fails it when one of its workers exits.
fn add(replicas: &Weak<Replicas>, cfg: &SchedulerConfig, eos: &[u32], s: Started) {
    let Some(r) = replicas.upgrade() else { return };
    let id = r.add(s.backend, *cfg, eos.to_vec(), "local", s.workers, s.keep_alive);
    if let Some(exits) = s.exits {
        let replicas = replicas.clone();
        // Ends when a worker exits or all of them are gone (the replica's workers were stopped).
        let _ = std::thread::Builder::new().name("tessera-exits".into()).spawn(move || {
            if let (Ok(why), Some(r)) = (exits.recv(), replicas.upgrade()) {
                r.fail(id, &why);
            }
        });
    }
}

fn watch(
    replicas: Weak<Replicas>,
    cfg: SchedulerConfig,
    eos: Vec<u32>,
    mut start: impl FnMut() -> Result<Started>,
    failures: mpsc::Receiver<String>,
) {
    let mut in_a_row = 0u32;
    let mut started_at = Instant::now();
    while let Ok(mut last) = failures.recv() {
        if started_at.elapsed() >= STABLE {
            in_a_row = 0;
        }
        in_a_row += 1;
        loop {
            if in_a_row > MAX_FAILURES {
                if let Some(r) = replicas.upgrade() {
                    r.give_up(&format!("the replica failed {MAX_FAILURES} times in a row, last: {last}"));
                }
                return;
            }
            if in_a_row > 1 {
                std::thread::sleep(FIRST_PAUSE * 2u32.pow(in_a_row - 2));
            }
            tracing::warn!(attempt = in_a_row, "restarting the replica after: {last}");
            match start() {
                Ok(s) => {
                    add(&replicas, &cfg, &eos, s);
                    started_at = Instant::now();
                    break;
                }
                Err(e) => {
                    tracing::error!(attempt = in_a_row, "restarting the replica failed: {e:#}");
                    last = format!("{e:#}");
                    in_a_row += 1;
                }
            }
        }
    }
}
