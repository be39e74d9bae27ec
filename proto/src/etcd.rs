//! How both sides talk to etcd: the endpoints from `--etcd`, the connection options (short timeouts, so an
//! outage is noticed and retried rather than waited on), and the backoff between reconnection attempts.
//! The worker's registration and the coordinator's membership watch and claims all use these.

use std::time::Duration;

/// Waits between reconnection attempts to etcd: doubling from 250 ms up to 5 s.
#[derive(Debug)]
pub struct Backoff {
    next: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff { next: Duration::from_millis(250) }
    }
}

impl Backoff {
    pub fn next_delay(&mut self) -> Duration {
        let d = self.next;
        self.next = (self.next * 2).min(Duration::from_secs(5));
        d
    }

    pub fn reset(&mut self) {
        *self = Backoff::default();
    }
}

/// Options for every etcd connection: short timeouts, so an outage is noticed and retried, not waited on.
pub fn connect_options() -> etcd_client::ConnectOptions {
    etcd_client::ConnectOptions::new()
        .with_connect_timeout(Duration::from_secs(2))
        .with_timeout(Duration::from_secs(5))
        .with_keep_alive(Duration::from_secs(2), Duration::from_secs(2))
}

/// `--etcd` values: comma-separated endpoints, `http://` added where missing.
pub fn endpoints(arg: &str) -> Vec<String> {
    arg.split(',')
        .map(str::trim)
        .filter(|e| !e.is_empty())
        .map(|e| if e.contains("://") { e.to_string() } else { format!("http://{e}") })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_a_ceiling_and_resets() {
        let mut b = Backoff::default();
        let d: Vec<u64> = (0..7).map(|_| b.next_delay().as_millis() as u64).collect();
        assert_eq!(d, [250, 500, 1000, 2000, 4000, 5000, 5000]);
        b.reset();
        assert_eq!(b.next_delay(), Duration::from_millis(250));
    }

    #[test]
    fn endpoints_split_and_get_a_scheme() {
        assert_eq!(endpoints("a:2379, http://b:2379,"), ["http://a:2379", "http://b:2379"]);
    }
}
