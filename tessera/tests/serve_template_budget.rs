//! A model whose chat template would run for minutes: chat requests get a 400 naming the template, the
//! rest of the API stays answerable meanwhile (rendering is off the HTTP runtime), and SIGTERM stops the
//! server promptly.

mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::{Value, json};
use tessera_bench::http_client::HttpClient;

const LOOPING: &str = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}hi";

#[test]
fn an_expensive_chat_template_blocks_nothing_else_and_shutdown_is_prompt() {
    let model = tempfile::tempdir().unwrap();
    for f in std::fs::read_dir(repo().join("models/stories260K")).unwrap().flatten() {
        std::fs::copy(f.path(), model.path().join(f.file_name())).unwrap();
    }
    let config = model.path().join("tokenizer_config.json");
    let mut c: Value = serde_json::from_str(&std::fs::read_to_string(&config).unwrap()).unwrap();
    c["chat_template"] = json!(LOOPING);
    std::fs::write(&config, c.to_string()).unwrap();
    let mut s = Server::start(&["--served-model-name", "stories260K", "--model", model.path().to_str().unwrap()]);
    rt().block_on(async {
        let client = HttpClient::new();
        let chat = json!({"model": "stories260K", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4});
        // More renders than cores: run on the HTTP runtime, they would hold every one of its threads.
        let chats: Vec<_> = (0..6)
            .map(|_| {
                let (client, url, chat) = (client.clone(), s.url("/v1/chat/completions"), chat.clone());
                tokio::spawn(async move { client.post_json(&url, &chat).await.unwrap() })
            })
            .collect();
        // Meanwhile, the rest of the API answers as usual.
        let mut slowest = Duration::ZERO;
        for _ in 0..5 {
            let t = Instant::now();
            assert_eq!(client.get(&s.url("/health")).await.unwrap().status, 200);
            complete(&client, &s, "Once", 4).await;
            slowest = slowest.max(t.elapsed());
        }
        eprintln!("slowest /health + completion while templates render: {slowest:?}");
        assert!(slowest < Duration::from_millis(750), "the API waited {slowest:?} behind chat templates");
        for c in chats {
            let r = c.await.unwrap();
            assert_eq!(r.status, 400, "{}", String::from_utf8_lossy(&r.body));
            let v: Value = r.json().unwrap();
            assert_eq!(v["error"]["param"], "messages");
            assert!(v["error"]["message"].as_str().unwrap().contains("chat template"), "{v}");
        }
    });
    // Renders in flight when SIGTERM comes do not hold the process. The requests are written first; a
    // round trip on a later connection has them read by the time the signal is sent.
    let addr = s.base.trim_start_matches("http://").to_string();
    let body = json!({"model": "stories260K", "messages": [{"role": "user", "content": "hi"}]}).to_string();
    let _held: Vec<_> = (0..4)
        .map(|_| {
            let mut c = std::net::TcpStream::connect(&addr).unwrap();
            let head = format!(
                "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
                body.len()
            );
            std::io::Write::write_all(&mut c, format!("{head}{body}").as_bytes()).unwrap();
            c
        })
        .collect();
    rt().block_on(async { assert_eq!(HttpClient::new().get(&s.url("/health")).await.unwrap().status, 200) });
    let t = Instant::now();
    s.terminate();
    eprintln!("stopped {:?} after SIGTERM", t.elapsed());
    assert!(t.elapsed() < Duration::from_secs(5), "SIGTERM took {:?}", t.elapsed());
}
