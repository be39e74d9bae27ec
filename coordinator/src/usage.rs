//! The usage ledger: one SQLite row per request (`--usage-db FILE`), what a paid endpoint bills from.
//!
//! A row is written when the request ends: key id, tenant, model, prompt / cached prompt / completion
//! tokens, status (`completed`, `cancelled`, `error`), finish reason(s), start and end time, request id.
//! A request that completes is written *before* its last bytes go out (the non-streaming body, or the
//! stream's usage chunk and `[DONE]`), and the response waits for the commit: so every response a client
//! received in full has its row, even if the server is killed the next instant. A request cut off (client
//! gone, replica failed) is written when it ends, with what was produced: that is what it is billed.
//!
//! One writer thread owns the connection and commits whatever has queued up in one transaction (group
//! commit), so the cost per request stays small at high concurrency. WAL journal with `synchronous=NORMAL`:
//! a committed transaction survives the process being killed (it is in the operating system's hands);
//! only a power loss can take the last ones. The request id is the primary key, so a row can never be
//! written twice.

use std::{
    path::{Path, PathBuf},
    sync::mpsc,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context, Result, bail};
use rusqlite::{Connection, OpenFlags, params};
use serde::Serialize;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS usage (
    request_id        TEXT PRIMARY KEY,
    key_id            TEXT,
    tenant            TEXT,
    model             TEXT NOT NULL,
    prompt_tokens     INTEGER NOT NULL,
    cached_tokens     INTEGER NOT NULL,
    completion_tokens INTEGER NOT NULL,
    status            TEXT NOT NULL,
    finish_reason     TEXT NOT NULL,
    started_at        REAL NOT NULL,
    ended_at          REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS usage_started_at ON usage (started_at);
";

/// One request's row.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct UsageRecord {
    pub request_id: String,
    pub key_id: Option<String>,
    pub tenant: Option<String>,
    pub model: String,
    pub prompt_tokens: u64,
    pub cached_tokens: u64,
    pub completion_tokens: u64,
    /// `completed`, `cancelled` or `error`.
    pub status: &'static str,
    /// Per choice, comma-separated: `stop`, `length`, `abort`.
    pub finish_reason: String,
    /// Unix seconds.
    pub started_at: f64,
    pub ended_at: f64,
}

pub fn unix_seconds() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64())
}

type Ack = tokio::sync::oneshot::Sender<Result<(), String>>;

/// The writer of a ledger file. Cloning shares the writer.
#[derive(Clone)]
pub struct Ledger {
    tx: mpsc::Sender<(UsageRecord, Option<Ack>)>,
    pub path: PathBuf,
}

fn open_rw(path: &Path) -> Result<Connection> {
    let conn = Connection::open(path).with_context(|| format!("opening usage ledger {}", path.display()))?;
    conn.busy_timeout(Duration::from_secs(5))?;
    let mode: String = conn.query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0))?;
    if !mode.eq_ignore_ascii_case("wal") {
        bail!("{}: could not switch the usage ledger to WAL mode (got {mode})", path.display());
    }
    conn.execute_batch("PRAGMA synchronous=NORMAL;")?;
    conn.execute_batch(SCHEMA).with_context(|| format!("{}: creating the usage table", path.display()))?;
    Ok(conn)
}

/// Opens a ledger read-only (for summaries) while a server may be writing it.
pub fn open_read(path: &Path) -> Result<Connection> {
    if !path.exists() {
        bail!("usage ledger {} does not exist", path.display());
    }
    let conn = Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX)
        .with_context(|| format!("opening usage ledger {}", path.display()))?;
    conn.busy_timeout(Duration::from_secs(5))?;
    Ok(conn)
}

impl Ledger {
    /// Opens (creating if needed) the ledger at `path` and starts its writer thread.
    pub fn open(path: &Path) -> Result<Ledger> {
        let conn = open_rw(path)?;
        let (tx, rx) = mpsc::channel::<(UsageRecord, Option<Ack>)>();
        let shown = path.display().to_string();
        std::thread::Builder::new()
            .name("usage-ledger".into())
            .spawn(move || writer(conn, rx, &shown))
            .context("starting the usage ledger writer")?;
        Ok(Ledger { tx, path: path.to_path_buf() })
    }

    /// Queues a row; returns at once.
    pub fn record(&self, r: UsageRecord) {
        if self.tx.send((r, None)).is_err() {
            tracing::error!("usage ledger writer has stopped: a row was not written");
        }
    }

