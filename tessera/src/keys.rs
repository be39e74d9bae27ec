//! `tessera keys create`: a new API key. The secret is printed once; the file gets only its hash
//! (`tessera_coordinator::api::auth`).

use anyhow::{Result, bail};
use clap::Subcommand;

#[derive(Subcommand, Debug)]
pub enum KeysCommand {
    /// Make a new key: prints the secret once, and the entry to add to the --api-keys file.
    Create {
        /// Tenant the key belongs to.
        #[arg(long)]
        tenant: String,
        /// Key id (default: derived from the secret's hash).
        #[arg(long)]
        id: Option<String>,
        /// Models the key may use, comma-separated (default: all).
        #[arg(long, value_delimiter = ',')]
        models: Option<Vec<String>>,
    },
}

pub fn run(cmd: KeysCommand) -> Result<()> {
    let KeysCommand::Create { tenant, id, models } = cmd;
    create(&tenant, id.as_deref(), models)
}

fn create(tenant: &str, id: Option<&str>, models: Option<Vec<String>>) -> Result<()> {
    if tenant.is_empty() {
        bail!("--tenant must not be empty");
    }
    let (secret, entry) = tessera_coordinator::api::auth::create(tenant, id, models);
    println!("secret (shown once, store it now): {secret}");
    println!("add this entry to the \"keys\" list of the --api-keys file:");
    println!("{}", serde_json::to_string(&entry)?);
    Ok(())
}
