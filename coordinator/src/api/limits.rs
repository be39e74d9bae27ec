//! Per-key limits: requests per minute, tokens per minute (prompt + `max_tokens` at admission, as OpenAI
//! counts, with what was not generated given back at the end), concurrent requests, and `max_tokens` per
//! request. State is kept per key id, so it survives key-file reloads.
//!
//! Each per-minute limit is a token bucket that refills continuously: `remaining` is what is in it,
//! `reset` is how long until it is full again. Over a limit is 429 with `Retry-After`; every response to a
//! limited key carries OpenAI's `x-ratelimit-*` headers.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Instant,
};

use axum::http::{HeaderMap, HeaderValue, StatusCode};
use serde::{Deserialize, Serialize};

use super::error::ApiError;

#[derive(Deserialize, Serialize, Debug, Clone, Copy, Default, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct KeyLimits {
    pub requests_per_minute: Option<u32>,
    pub tokens_per_minute: Option<u32>,
    pub concurrent_requests: Option<u32>,
    pub max_tokens_per_request: Option<u32>,
}

impl KeyLimits {
    /// The first limit set to 0: it would refuse every request for ever, so a key file with one is refused.
    pub fn zero_field(&self) -> Option<&'static str> {
        [
            ("requests_per_minute", self.requests_per_minute),
            ("tokens_per_minute", self.tokens_per_minute),
            ("concurrent_requests", self.concurrent_requests),
            ("max_tokens_per_request", self.max_tokens_per_request),
        ]
        .into_iter()
        .find_map(|(name, v)| (v == Some(0)).then_some(name))
    }
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    capacity: f64,
    level: f64,
    at: Instant,
}

impl Bucket {
    fn new(capacity: u32, now: Instant) -> Self {
        Bucket { capacity: capacity as f64, level: capacity as f64, at: now }
    }

    fn refill(&mut self, now: Instant) {
        let per_s = self.capacity / 60.0;
        self.level = (self.level + (now - self.at).as_secs_f64() * per_s).min(self.capacity);
        self.at = now;
    }

    /// Seconds until `amount` is available.
    fn wait_for(&self, amount: f64) -> f64 {
        ((amount - self.level) / (self.capacity / 60.0)).max(0.0)
    }

    fn reset(&self) -> f64 {
        self.wait_for(self.capacity)
    }
}

#[derive(Debug)]
struct State {
    requests: Option<Bucket>,
    tokens: Option<Bucket>,
    in_flight: u32,
}

/// A refused request: the error to answer with, and the limits as they stand (for the headers).
pub type Refusal = Box<(ApiError, Snapshot)>;

/// The limiter of every key, by key id.
#[derive(Default)]
pub struct Limiter {
    state: Mutex<HashMap<String, State>>,
}

/// What a response tells the client about its key's limits.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    requests: Option<(u32, u32, f64)>,
    tokens: Option<(u32, u32, f64)>,
}

fn duration_str(s: f64) -> String {
    // OpenAI's style: "1s", "6m0s", "20ms".
    if s < 1.0 {
        return format!("{}ms", (s * 1000.0).ceil() as u64);
    }
    let total = s.ceil() as u64;
    if total >= 60 { format!("{}m{}s", total / 60, total % 60) } else { format!("{total}s") }
}

impl Snapshot {
    pub fn write(&self, h: &mut HeaderMap) {
        let mut put = |name: &'static str, v: String| {
            if let Ok(v) = HeaderValue::from_str(&v) {
                h.insert(name, v);
            }
        };
        if let Some((limit, remaining, reset)) = self.requests {
            put("x-ratelimit-limit-requests", limit.to_string());
            put("x-ratelimit-remaining-requests", remaining.to_string());
            put("x-ratelimit-reset-requests", duration_str(reset));
        }
        if let Some((limit, remaining, reset)) = self.tokens {
            put("x-ratelimit-limit-tokens", limit.to_string());
            put("x-ratelimit-remaining-tokens", remaining.to_string());
            put("x-ratelimit-reset-tokens", duration_str(reset));
        }
    }
}

