//! Timing shared by the kernel examples (a file of its own under `common/`, so Cargo does not take it
//! for an example).

use std::time::Instant;

/// Seconds per call of `f`, averaged over `reps` calls after one untimed warm-up call.
pub fn time(reps: usize, mut f: impl FnMut()) -> f64 {
    f();
    let t = Instant::now();
    for _ in 0..reps {
        f();
    }
    t.elapsed().as_secs_f64() / reps as f64
}