    /// Queues a row and waits until it is committed.
    pub async fn record_durably(&self, r: UsageRecord) -> Result<(), String> {
        let (ack, done) = tokio::sync::oneshot::channel();
        self.tx.send((r, Some(ack))).map_err(|_| "usage ledger writer has stopped".to_string())?;
        done.await.map_err(|_| "usage ledger writer has stopped".to_string())?
    }
}

fn writer(mut conn: Connection, rx: mpsc::Receiver<(UsageRecord, Option<Ack>)>, path: &str) {
    while let Ok(first) = rx.recv() {
        let mut batch = vec![first];
        batch.extend(rx.try_iter());
        let result = insert_all(&mut conn, batch.iter().map(|(r, _)| r)).map_err(|e| format!("{path}: {e}"));
        if let Err(e) = &result {
            tracing::error!(error = %e, rows = batch.len(), "usage ledger write failed");
        }
        for (_, ack) in batch {
            if let Some(ack) = ack {
                let _ = ack.send(result.clone());
            }
        }
    }
}

fn insert_all<'a>(conn: &mut Connection, rows: impl Iterator<Item = &'a UsageRecord>) -> rusqlite::Result<()> {
    let tx = conn.transaction()?;
    {
        let mut stmt = tx.prepare_cached(
            "INSERT INTO usage (request_id, key_id, tenant, model, prompt_tokens, cached_tokens, completion_tokens,
                                status, finish_reason, started_at, ended_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
        )?;
        for r in rows {
            stmt.execute(params![
                r.request_id,
                r.key_id,
                r.tenant,
                r.model,
                r.prompt_tokens as i64,
                r.cached_tokens as i64,
                r.completion_tokens as i64,
                r.status,
                r.finish_reason,
                r.started_at,
                r.ended_at,
            ])?;
        }
    }
    tx.commit()
}

/// How totals are grouped.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum By {
    Key,
    Tenant,
    Model,
    Day,
}

/// Totals of one group.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Totals {
    /// The key id, tenant, model or day (`YYYY-MM-DD`, UTC); `-` for requests made without a key.
    pub group: String,
    pub requests: u64,
    pub prompt_tokens: u64,
    pub cached_tokens: u64,
    pub completion_tokens: u64,
    pub total_tokens: u64,
}

/// Totals per group of the requests that started at or after `since` (unix seconds).
pub fn summarize(conn: &Connection, since: f64, by: By) -> Result<Vec<Totals>> {
    let group = match by {
        By::Key => "COALESCE(key_id, '-')",
        By::Tenant => "COALESCE(tenant, '-')",
        By::Model => "model",
        By::Day => "date(started_at, 'unixepoch')",
    };
    let sql = format!(
        "SELECT {group} AS g, COUNT(*), SUM(prompt_tokens), SUM(cached_tokens), SUM(completion_tokens)
         FROM usage WHERE started_at >= ?1 GROUP BY g ORDER BY g"
    );
    let mut stmt = conn.prepare(&sql)?;
    let rows = stmt.query_map(params![since], |r| {
        let (p, c, o): (i64, i64, i64) = (r.get(2)?, r.get(3)?, r.get(4)?);
        Ok(Totals {
            group: r.get(0)?,
            requests: r.get::<_, i64>(1)? as u64,
            prompt_tokens: p as u64,
            cached_tokens: c as u64,
            completion_tokens: o as u64,
            total_tokens: (p + o) as u64,
        })
    })?;
    Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
}