fn over(what: &str, wait: f64) -> ApiError {
    let mut e = ApiError::overloaded(0);
    e.message = format!("Rate limit reached for {what}. Please try again in {}.", duration_str(wait));
    e.code = Some("rate_limit_exceeded");
    e.retry_after = Some(wait.ceil().max(1.0) as u64);
    e.status = StatusCode::TOO_MANY_REQUESTS;
    e
}

impl Limiter {
    fn with<R>(&self, key: &str, l: &KeyLimits, f: impl FnOnce(&mut State, Instant) -> R) -> R {
        let now = Instant::now();
        let mut map = self.state.lock().expect("limiter lock");
        let st = map.entry(key.to_string()).or_insert_with(|| State {
            requests: l.requests_per_minute.map(|c| Bucket::new(c, now)),
            tokens: l.tokens_per_minute.map(|c| Bucket::new(c, now)),
            in_flight: 0,
        });
        // A reload may have changed the limits: resize the buckets, keeping what was used.
        for (b, cap) in [(&mut st.requests, l.requests_per_minute), (&mut st.tokens, l.tokens_per_minute)] {
            match (b.as_mut(), cap) {
                (Some(x), Some(c)) if x.capacity != c as f64 => {
                    x.refill(now);
                    let used = x.capacity - x.level;
                    *x = Bucket { capacity: c as f64, level: (c as f64 - used).max(0.0), at: now };
                }
                (None, Some(c)) => *b = Some(Bucket::new(c, now)),
                (Some(_), None) => *b = None,
                _ => {}
            }
        }
        for b in [&mut st.requests, &mut st.tokens].into_iter().flatten() {
            b.refill(now);
        }
        f(st, now)
    }

    fn snapshot(st: &State) -> Snapshot {
        let view = |b: &Option<Bucket>| b.map(|b| (b.capacity as u32, b.level.floor().max(0.0) as u32, b.reset()));
        Snapshot { requests: view(&st.requests), tokens: view(&st.tokens) }
    }

    /// Admits a request (one from the request bucket, one concurrency slot) or says why not.
    pub fn admit(self: &Arc<Self>, key: &str, l: &KeyLimits) -> Result<(Slot, Snapshot), Refusal> {
        self.with(key, l, |st, _| {
            if let Some(max) = l.concurrent_requests
                && st.in_flight >= max
            {
                return Err(Box::new((over(&format!("concurrent requests (limit {max})"), 1.0), Self::snapshot(st))));
            }
            if let Some(b) = st.requests.as_mut() {
                if b.level < 1.0 {
                    let wait = b.wait_for(1.0);
                    let e = over(&format!("requests per minute (limit {})", b.capacity), wait);
                    return Err(Box::new((e, Self::snapshot(st))));
                }
                b.level -= 1.0;
            }
            st.in_flight += 1;
            Ok((Slot { limiter: self.clone(), key: key.to_string(), tokens: 0.0 }, Self::snapshot(st)))
        })
    }
}

/// A request's hold on its key's limits: its concurrency slot and the tokens it reserved, given back when
/// dropped (the unused part of the reservation, see [`Slot::settle`]).
pub struct Slot {
    limiter: Arc<Limiter>,
    key: String,
    tokens: f64,
}

