use std::time::{Duration, SystemTime, UNIX_EPOCH};

use k8s_openapi::api::core::v1::{Node, NodeSpec, Taint};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::*;
use crate::admin::listen;

fn at(secs: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(1_795_306_680 + secs)
}

#[test]
fn healthy_until_a_queued_change_waits_longer_than_the_timeout() {
    let h = HealthState::new(Duration::from_secs(60));
    assert!(h.status(at(0)).healthy, "healthy while starting up");
    h.queued(at(10));
    assert!(h.status(at(69)).healthy, "queued but not late yet");
    assert!(!h.status(at(70)).healthy, "late: 60 s after the change");
    h.synced(at(71));
    assert!(
        h.status(at(500)).healthy,
        "a successful sync clears the queue"
    );
    assert_eq!(h.status(at(500)).last_updated, Some(at(71)));
}

#[test]
fn only_the_oldest_queued_change_counts() {
    let h = HealthState::new(Duration::from_secs(60));
    h.queued(at(0));
    h.queued(at(50));
    assert!(!h.status(at(60)).healthy);
}

#[test]
fn unhealthy_before_the_first_sync_when_a_change_waits_too_long() {
    let h = HealthState::new(Duration::from_secs(60));
    h.queued(at(0));
    let s = h.status(at(61));
    assert!(!s.healthy);
    assert_eq!(s.last_updated, None);
    assert_eq!(
        livez_body(&s),
        r#"{"lastUpdated": "0001-01-01 00:00:00 +0000 UTC","currentTime": "2026-11-22 00:19:01 +0000 UTC"}"#
    );
}

