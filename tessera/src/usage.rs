//! `tessera usage`: totals from a usage ledger (`tessera serve --usage-db FILE`), by key, tenant, model or
//! day, as a table or JSON. The ledger itself is `tessera_coordinator::usage`.

use std::path::PathBuf;

use anyhow::Result;
use tessera_coordinator::usage::{By, open_read, parse_since, summarize, unix_seconds};

/// How totals are grouped (`--by`).
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum ByArg {
    Key,
    Tenant,
    Model,
    Day,
}

impl From<ByArg> for By {
    fn from(b: ByArg) -> By {
        match b {
            ByArg::Key => By::Key,
            ByArg::Tenant => By::Tenant,
            ByArg::Model => By::Model,
            ByArg::Day => By::Day,
        }
    }
}

/// `tessera usage`: totals from a ledger file.
#[derive(clap::Args, Debug)]
pub struct UsageArgs {
    /// The ledger file (`tessera serve --usage-db`).
    #[arg(long, value_name = "FILE")]
    pub db: PathBuf,
    /// Only requests that started at or after this: unix seconds, YYYY-MM-DD (UTC), or an age (24h, 7d).
    #[arg(long, value_name = "TIME")]
    pub since: Option<String>,
    /// Group totals by key id, tenant, model or day.
    #[arg(long, value_enum, default_value = "key")]
    pub by: ByArg,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

pub fn run(a: UsageArgs) -> Result<()> {
    let since = match &a.since {
        Some(s) => parse_since(s, unix_seconds()).map_err(anyhow::Error::msg)?,
        None => 0.0,
    };
    let by = By::from(a.by);
    let rows = summarize(&open_read(&a.db)?, since, by)?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&serde_json::json!({ "by": by, "data": rows }))?);
        return Ok(());
    }
    println!(
        "{:<24} {:>9} {:>14} {:>14} {:>14} {:>14}",
        format!("{by:?}").to_lowercase(),
        "requests",
        "prompt",
        "cached",
        "completion",
        "total"
    );
    for r in &rows {
        println!(
            "{:<24} {:>9} {:>14} {:>14} {:>14} {:>14}",
            r.group, r.requests, r.prompt_tokens, r.cached_tokens, r.completion_tokens, r.total_tokens
        );
    }
    Ok(())
}