impl Slot {
    /// Reserves `tokens` (prompt + max_tokens) against the tokens-per-minute limit, and checks
    /// `max_tokens` against the per-request cap.
    pub fn reserve(&mut self, l: &KeyLimits, prompt: usize, max_tokens: usize) -> Result<Snapshot, Refusal> {
        let want = (prompt + max_tokens) as f64;
        let key = self.key.clone();
        self.limiter.with(&key, l, |st, _| {
            if let Some(cap) = l.max_tokens_per_request
                && max_tokens > cap as usize
            {
                let e = ApiError::param("max_tokens", format!("max_tokens {max_tokens} exceeds this key's limit of {cap} per request."));
                return Err(Box::new((e, Limiter::snapshot(st))));
            }
            if let Some(b) = st.tokens.as_mut() {
                if want > b.capacity {
                    let e = ApiError::param(
                        "max_tokens",
                        format!("This request needs {want} tokens (prompt + max_tokens) but the key's limit is {} per minute.", b.capacity),
                    );
                    return Err(Box::new((e, Limiter::snapshot(st))));
                }
                if b.level < want {
                    let wait = b.wait_for(want);
                    return Err(Box::new((over(&format!("tokens per minute (limit {})", b.capacity), wait), Limiter::snapshot(st))));
                }
                b.level -= want;
            }
            self.tokens = want;
            Ok(Limiter::snapshot(st))
        })
    }

    /// Gives back the reserved tokens that were not used (`used` = prompt + completion tokens).
    pub fn settle(&mut self, used: usize) {
        let back = (self.tokens - used as f64).max(0.0);
        self.tokens = 0.0;
        if back > 0.0 {
            let mut map = self.limiter.state.lock().expect("limiter lock");
            if let Some(b) = map.get_mut(&self.key).and_then(|s| s.tokens.as_mut()) {
                b.level = (b.level + back).min(b.capacity);
            }
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut map = self.limiter.state.lock().expect("limiter lock");
        if let Some(st) = map.get_mut(&self.key) {
            st.in_flight = st.in_flight.saturating_sub(1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_admit_refuse_and_settle() {
        let lim = Arc::new(Limiter::default());
        let l = KeyLimits {
            requests_per_minute: Some(2),
            tokens_per_minute: Some(100),
            concurrent_requests: Some(5),
            max_tokens_per_request: Some(50),
        };
        let (mut a, s) = lim.admit("k", &l).unwrap();
        assert_eq!(s.requests.unwrap().1, 1);
        let s = a.reserve(&l, 10, 40).unwrap();
        assert_eq!(s.tokens.unwrap().1, 50);
        a.settle(20); // used 20 of 50: 30 come back
        assert_eq!(lim.with("k", &l, |st, _| st.tokens.unwrap().level.floor() as u32), 80);
        let (_b, _) = lim.admit("k", &l).unwrap();
        let (e, s) = *lim.admit("k", &l).err().unwrap();
        assert_eq!(e.status, 429);
        assert_eq!(e.code, Some("rate_limit_exceeded"));
        assert!(e.retry_after.unwrap() >= 1);
        assert_eq!(s.requests.unwrap().1, 0);
        let mut h = HeaderMap::new();
        s.write(&mut h);
        assert_eq!(h["x-ratelimit-limit-requests"], "2");
        assert_eq!(h["x-ratelimit-remaining-requests"], "0");
        assert!(h["x-ratelimit-reset-requests"].to_str().unwrap().ends_with('s'));
        assert_eq!(h["x-ratelimit-limit-tokens"], "100");
        let (e, _) = *a.reserve(&l, 1, 60).err().unwrap();
        assert_eq!((e.status.as_u16(), e.param.as_deref()), (400, Some("max_tokens")));
    }

    #[test]
    fn concurrency_slots_come_back_when_dropped() {
        let lim = Arc::new(Limiter::default());
        let l = KeyLimits { concurrent_requests: Some(1), ..Default::default() };
        let (slot, _) = lim.admit("k", &l).unwrap();
        assert!(lim.admit("k", &l).is_err());
        drop(slot);
        assert!(lim.admit("k", &l).is_ok());
    }

    #[test]
    fn durations_read_like_openais() {
        assert_eq!(duration_str(0.02), "20ms");
        assert_eq!(duration_str(1.2), "2s");
        assert_eq!(duration_str(360.0), "6m0s");
    }
}