fn node(deleting: bool, taint: Option<&str>) -> Node {
    Node {
        metadata: ObjectMeta {
            name: Some("n1".into()),
            deletion_timestamp: deleting.then_some(Time(jiff::Timestamp::UNIX_EPOCH)),
            ..Default::default()
        },
        spec: Some(NodeSpec {
            taints: taint.map(|k| {
                vec![Taint {
                    key: k.into(),
                    effect: "NoSchedule".into(),
                    ..Default::default()
                }]
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

#[test]
fn node_eligibility() {
    let h = HealthState::new(Duration::from_secs(60));
    assert!(h.status(at(0)).healthz());
    h.node(Some(&node(false, Some(TO_BE_DELETED_TAINT))));
    let s = h.status(at(0));
    assert!(s.healthy && !s.node_eligible && !s.healthz());
    h.node(Some(&node(false, Some("other"))));
    assert!(h.status(at(0)).healthz());
    h.node(Some(&node(true, None)));
    assert!(!h.status(at(0)).healthz());
    h.node(None);
    assert!(
        !h.status(at(0)).node_eligible,
        "no information changes nothing"
    );
    h.node(Some(&node(false, None)));
    assert!(h.status(at(0)).healthz());
    h.node_deleted();
    assert!(!h.status(at(0)).healthz());
}

#[test]
fn go_time_format() {
    assert_eq!(go_time(None), "0001-01-01 00:00:00 +0000 UTC");
    assert_eq!(go_time(Some(at(0))), "2026-11-22 00:18:00 +0000 UTC");
    assert_eq!(
        go_time(Some(at(0) + Duration::from_millis(500))),
        "2026-11-22 00:18:00.5 +0000 UTC"
    );
    assert_eq!(
        go_time(Some(at(0) + Duration::from_nanos(123_456_789))),
        "2026-11-22 00:18:00.123456789 +0000 UTC"
    );
}

#[test]
fn healthz_body_is_kube_proxys() {
    let h = HealthState::new(Duration::from_secs(60));
    h.synced(at(0));
    let s = h.status(at(5));
    // Healthy: lastUpdated is the current time (kube-proxy's compatibility rule).
    assert_eq!(
        healthz_body(&s),
        r#"{"lastUpdated": "2026-11-22 00:18:05 +0000 UTC","currentTime": "2026-11-22 00:18:05 +0000 UTC", "nodeEligible": true}"#
    );
    h.node_deleted();
    let s = h.status(at(5));
    assert_eq!(
        healthz_body(&s),
        r#"{"lastUpdated": "2026-11-22 00:18:00 +0000 UTC","currentTime": "2026-11-22 00:18:05 +0000 UTC", "nodeEligible": false}"#
    );
    let v: serde_json::Value = serde_json::from_str(&healthz_body(&s)).unwrap();
    assert_eq!(v["nodeEligible"], false);
}

#[test]
fn service_body_is_kube_proxys() {
    let body = service_body(&ServiceRef::new("ns", "lb"), 2, true);
    assert_eq!(
        body,
        "{\n\t\"service\": {\n\t\t\"namespace\": \"ns\",\n\t\t\"name\": \"lb\"\n\t},\n\t\"localEndpoints\": 2,\n\t\"serviceProxyHealthy\": true\n}"
    );
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["service"]["name"], "lb");
    assert_eq!(v["localEndpoints"], 2);
}

/// One HTTP/1.1 GET on 127.0.0.1:`port`: (status, headers lower-cased, body).
async fn get(port: u16, path: &str) -> (u16, Vec<(String, String)>, String) {
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).await.unwrap();
    let (head, body) = raw.split_once("\r\n\r\n").unwrap();
    let mut lines = head.lines();
    let status: u16 = lines
        .next()
        .unwrap()
        .split(' ')
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    let headers = lines
        .filter_map(|l| l.split_once(": "))
        .map(|(k, v)| (k.to_ascii_lowercase(), v.to_owned()))
        .collect();
    (status, headers, body.to_owned())
}

fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[tokio::test]
async fn proxy_health_server_answers_healthz_and_livez() {
    let metrics = Metrics::new(&[]);
    let h = HealthState::new(Duration::from_secs(60)).with_metrics(metrics.clone());
    let port = free_port();
    let task = serve(SocketAddr::from(([127, 0, 0, 1], port)), h.clone())
        .await
        .unwrap();
    let (code, headers, body) = get(port, "/healthz").await;
    assert_eq!(code, 200);
    assert_eq!(header(&headers, "content-type"), Some("application/json"));
    assert_eq!(header(&headers, "x-content-type-options"), Some("nosniff"));
    assert!(body.contains(r#""nodeEligible": true"#), "{body}");
    h.node_deleted();
    assert_eq!(get(port, "/healthz").await.0, 503);
    assert_eq!(get(port, "/livez").await.0, 200, "livez ignores the node");
    h.queued(SystemTime::now() - Duration::from_secs(120));
    assert_eq!(get(port, "/livez").await.0, 503);
    assert_eq!(get(port, "/other").await.0, 404);
    let text = metrics.encode();
    assert!(
        text.contains(r#"kubeproxy_proxy_healthz_total{code="200"} 1"#),
        "{text}"
    );
    assert!(
        text.contains(r#"kubeproxy_proxy_healthz_total{code="503"} 1"#),
        "{text}"
    );
    assert!(
        text.contains(r#"kubeproxy_proxy_livez_total{code="503"} 1"#),
        "{text}"
    );
    task.abort();
}

#[tokio::test]
async fn service_health_checks_open_answer_and_close() {
    let h = HealthState::new(Duration::from_secs(60));
    let mut servers = HealthCheckServers::new(h.clone(), vec!["127.0.0.1".parse().unwrap()]);
    let (p1, p2) = (free_port(), free_port());
    let svc = ServiceRef::new("ns", "lb");
    let other = ServiceRef::new("ns", "other");
    let mut want = vec![
        HealthCheckNodePort {
            service: svc.clone(),
            port: p1,
            local_endpoints: 2,
        },
        HealthCheckNodePort {
            service: other.clone(),
            port: p2,
            local_endpoints: 0,
        },
    ];
    assert!(servers.sync(&want).await.is_empty());
    assert_eq!(servers.open_ports().len(), 2);

    let (code, headers, body) = get(p1, "/healthz").await;
    assert_eq!(code, 200);
    assert_eq!(
        header(&headers, "x-load-balancing-endpoint-weight"),
        Some("2")
    );
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["service"]["namespace"], "ns");
    assert_eq!(v["localEndpoints"], 2);
    assert_eq!(v["serviceProxyHealthy"], true);
    // Any path answers, as kube-proxy's handler does.
    let (code, headers, _) = get(p2, "/").await;
    assert_eq!(code, 503);
    assert_eq!(
        header(&headers, "x-load-balancing-endpoint-weight"),
        Some("0")
    );

    // An unhealthy proxy fails every check.
    h.queued(SystemTime::now() - Duration::from_secs(120));
    let (code, _, body) = get(p1, "/").await;
    assert_eq!(code, 503);
    assert!(body.contains("\"serviceProxyHealthy\": false"), "{body}");
    h.synced(SystemTime::now());

    // Endpoint counts follow; a removed Service's port closes.
    want[0].local_endpoints = 0;
    want.truncate(1);
    assert!(servers.sync(&want).await.is_empty());
    assert_eq!(get(p1, "/").await.0, 503);
    assert!(
        tokio::net::TcpStream::connect(("127.0.0.1", p2))
            .await
            .is_err()
    );

    // A port change reopens on the new port.
    let p3 = free_port();
    want[0].port = p3;
    want[0].local_endpoints = 1;
    assert!(servers.sync(&want).await.is_empty());
    assert_eq!(get(p3, "/").await.0, 200);
    assert!(
        tokio::net::TcpStream::connect(("127.0.0.1", p1))
            .await
            .is_err()
    );

    // A port in use is reported and retried on the next sync.
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let busy_port = busy.local_addr().unwrap().port();
    want.push(HealthCheckNodePort {
        service: other.clone(),
        port: busy_port,
        local_endpoints: 1,
    });
    let errors = servers.sync(&want).await;
    assert_eq!(errors.len(), 1);
    assert!(errors[0].to_string().contains("ns/other"), "{}", errors[0]);
    drop(busy);
    assert!(servers.sync(&want).await.is_empty());
    assert_eq!(get(busy_port, "/").await.0, 200);

    servers.shutdown().await;
    assert!(
        tokio::net::TcpStream::connect(("127.0.0.1", p3))
            .await
            .is_err()
    );
}

#[tokio::test]
async fn unspecified_ipv4_listens_on_both_families_like_go() {
    let port = free_port();
    let listener = listen(SocketAddr::from(([0, 0, 0, 0], port)))
        .await
        .unwrap();
    let local = listener.local_addr().unwrap();
    let accept = tokio::spawn(async move {
        for _ in 0..2 {
            let _ = listener.accept().await;
        }
    });
    assert!(
        tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
    );
    if local.is_ipv6() {
        // IPv6 is available: the same socket takes IPv6 clients too.
        assert!(tokio::net::TcpStream::connect(("::1", port)).await.is_ok());
    }
    accept.abort();
}
