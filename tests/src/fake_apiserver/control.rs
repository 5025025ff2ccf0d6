//! The `/control/...` endpoints: how a lab test drives a running `fake-apiserver` (apply and
//! delete objects, compact, bookmarks, dropped connections, downtime, the request log, RBAC).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::http::{Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use super::{Shared, lock};

fn reply(code: StatusCode, v: Value) -> Response {
    (
        code,
        [(header::CONTENT_TYPE, "application/json")],
        v.to_string(),
    )
        .into_response()
}

fn bad(msg: String) -> Response {
    reply(StatusCode::BAD_REQUEST, json!({ "error": msg }))
}

pub(super) async fn handle(
    sh: &Arc<Shared>,
    method: &Method,
    what: &str,
    q: &BTreeMap<String, String>,
    body: &Bytes,
) -> Response {
    let rv = |sh: &Shared| json!({ "resourceVersion": lock(&sh.store).resource_version() });
    match (method.clone(), what) {
        (Method::POST, "apply") => {
            let text = String::from_utf8_lossy(body);
            match sh.apply_yaml(&text) {
                Ok(_) => reply(StatusCode::OK, rv(sh)),
                Err(e) => bad(format!("{e:#}")),
            }
        }
        (Method::POST, "delete") => {
            let (Some(kind), Some(name)) = (q.get("kind"), q.get("name")) else {
                return bad("delete needs kind= and name=".into());
            };
            match sh.delete_kind(
                q.get("apiVersion").map(String::as_str),
                kind,
                q.get("namespace").map(String::as_str),
                name,
            ) {
                Ok(found) => reply(StatusCode::OK, json!({ "deleted": found })),
                Err(e) => bad(format!("{e:#}")),
            }
        }
        (Method::POST, "compact") => {
            lock(&sh.store).compact();
            reply(StatusCode::OK, rv(sh))
        }
        (Method::POST, "bookmarks") => {
            sh.bookmark_tx.send_modify(|n| *n += 1);
            reply(StatusCode::OK, rv(sh))
        }
        (Method::POST, "disconnect") => {
            // After this response is written: the connection carrying it is dropped too.
            let body = rv(sh);
            let sh = sh.clone();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(50)).await;
                sh.kill_tx.send_modify(|n| *n += 1);
            });
            reply(StatusCode::OK, body)
        }
        (Method::POST, "down") => {
            let secs: f64 = q.get("seconds").and_then(|s| s.parse().ok()).unwrap_or(5.0);
            // The supervisor task stops and restarts the server (not this connection's task,
            // which the stop aborts).
            let _ = sh.down_tx.send(Duration::from_secs_f64(secs.max(0.0)));
            reply(StatusCode::OK, json!({ "downForSeconds": secs }))
        }
        (Method::GET, "requests") => {
            let reqs: Vec<Value> = lock(&sh.requests)
                .iter()
                .map(|r| json!({"method": r.method, "path": r.path, "query": r.query}))
                .collect();
            reply(StatusCode::OK, Value::Array(reqs))
        }
        (Method::POST, "authorize") => {
            let text = String::from_utf8_lossy(body);
            if text.trim().is_empty() {
                *lock(&sh.authz) = None;
                return reply(StatusCode::OK, json!({ "authorizer": null }));
            }
            match super::authz::Authorizer::from_role_yaml(&text) {
                Ok(a) => {
                    let name = a.name.clone();
                    *lock(&sh.authz) = Some(a);
                    reply(StatusCode::OK, json!({ "authorizer": name }))
                }
                Err(e) => bad(format!("not a ClusterRole: {e:#}")),
            }
        }
        (Method::GET, "denied") => reply(
            StatusCode::OK,
            Value::Array(lock(&sh.denied).iter().map(|d| json!(d)).collect()),
        ),
        (Method::GET, "events") => reply(StatusCode::OK, Value::Array(sh.event_values())),
        (Method::GET, "resource-version") => reply(StatusCode::OK, rv(sh)),
        _ => reply(
            StatusCode::NOT_FOUND,
            json!({ "error": format!("no control endpoint {method} /control/{what}") }),
        ),
    }
}
