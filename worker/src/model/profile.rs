//! Device time per op of a forward pass, for benchmarks that ask where a step's time goes.

use tessera_kernels::Device;

use crate::error::ModelError;

/// Device time per op of the forward pass. Enabling it synchronises after every op, so it is for finding
/// where a step's time goes, not for timing steps.
#[derive(Default)]
pub struct OpProfile {
    on: std::sync::atomic::AtomicBool,
    times: std::sync::Mutex<Vec<(&'static str, f64, usize)>>,
}

impl OpProfile {
    /// Starts (or stops) recording.
    pub fn set(&self, on: bool) {
        self.on.store(on, std::sync::atomic::Ordering::Relaxed);
    }

    /// The recorded (op, seconds, calls), in first-seen order, and clears them.
    pub fn take(&self) -> Vec<(&'static str, f64, usize)> {
        std::mem::take(&mut *self.times.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// Records the time since `since` under `name` (synchronising the device first), and restarts it.
    pub fn lap(&self, device: Device, name: &'static str, since: &mut std::time::Instant) -> Result<(), ModelError> {
        if !self.on.load(std::sync::atomic::Ordering::Relaxed) {
            return Ok(());
        }
        tessera_kernels::synchronize(device)?;
        let dt = since.elapsed().as_secs_f64();
        *since = std::time::Instant::now();
        let mut times = self.times.lock().unwrap_or_else(|p| p.into_inner());
        match times.iter_mut().find(|(n, _, _)| *n == name) {
            Some(e) => {
                e.1 += dt;
                e.2 += 1;
            }
            None => times.push((name, dt, 1)),
        }
        Ok(())
    }
}
