//! What a worker registers: `/tessera/<cluster>/workers/<id>` → JSON, and how the coordinator reads it.
//!
//! A record the coordinator cannot use (not JSON, a field missing or of the wrong type, an address that
//! is not host:port, an id that is not the key's, another protocol version) is refused with a message
//! naming the key and the field, and the worker is left out of every group; the cluster goes on.

use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerRecord {
    /// The last segment of the key.
    pub id: String,
    /// Where the coordinator reaches the worker's gRPC service (host:port).
    pub address: String,
    /// `cpu` or `cuda:N`.
    pub device: String,
    /// Memory for weights and KV cache on that device, in bytes.
    pub memory_bytes: u64,
    /// Tessera's version (informational).
    pub version: String,
    /// The worker protocol (`tessera.v1`): a coordinator uses only workers that speak its own.
    pub protocol: String,
}

/// The prefix every worker of `cluster` registers under (with a trailing slash).
pub fn prefix(cluster: &str) -> String {
    format!("/tessera/{cluster}/workers/")
}

pub fn key(cluster: &str, id: &str) -> String {
    format!("{}{id}", prefix(cluster))
}

/// Checks a cluster or worker name: it becomes a key segment.
pub fn check_name(what: &str, name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > 128 || !name.chars().all(|c| c.is_ascii_alphanumeric() || "-_.:".contains(c)) {
        return Err(format!("{what} {name:?} must be 1 to 128 of A-Z a-z 0-9 - _ . :"));
    }
    Ok(())
}

/// The worker id of `key` under `prefix`.
pub fn id_of<'a>(prefix: &str, key: &'a [u8]) -> Option<&'a str> {
    std::str::from_utf8(key).ok()?.strip_prefix(prefix).filter(|id| !id.is_empty())
}

/// Reads and checks a record found at `key`.
pub fn parse(prefix: &str, key: &[u8], value: &[u8]) -> Result<WorkerRecord, String> {
    let shown = String::from_utf8_lossy(key);
    let id = id_of(prefix, key).ok_or_else(|| format!("{shown}: not a worker key under {prefix}"))?;
    let de = &mut serde_json::Deserializer::from_slice(value);
    let r: WorkerRecord = serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        if path == "." { format!("{shown}: {}", e.inner()) } else { format!("{shown}: field `{path}`: {}", e.inner()) }
    })?;
    if r.id != id {
        return Err(format!("{shown}: field `id` is {:?}, the key says {id:?}", r.id));
    }
    match r.address.rsplit_once(':') {
        Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0) => {}
        _ => return Err(format!("{shown}: field `address` {:?} is not host:port", r.address)),
    }
    if r.protocol != crate::PROTOCOL_VERSION {
        return Err(format!(
            "{shown}: field `protocol` is {:?} (version {}), this coordinator speaks {:?} (version {})",
            r.protocol,
            r.version,
            crate::PROTOCOL_VERSION,
            env!("CARGO_PKG_VERSION")
        ));
    }
    Ok(r)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn good() -> WorkerRecord {
        WorkerRecord {
            id: "w1".into(),
            address: "10.0.0.5:50051".into(),
            device: "cpu".into(),
            memory_bytes: 1 << 30,
            version: "0.1.0".into(),
            protocol: crate::PROTOCOL_VERSION.into(),
        }
    }

    #[test]
    fn a_good_record_round_trips() {
        let p = prefix("c");
        let v = serde_json::to_vec(&good()).unwrap();
        assert_eq!(parse(&p, key("c", "w1").as_bytes(), &v).unwrap(), good());
    }

    #[test]
    fn bad_records_are_refused_with_the_field() {
        let p = prefix("c");
        let k = key("c", "w1");
        let with = |f: &dyn Fn(&mut serde_json::Value)| {
            let mut v = serde_json::to_value(good()).unwrap();
            f(&mut v);
            serde_json::to_vec(&v).unwrap()
        };
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (b"not json".to_vec(), "expected"),
            (with(&|v| v["memory_bytes"] = "lots".into()), "field `memory_bytes`"),
            (with(&|v| drop(v.as_object_mut().unwrap().remove("address"))), "missing field `address`"),
            (with(&|v| v["address"] = "nohost".into()), "field `address`"),
            (with(&|v| v["address"] = "h:99999".into()), "field `address`"),
            (with(&|v| v["id"] = "w2".into()), "the key says \"w1\""),
            (with(&|v| v["protocol"] = "tessera.v0".into()), "field `protocol` is \"tessera.v0\""),
        ];
        for (value, want) in cases {
            let e = parse(&p, k.as_bytes(), &value).unwrap_err();
            assert!(e.contains(want) && e.contains("/tessera/c/workers/w1"), "{want:?} not in {e:?}");
        }
        assert!(parse(&p, b"/tessera/c/workers/", b"{}").is_err());
        assert!(parse(&p, b"/other/w1", b"{}").is_err());
    }

    #[test]
    fn names_are_key_segments() {
        assert!(check_name("cluster", "prod-1").is_ok());
        assert!(check_name("worker id", "10.0.0.5:50051").is_ok());
        for bad in ["", "a/b", "a b", &"x".repeat(129)] {
            assert!(check_name("cluster", bad).is_err(), "{bad:?}");
        }
    }
}
