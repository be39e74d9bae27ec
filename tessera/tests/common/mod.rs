//! A `tessera serve` (or `tessera coordinator`) process for tests: started on a free port, stopped when
//! dropped. `etcd`: an etcd server and cluster workers for the cluster-mode tests.

#![allow(dead_code)]

pub mod etcd;

use std::{
    io::{BufRead, BufReader},
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::mpsc,
    time::Duration,
};

use serde_json::Value;
use tessera_bench::http_client::HttpClient;

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// A child process the test owns: killed and reaped when dropped.
pub struct Process(Child);

impl Process {
    pub fn new(child: Child) -> Self {
        Process(child)
    }

    pub fn pid(&self) -> u32 {
        self.0.id()
    }

    /// Kills the process at once (SIGKILL) and reaps it.
    pub fn kill(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }

    /// SIGTERM, and waits for it to exit.
    pub fn terminate(&mut self) {
        self.signal(libc::SIGTERM);
        let _ = self.0.wait();
    }

    /// Sends `sig` (SIGSTOP, SIGCONT, ...) and returns at once.
    pub fn signal(&self, sig: i32) {
        // SAFETY: signalling a child process we own and have not reaped.
        unsafe { libc::kill(self.0.id() as i32, sig) };
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.kill();
    }
}

pub struct Server {
    process: Process,
    /// `http://127.0.0.1:PORT`
    pub base: String,
    /// Every line the server wrote to stderr so far.
    pub log: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

impl Server {
    /// `tessera serve --port 0 ARGS...`, waiting for its "serving ... on URL" line.
    pub fn start(args: &[&str]) -> Server {
        Self::start_env(args, &[])
    }

    /// [`Server::start`] with extra environment variables.
    pub fn start_env(args: &[&str], env: &[(&str, &str)]) -> Server {
        let mut all = vec!["serve", "--port", "0"];
        all.extend_from_slice(args);
        Self::launch(&all, "tessera serving", env)
    }

    /// `tessera coordinator --port 0 ARGS...`, waiting until it listens (not until a replica is ready).
    pub fn coordinator(args: &[&str]) -> Server {
        let mut all = vec!["coordinator", "--port", "0"];
        all.extend_from_slice(args);
        Self::launch(&all, "tessera coordinator", &[])
    }

    /// `tessera ARGS...`, waiting for the stderr line with `marker` and then ` on URL`.
    pub fn launch(args: &[&str], marker: &'static str, env: &[(&str, &str)]) -> Server {
        let mut command = Command::new(env!("CARGO_BIN_EXE_tessera"));
        command.args(args).envs(env.iter().copied());
        Self::spawn(command, marker)
    }

    /// `tessera serve --port 0 ARGS...` with its open-file limit (`ulimit -n`) set to `nofile`.
    pub fn start_with_fd_limit(nofile: u32, args: &[&str]) -> Server {
        let mut command = Command::new("sh");
        command.args(["-c", &format!("ulimit -n {nofile} && exec \"$0\" \"$@\""), env!("CARGO_BIN_EXE_tessera")]);
        command.args(["serve", "--port", "0"]).args(args);
        Self::spawn(command, "tessera serving")
    }