/// Parses `--since`: unix seconds, a UTC date `YYYY-MM-DD`, or an age like `90m`, `24h`, `7d`.
pub fn parse_since(s: &str, now: f64) -> Result<f64, String> {
    let s = s.trim();
    if let Ok(v) = s.parse::<f64>() {
        return Ok(v);
    }
    if let Some((n, unit)) = s.split_at_checked(s.len().saturating_sub(1))
        && let Ok(n) = n.parse::<f64>()
    {
        let secs = match unit {
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            "d" => 86400.0,
            _ => return Err(format!("unknown unit in {s:?}: use s, m, h or d")),
        };
        return Ok(now - n * secs);
    }
    let parts: Vec<&str> = s.split('-').collect();
    if let [y, m, d] = parts[..]
        && let (Ok(y), Ok(m), Ok(d)) = (y.parse::<i64>(), m.parse::<u32>(), d.parse::<u32>())
        && (1..=12).contains(&m)
        && (1..=31).contains(&d)
    {
        return Ok(days_from_civil(y, m, d) as f64 * 86400.0);
    }
    Err(format!("cannot read {s:?} as a time: use unix seconds, YYYY-MM-DD, or an age like 24h or 7d"))
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = if y >= 0 { y } else { y - 399 } / 400;
    let yoe = y - era * 400;
    let mp = (m as i64 + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d as i64 - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(id: &str, key: Option<&str>, model: &str, p: u64, c: u64, started: f64) -> UsageRecord {
        UsageRecord {
            request_id: id.into(),
            key_id: key.map(str::to_string),
            tenant: key.map(|k| format!("tenant-of-{k}")),
            model: model.into(),
            prompt_tokens: p,
            cached_tokens: p / 2,
            completion_tokens: c,
            status: "completed",
            finish_reason: "stop".into(),
            started_at: started,
            ended_at: started + 1.0,
        }
    }

    #[tokio::test]
    async fn rows_are_written_once_and_summed_by_group() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("usage.db");
        let ledger = Ledger::open(&path).unwrap();
        let day2 = days_from_civil(2026, 11, 27) as f64 * 86400.0;
        ledger.record_durably(row("a", Some("k1"), "m", 10, 5, day2)).await.unwrap();
        ledger.record(row("b", Some("k1"), "m", 20, 7, day2 + 10.0));
        ledger.record_durably(row("c", Some("k2"), "m2", 1, 1, day2 - 86400.0)).await.unwrap();
        ledger.record_durably(row("d", None, "m", 3, 0, day2 + 20.0)).await.unwrap();
        // The same request id twice is refused: a request is billed once.
        let dup = ledger.record_durably(row("a", Some("k1"), "m", 10, 5, day2)).await;
        assert!(dup.unwrap_err().contains("UNIQUE"), "a duplicate row must be refused");
        let conn = open_read(&path).unwrap();
        let by_key = summarize(&conn, 0.0, By::Key).unwrap();
        assert_eq!(by_key.iter().map(|t| t.group.as_str()).collect::<Vec<_>>(), ["-", "k1", "k2"]);
        let k1 = &by_key[1];
        assert_eq!(
            (k1.requests, k1.prompt_tokens, k1.cached_tokens, k1.completion_tokens, k1.total_tokens),
            (2, 30, 15, 12, 42)
        );
        let by_day = summarize(&conn, 0.0, By::Day).unwrap();
        assert_eq!(
            by_day.iter().map(|t| (t.group.as_str(), t.requests)).collect::<Vec<_>>(),
            [("2026-11-26", 1), ("2026-11-27", 3)]
        );
        let since = summarize(&conn, day2, By::Tenant).unwrap();
        assert_eq!(since.iter().map(|t| t.group.as_str()).collect::<Vec<_>>(), ["-", "tenant-of-k1"]);
        assert_eq!(summarize(&conn, 0.0, By::Model).unwrap().len(), 2);
        let ok: String = conn.query_row("PRAGMA integrity_check", [], |r| r.get(0)).unwrap();
        assert_eq!(ok, "ok");
    }

    #[test]
    fn since_accepts_seconds_dates_and_ages() {
        let now = 1_000_000.0;
        assert_eq!(parse_since("12345", now), Ok(12345.0));
        assert_eq!(parse_since("2h", now), Ok(now - 7200.0));
        assert_eq!(parse_since("7d", now), Ok(now - 7.0 * 86400.0));
        assert_eq!(parse_since("1970-01-02", now), Ok(86400.0));
        assert_eq!(parse_since("2026-11-27", now), Ok(days_from_civil(2026, 11, 27) as f64 * 86400.0));
        assert_eq!(days_from_civil(2000, 3, 1), 11_017);
        for bad in ["yesterday", "5w", "2026-13-01", ""] {
            assert!(parse_since(bad, now).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_missing_or_unwritable_ledger_is_a_clear_error() {
        let err = open_read(Path::new("/no/such/usage.db")).unwrap_err().to_string();
        assert!(err.contains("/no/such/usage.db"), "{err}");
        let err = Ledger::open(Path::new("/no/such/dir/usage.db")).err().unwrap().to_string();
        assert!(err.contains("/no/such/dir/usage.db"), "{err}");
    }
}
