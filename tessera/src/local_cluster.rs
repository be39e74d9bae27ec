//! A local cluster: `tp` worker processes on loopback ports, started and owned by this process
//! (`tessera generate --tp N`, `tessera serve --tp N`).
//!
//! Workers are this same binary (`tessera worker --listen 127.0.0.1:0`). Each one reports its addresses on
//! its first stdout line. They are stopped when the [`LocalCluster`] is dropped (normal exit, error, or a
//! Ctrl-C handled by the caller), and they exit by themselves when their standard input closes, which is
//! what happens if this process is killed outright: no orphans either way. They get the cluster token
//! through their environment and refuse callers without it.

use std::{
    io::{BufRead, BufReader},
    path::Path,
    process::{Child, Command, Stdio},
    sync::mpsc,
    time::Duration,
};

use anyhow::{Context, Result, anyhow, bail};
use tessera_proto::auth::ClusterToken;

/// How long a worker may take to start listening.
const START_TIMEOUT: Duration = Duration::from_secs(30);

pub struct LocalCluster {
    children: Vec<Child>,
    /// gRPC address of each worker, in rank order.
    pub addrs: Vec<String>,
    /// Hears which worker exited, for each one that does (its standard output closed).
    exits: Option<mpsc::Receiver<String>>,
}

impl LocalCluster {
    /// Starts `n` workers of the running binary; `extra` are passed to each (log format, OTLP export), and
    /// each requires `token` of its callers.
    pub fn start(
        n: usize,
        threads_per_worker: usize,
        kv_cache_mib: usize,
        extra: &[String],
        token: &ClusterToken,
    ) -> Result<Self> {
        let exe = std::env::current_exe().context("locating the tessera binary")?;
        Self::start_with_args(&exe, n, threads_per_worker, kv_cache_mib, extra, token)
    }

    /// Starts `n` workers of the `tessera` binary at `exe`, with no cluster token.
    pub fn start_with(exe: &Path, n: usize, threads_per_worker: usize, kv_cache_mib: usize) -> Result<Self> {
        Self::start_with_args(exe, n, threads_per_worker, kv_cache_mib, &[], &ClusterToken::none())
    }

    /// [`LocalCluster::start_with`], passing `extra` arguments to every worker, which require `token`.
    pub fn start_with_args(
        exe: &Path,
        n: usize,
        threads_per_worker: usize,
        kv_cache_mib: usize,
        extra: &[String],
        token: &ClusterToken,
    ) -> Result<Self> {
        let (exited, exits) = mpsc::channel();
        let mut cluster = LocalCluster { children: Vec::new(), addrs: Vec::new(), exits: Some(exits) };
        for rank in 0..n {
            let mut command = Command::new(exe);
            // Through the environment: a command line is readable by every user of the machine.
            match token.text() {
                Some(t) => command.env(tessera_proto::auth::ENV, t),
                None => command.env_remove(tessera_proto::auth::ENV),
            };
            let mut child = command
                .args(["worker", "--listen", "127.0.0.1:0", "--exit-with-parent"])
                .args(["--threads", &threads_per_worker.max(1).to_string()])
                .args(["--kv-cache-mib", &kv_cache_mib.to_string()])
                .args(extra)
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit())
                .spawn()
                .with_context(|| format!("starting worker {rank} ({})", exe.display()))?;
            let stdout = child.stdout.take().expect("piped");
            let pid = child.id();
            cluster.children.push(child);
            let exited = exited.clone();
            // Read the address line on a thread so a worker that never prints cannot block us forever.
            let (tx, rx) = mpsc::channel();
            std::thread::spawn(move || {
                let mut line = String::new();
                let mut reader = BufReader::new(stdout);
                let _ = tx.send(reader.read_line(&mut line).map(|_| line));
                // Keep draining so the worker never blocks writing to a full pipe; the end of its output is
                // the end of the process, seen at once even when no step is running to notice.
                let _ = std::io::copy(&mut reader, &mut std::io::sink());
                let _ = exited.send(format!("worker {rank} (pid {pid}) exited"));
            });
            let line = rx
                .recv_timeout(START_TIMEOUT)
                .map_err(|_| anyhow!("worker {rank} did not start listening within {START_TIMEOUT:?}"))?
                .with_context(|| format!("reading worker {rank}'s address"))?;
            let addr = line
                .strip_prefix("tessera worker listening on ")
                .and_then(|rest| rest.split_whitespace().next())
                .ok_or_else(|| anyhow!("worker {rank} exited or printed {line:?} instead of its address"))?;
            cluster.addrs.push(addr.to_string());
        }
        if cluster.addrs.len() != n {
            bail!("started {} of {n} workers", cluster.addrs.len());
        }
        Ok(cluster)
    }

    /// Hears, once for each worker that exits, which one it was (the first time only: later calls get
    /// `None`). Workers stopped by dropping the cluster are heard too.
    pub fn exits(&mut self) -> Option<mpsc::Receiver<String>> {
        self.exits.take()
    }

    /// Process ids of the workers, in rank order.
    pub fn pids(&self) -> Vec<u32> {
        self.children.iter().map(Child::id).collect()
    }
}

impl Drop for LocalCluster {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
        }
        for c in &mut self.children {
            let _ = c.wait();
        }
    }
}
