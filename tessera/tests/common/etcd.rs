//! A real etcd server for tests (Debian's `etcd-server`, or `TESSERA_ETCD`), on free loopback ports with a
//! temporary data directory, and `tessera worker` processes registered in it.

use std::{
    io::{BufRead, BufReader},
    process::{Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use serde_json::Value;
use tessera_bench::http_client::HttpClient;

use super::{Process, Server};

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

pub struct Etcd {
    process: Option<Process>,
    dir: tempfile::TempDir,
    client_port: u16,
    peer_port: u16,
    /// `http://127.0.0.1:PORT`
    pub endpoint: String,
}

impl Etcd {
    pub fn start() -> Etcd {
        let (client_port, peer_port) = (free_port(), free_port());
        let mut e = Etcd {
            process: None,
            dir: tempfile::tempdir().unwrap(),
            client_port,
            peer_port,
            endpoint: format!("http://127.0.0.1:{client_port}"),
        };
        e.spawn();
        e
    }

    /// Starts the server (again, on the same ports and data) and waits until it serves clients.
    fn spawn(&mut self) {
        let bin = std::env::var("TESSERA_ETCD").unwrap_or_else(|_| "etcd".into());
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let mut child = Command::new(&bin)
            .args(["--name", "test", "--data-dir"])
            .arg(self.dir.path())
            .args(["--listen-client-urls", &self.endpoint, "--advertise-client-urls", &self.endpoint])
            .args(["--listen-peer-urls", &peer, "--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &format!("test={peer}")])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {bin}: {e} (install Debian's etcd-server, or set TESSERA_ETCD)"));
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut tx = Some(tx);
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if line.contains("ready to serve client requests")
                    && let Some(tx) = tx.take()
                {
                    let _ = tx.send(());
                }
            }
        });
        rx.recv_timeout(Duration::from_secs(30)).expect("etcd did not become ready in 30 s");
        self.process = Some(Process::new(child));
    }

    /// Stops the server (SIGKILL: an outage, not a shutdown).
    pub fn stop(&mut self) {
        // Dropping the process kills and reaps it.
        self.process = None;
    }

    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }

    pub async fn client(&self) -> etcd_client::Client {
        etcd_client::Client::connect([self.endpoint.as_str()], None).await.unwrap()
    }
}

/// A `tessera worker` registered in etcd.
pub struct Worker {
    process: Process,
    pub id: String,
    /// Its gRPC address.
    pub addr: String,
}

impl Worker {
    pub fn start(etcd: &Etcd, cluster: &str, id: &str) -> Worker {
        Self::start_with(etcd, cluster, id, &[])
    }

    pub fn start_with(etcd: &Etcd, cluster: &str, id: &str, extra: &[&str]) -> Worker {
        let mut child = Command::new(env!("CARGO_BIN_EXE_tessera"))
            .args(["worker", "--listen", "127.0.0.1:0", "--threads", "1", "--kv-cache-mib", "16"])
            .args(["--etcd", &etcd.endpoint, "--cluster", cluster, "--id", id])
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let mut reader = BufReader::new(stdout);
        let mut line = String::new();
        reader.read_line(&mut line).unwrap();
        let addr = line
            .strip_prefix("tessera worker listening on ")
            .and_then(|r| r.split_whitespace().next())
            .unwrap_or_else(|| panic!("worker {id} printed {line:?}"))
            .to_string();
        std::thread::spawn(move || std::io::copy(&mut reader, &mut std::io::sink()));
        Worker { process: Process::new(child), id: id.to_string(), addr }
    }
}

impl std::ops::Deref for Worker {
    type Target = Process;
    fn deref(&self) -> &Process {
        &self.process
    }
}

impl std::ops::DerefMut for Worker {
    fn deref_mut(&mut self) -> &mut Process {
        &mut self.process
    }
}

/// `GET /v1/cluster`.
pub async fn cluster(client: &HttpClient, s: &Server) -> Value {
    let r = client.get(&s.url("/v1/cluster")).await.unwrap();
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    r.json().unwrap()
}

/// Polls `/v1/cluster` until `pred` holds; returns the state and how long it took. Panics after `limit`.
pub async fn wait_for(
    client: &HttpClient,
    s: &Server,
    limit: Duration,
    what: &str,
    pred: impl Fn(&Value) -> bool,
) -> (Value, Duration) {
    let t = Instant::now();
    loop {
        let v = cluster(client, s).await;
        if pred(&v) {
            return (v, t.elapsed());
        }
        assert!(t.elapsed() < limit, "no {what} within {limit:?}; cluster: {v:#}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Number of replicas serving.
pub fn replicas(v: &Value) -> usize {
    v["replicas"].as_array().map_or(0, Vec::len)
}

/// The state of worker `id` ("free", "serving", ...), if registered.
pub fn worker_state(v: &Value, id: &str) -> Option<String> {
    v["workers"].as_array()?.iter().find(|w| w["id"] == id).map(|w| w["state"].as_str().unwrap_or("").to_string())
}