    /// Runs `command` (which starts tessera), waiting for the stderr line with `marker` and then ` on URL`.
    pub fn spawn(mut command: Command, marker: &'static str) -> Server {
        let mut child = command.stdout(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap();
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = mpsc::channel();
        let log = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let sink = log.clone();
        std::thread::spawn(move || {
            let mut lines = BufReader::new(stderr).lines();
            for line in lines.by_ref() {
                let Ok(line) = line else { break };
                // The startup banner, plain or inside a JSON log event.
                if let Some(rest) = line.split(marker).nth(1)
                    && let Some(url) = rest.split(" on ").nth(1)
                {
                    let url: String = url.chars().take_while(|c| !c.is_whitespace() && *c != '"').collect();
                    let _ = tx.send(Ok(url.trim_end_matches("/v1").to_string()));
                    break;
                }
                sink.lock().unwrap().push(line);
            }
            let _ = tx.send(Err(format!("tessera exited before it printed {marker:?}")));
            for line in lines.map_while(Result::ok) {
                sink.lock().unwrap().push(line);
            }
        });
        let base = rx.recv_timeout(Duration::from_secs(60)).expect("tessera did not start in 60 s").unwrap();
        Server { process: Process::new(child), base, log }
    }

    /// Whether some line it logged contains `text`.
    pub fn logged(&self, text: &str) -> bool {
        self.log.lock().unwrap().iter().any(|l| l.contains(text))
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// The value of a metric line (first match of `name{` or `name `).
    pub async fn metric(&self, client: &HttpClient, name: &str) -> f64 {
        let text = String::from_utf8(client.get(&self.url("/metrics")).await.unwrap().body.to_vec()).unwrap();
        text.lines()
            .find(|l| l.starts_with(&format!("{name}{{")) || l.starts_with(&format!("{name} ")))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("metric {name} missing"))
    }
}

impl std::ops::Deref for Server {
    type Target = Process;
    fn deref(&self) -> &Process {
        &self.process
    }
}

impl std::ops::DerefMut for Server {
    fn deref_mut(&mut self) -> &mut Process {
        &mut self.process
    }
}

pub fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap()
}

/// A greedy completion's text.
pub async fn complete(client: &HttpClient, s: &Server, prompt: &str, max_tokens: usize) -> String {
    let r = client
        .post_json(
            &s.url("/v1/completions"),
            &serde_json::json!({"model": "stories260K", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0}),
        )
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let v: Value = r.json().unwrap();
    v["choices"][0]["text"].as_str().unwrap().to_string()
}

/// `tessera keys create --tenant TENANT --id ID [--models M]`: (the secret, printed once; the file entry).
pub fn create_key(tenant: &str, id: &str, models: Option<&str>) -> (String, Value) {
    let mut args = vec!["keys", "create", "--tenant", tenant, "--id", id];
    if let Some(m) = models {
        args.extend(["--models", m]);
    }
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_tessera")).args(&args).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let out = String::from_utf8(o.stdout).unwrap();
    let secret = out.lines().next().unwrap().rsplit(' ').next().unwrap().to_string();
    let entry: Value = serde_json::from_str(out.lines().last().unwrap()).unwrap();
    assert!(!out.lines().last().unwrap().contains(&secret), "the entry holds the hash, not the secret");
    (secret, entry)
}

/// The live child processes of `pid` (worker processes), from `/proc`, in pid order.
pub fn children_of(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(p) = e.file_name().to_string_lossy().parse::<u32>() else { continue };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{p}/stat")) else { continue };
        // Fields after the parenthesised command name: state, ppid, ...
        let rest = &stat[stat.rfind(')').unwrap() + 2..];
        let mut fields = rest.split(' ');
        let state = fields.next().unwrap();
        let ppid: u32 = fields.next().unwrap().parse().unwrap();
        if ppid == pid && state != "Z" {
            out.push(p);
        }
    }
    out.sort();
    out
}

/// A Python that can import `modules` (comma-separated, as in an `import` line): `TESSERA_PYTHON`, which
/// .ci/run sets up, or `python3`. `None` (the test skips) only when `TESSERA_SKIP_PYTHON` is set; otherwise
/// a missing package fails the test with how to install it.
pub fn python_with(modules: &str, pip: &str) -> Option<String> {
    let python = std::env::var("TESSERA_PYTHON").unwrap_or_else(|_| "python3".into());
    let probe = Command::new(&python).args(["-c", &format!("import {modules}")]).output();
    if probe.is_ok_and(|o| o.status.success()) {
        return Some(python);
    }
    if std::env::var_os("TESSERA_SKIP_PYTHON").is_some() {
        eprintln!("skipped: TESSERA_SKIP_PYTHON is set");
        return None;
    }
    panic!(
        "this test needs {modules}: `python3 -m pip install {pip}`, or point TESSERA_PYTHON at a Python that has \
         them (.ci/run does)"
    );
}
