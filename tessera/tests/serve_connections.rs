//! Connections that hold the server without finishing a request (sending nothing, half a request line, a
//! declared body never sent): they are closed on their deadlines, logged, and cannot keep `/health`
//! unanswered, even when they outnumber the process's file descriptors.

mod common;

use std::{
    io::{Read, Write},
    net::TcpStream,
    time::{Duration, Instant},
};

use common::*;
use tessera_bench::http_client::HttpClient;

#[test]
fn idle_and_stalled_connections_are_closed_and_health_is_answered_under_ulimit_64() {
    let s = Server::start_with_fd_limit(64, &["--header-timeout", "1", "--body-timeout", "1"]);
    let addr = s.base.trim_start_matches("http://").to_string();
    let mut held = Vec::new();
    for i in 0..60 {
        let mut c = TcpStream::connect(&addr).unwrap();
        match i % 3 {
            0 => {}
            1 => c.write_all(b"POST /v1/compl").unwrap(),
            _ => c
                .write_all(b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-length: 100\r\n\r\n{\"prompt\"")
                .unwrap(),
        }
        held.push((i, c));
    }
    // More connections than descriptors are held; the probe must still get through once they time out.
    let started = Instant::now();
    let health = rt().block_on(async {
        let client = HttpClient::new();
        tokio::time::timeout(Duration::from_secs(20), client.get(&s.url("/health"))).await
    });
    let health = health.expect("/health unanswered for 20 s behind stalled connections").unwrap();
    assert_eq!(health.status, 200);
    eprintln!("/health answered after {:?}", started.elapsed());
    for (i, mut c) in held {
        c.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let mut got = Vec::new();
        let _ = c.read_to_end(&mut got);
        let got = String::from_utf8_lossy(&got);
        if i % 3 == 2 {
            assert!(got.starts_with("HTTP/1.1 408"), "connection {i}: a body never sent got {got:?}");
            assert!(got.contains("request_timeout"), "{got}");
        } else {
            assert!(got.is_empty(), "connection {i}: a head never finished got {got:?}");
        }
    }
    assert!(s.logged("sent no complete request head in time"), "header timeouts are not logged");
    assert!(s.logged("body did not arrive in time"), "body timeouts are not logged");
    assert!(s.logged("connection limit reached"), "the connection bound is not logged");
    assert!(s.logged("--max-connections lowered to fit the open-file limit"));
}

#[test]
fn timeouts_and_connection_bound_that_cannot_work_stop_the_server_at_start() {
    for args in [
        ["--header-timeout", "0"],
        ["--body-timeout=-1", ""],
        ["--body-timeout", "NaN"],
        ["--header-timeout", "1e300"],
        ["--max-connections", "0"],
    ] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_tessera"))
            .args(["serve", "--port", "0"])
            .args(args.iter().filter(|a| !a.is_empty()))
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} started");
        let flag = args[0].split('=').next().unwrap();
        assert!(err.contains(flag), "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{args:?}: {err}");
    }
}
