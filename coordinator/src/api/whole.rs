//! The answer to a request that does not stream: every event until all choices finish, then one JSON body,
//! a `text_completion` or a `chat.completion` as OpenAI shapes them.

use axum::{
    Json,
    response::{IntoResponse, Response},
};
use serde_json::{Value, json};

use super::{
    error::ApiError,
    output::{chat_logprobs, completion_logprobs},
    reply::{Kind, Reply, backend_error},
};

pub(super) async fn whole_reply(mut r: Reply) -> Response {
    while !r.all_finished() {
        let Some(ev) = r.rx.recv().await else {
            return ApiError::internal("The engine stopped before the request finished.").into_response();
        };
        if let Err(m) = r.apply(ev) {
            return backend_error(&m).into_response();
        }
    }
    r.bill_completed().await;
    let choices: Vec<Value> = r
        .choices
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let logprobs = match (r.opts.logprobs, r.kind) {
                (None, _) => Value::Null,
                (Some(_), Kind::Completion) => completion_logprobs(&c.logprobs),
                (Some(_), Kind::Chat) => chat_logprobs(&c.logprobs),
            };
            match r.kind {
                Kind::Completion => {
                    json!({ "index": i, "text": c.text, "logprobs": logprobs, "finish_reason": Reply::finish_str(c) })
                }
                Kind::Chat => json!({
                    "index": i,
                    "message": { "role": "assistant", "content": c.text, "refusal": null },
                    "logprobs": logprobs,
                    "finish_reason": Reply::finish_str(c),
                }),
            }
        })
        .collect();
    let mut body = json!({
        "id": r.name,
        "object": if r.kind == Kind::Chat { "chat.completion" } else { "text_completion" },
        "created": r.created,
        "model": r.s.model_name,
        "choices": choices,
        "usage": r.usage(),
    });
    if r.kind == Kind::Chat {
        body["system_fingerprint"] = Value::Null;
    }
    Json(body).into_response()
}
