//! Health servers, compatible with kube-proxy's (`pkg/proxy/healthcheck`): this module owns the
//! proxy health state ([`HealthState`]), its HTTP server on `healthzBindAddress` ([`serve`],
//! `/healthz` and `/livez`), and the per-Service `healthCheckNodePort` servers of
//! `externalTrafficPolicy: Local` load balancers ([`HealthCheckServers`]).
//!
//! **Proxy health** follows kube-proxy v1.36 (`proxy_health.go`): the proxy is healthy unless a
//! change was queued ([`HealthState::queued`]) and no successful sync ([`HealthState::synced`])
//! followed within the health timeout (2 × `syncPeriod`); the oldest queued change counts, and
//! a successful sync clears it. `/livez` answers with that alone; `/healthz` is also unhealthy
//! while the Node is being deleted or is tainted `ToBeDeletedByClusterAutoscaler`
//! ([`HealthState::node`]), so load balancers drain the node before it goes away. Both answer
//! 200 or 503 with kube-proxy's JSON body, `lastUpdated` being the current time when healthy
//! (kube-proxy's compatibility rule) and Go's time format (`2006-01-02 15:04:05.999999999 -0700
//! MST`, UTC). Like kube-proxy, a node is eligible until a Node object says otherwise.
//!
//! **Service health checks** answer on any path: 200 when the Service has local endpoints and
//! the proxy is healthy, else 503, with kube-proxy's body
//! (`{"service":{"namespace","name"},"localEndpoints","serviceProxyHealthy"}`) and the
//! `X-Load-Balancing-Endpoint-Weight: <localEndpoints>` header. A listener that cannot be opened
//! is reported and retried on the next [`HealthCheckServers::sync`], as kube-proxy does.
//!
//! An unspecified IPv4 address (`0.0.0.0`) listens on both families where the node has IPv6,
//! as Go's listener (and so kube-proxy) does.
//!
//! Every server here runs on the admin runtime ([`super::server_runtime`]).

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{Duration, SystemTime};

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use k8s_openapi::api::core::v1::Node;
use tokio::task::JoinHandle;

use super::metrics::Metrics;
use super::spawn_server;
use crate::model::{HealthCheckNodePort, ServiceRef};

/// The taint the Cluster Autoscaler puts on a node before deleting it.
pub const TO_BE_DELETED_TAINT: &str = "ToBeDeletedByClusterAutoscaler";

/// Failure to open a health listener.
#[derive(Debug, thiserror::Error)]
pub enum HealthError {
    #[error("cannot listen on {address}: {source}")]
    Bind {
        address: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("health check of Service {service} on port {port}: {source}")]
    ServiceBind {
        service: ServiceRef,
        port: u16,
        #[source]
        source: std::io::Error,
    },
}

#[derive(Debug)]
struct Inner {
    last_updated: Option<SystemTime>,
    oldest_pending: Option<SystemTime>,
    node_eligible: bool,
}

/// The proxy's health, shared by the sync loop (which updates it) and the servers (which
/// report it). Cheap to clone.
#[derive(Clone, Debug)]
pub struct HealthState {
    inner: Arc<Mutex<Inner>>,
    timeout: Duration,
    metrics: Option<Metrics>,
}

/// A health answer at one moment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HealthStatus {
    /// The proxy's own health (what `/livez` reports).
    pub healthy: bool,
    pub node_eligible: bool,
    /// The last successful sync; `None` before the first.
    pub last_updated: Option<SystemTime>,
    pub current_time: SystemTime,
}

impl HealthStatus {
    /// What `/healthz` reports.
    pub fn healthz(&self) -> bool {
        self.healthy && self.node_eligible
    }
}

impl HealthState {
    /// `timeout`: how long a queued change may wait for a successful sync (kube-proxy: 2 ×
    /// `syncPeriod`, see [`crate::config::AgentConfig::health_timeout`]).
    pub fn new(timeout: Duration) -> Self {
        Self {
            inner: Arc::new(Mutex::new(Inner {
                last_updated: None,
                oldest_pending: None,
                node_eligible: true,
            })),
            timeout,
            metrics: None,
        }
    }

    /// Counts the answers of `/healthz` and `/livez` in `kubeproxy_proxy_healthz_total` and
    /// `kubeproxy_proxy_livez_total`.
    pub fn with_metrics(mut self, metrics: Metrics) -> Self {
        self.metrics = Some(metrics);
        self
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A change arrived that the next sync will program. Only the oldest pending change counts.
    pub fn queued(&self, now: SystemTime) {
        let mut i = self.lock();
        if i.oldest_pending.is_none() {
            i.oldest_pending = Some(now);
        }
    }

    /// A sync succeeded: everything queued so far is programmed.
    pub fn synced(&self, now: SystemTime) {
        let mut i = self.lock();
        i.oldest_pending = None;
        i.last_updated = Some(now);
    }

    /// This node's Node object, when the source has one: a Node being deleted or tainted
    /// [`TO_BE_DELETED_TAINT`] makes `/healthz` fail. `None` (no information) changes nothing.
    pub fn node(&self, node: Option<&Node>) {
        let Some(node) = node else { return };
        let deleting = node.metadata.deletion_timestamp.is_some();
        let tainted = node
            .spec
            .as_ref()
            .and_then(|s| s.taints.as_ref())
            .is_some_and(|t| t.iter().any(|t| t.key == TO_BE_DELETED_TAINT));
        self.lock().node_eligible = !deleting && !tainted;
    }

    /// The Node object was deleted: `/healthz` fails from now on (until a Node appears again).
    pub fn node_deleted(&self) {
        self.lock().node_eligible = false;
    }

    /// The health at `now`.
    pub fn status(&self, now: SystemTime) -> HealthStatus {
        let i = self.lock();
        let healthy = match i.oldest_pending {
            None => true,
            Some(t) => now.duration_since(t).unwrap_or_default() < self.timeout,
        };
        HealthStatus {
            healthy,
            node_eligible: i.node_eligible,
            last_updated: i.last_updated,
            current_time: now,
        }
    }

    /// The proxy's own health (node eligibility ignored), as the service health checks use it.
    pub fn is_healthy(&self, now: SystemTime) -> bool {
        self.status(now).healthy
    }
}

/// Formats a time as Go's `time.Time.String()` does for a UTC time (without the monotonic
/// reading): `2026-11-22 00:18:12.5 +0000 UTC`; `None` is Go's zero time.
pub fn go_time(t: Option<SystemTime>) -> String {
    let Some(t) = t else {
        return "0001-01-01 00:00:00 +0000 UTC".to_owned();
    };
    let Ok(ts) = jiff::Timestamp::try_from(t) else {
        return "0001-01-01 00:00:00 +0000 UTC".to_owned();
    };
    let base = ts.strftime("%Y-%m-%d %H:%M:%S").to_string();
    let nanos = ts.subsec_nanosecond();
    if nanos == 0 {
        format!("{base} +0000 UTC")
    } else {
        let frac = format!("{nanos:09}");
        format!("{base}.{} +0000 UTC", frac.trim_end_matches('0'))
    }
}

/// The `/healthz` body.
pub fn healthz_body(s: &HealthStatus) -> String {
    let last = if s.healthz() {
        Some(s.current_time)
    } else {
        s.last_updated
    };
    format!(
        r#"{{"lastUpdated": "{}","currentTime": "{}", "nodeEligible": {}}}"#,
        go_time(last),
        go_time(Some(s.current_time)),
        s.node_eligible
    )
}

/// The `/livez` body.
pub fn livez_body(s: &HealthStatus) -> String {
    let last = if s.healthy {
        Some(s.current_time)
    } else {
        s.last_updated
    };
    format!(
        r#"{{"lastUpdated": "{}","currentTime": "{}"}}"#,
        go_time(last),
        go_time(Some(s.current_time))
    )
}

/// A Go `%q` string (JSON-compatible for the names Kubernetes allows).
fn quoted(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_else(|_| "\"\"".to_owned())
}

/// The body of a Service health check, laid out as kube-proxy's (tab-indented).
pub fn service_body(service: &ServiceRef, local_endpoints: usize, proxy_healthy: bool) -> String {
    format!(
        "{{\n\t\"service\": {{\n\t\t\"namespace\": {},\n\t\t\"name\": {}\n\t}},\n\t\"localEndpoints\": {},\n\t\"serviceProxyHealthy\": {}\n}}",
        quoted(&service.namespace),
        quoted(&service.name),
        local_endpoints,
        proxy_healthy
    )
}

fn json_response(
    code: StatusCode,
    body: String,
    extra: Option<(&'static str, String)>,
) -> Response {
    let mut headers = HeaderMap::new();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    if let Some((name, value)) = extra
        && let Ok(v) = HeaderValue::from_str(&value)
    {
        headers.insert(name, v);
    }
    (code, headers, body).into_response()
}

fn code_of(ok: bool) -> StatusCode {
    if ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    }
}

async fn healthz_handler(State(state): State<HealthState>) -> Response {
    let s = state.status(SystemTime::now());
    let code = code_of(s.healthz());
    if let Some(m) = &state.metrics {
        m.healthz(code.as_u16());
    }
    json_response(code, healthz_body(&s), None)
}

async fn livez_handler(State(state): State<HealthState>) -> Response {
    let s = state.status(SystemTime::now());
    let code = code_of(s.healthy);
    if let Some(m) = &state.metrics {
        m.livez(code.as_u16());
    }
    json_response(code, livez_body(&s), None)
}

/// The router of the proxy health server (`/healthz`, `/livez`).
pub fn router(state: HealthState) -> Router {
    Router::new()
        .route("/healthz", get(healthz_handler))
        .route("/livez", get(livez_handler))
        .with_state(state)
}

/// Starts the proxy health server on `address` (kube-proxy's `healthzBindAddress`, default
/// `0.0.0.0:10256`). Binding happens before this returns; serving runs in the returned task.
pub async fn serve(address: SocketAddr, state: HealthState) -> Result<JoinHandle<()>, HealthError> {
    spawn_server(address, router(state), "health")
        .await
        .map_err(|source| HealthError::Bind { address, source })
}

/// Local endpoint counts of the Services with a health check, read by their handlers.
type Endpoints = Arc<RwLock<BTreeMap<ServiceRef, usize>>>;

#[derive(Clone)]
struct ServiceHandlerState {
    service: ServiceRef,
    endpoints: Endpoints,
    health: HealthState,
}

async fn service_handler(State(s): State<ServiceHandlerState>) -> Response {
    let count = s
        .endpoints
        .read()
        .unwrap_or_else(PoisonError::into_inner)
        .get(&s.service)
        .copied();
    let Some(count) = count else {
        // The health check was closed while this connection stayed open.
        return (StatusCode::SERVICE_UNAVAILABLE, "").into_response();
    };
    let healthy = s.health.is_healthy(SystemTime::now());
    json_response(
        code_of(count > 0 && healthy),
        service_body(&s.service, count, healthy),
        Some(("x-load-balancing-endpoint-weight", count.to_string())),
    )
}

struct Instance {
    port: u16,
    tasks: Vec<JoinHandle<()>>,
}

/// The per-Service health check servers (`healthCheckNodePort`) of `externalTrafficPolicy:
/// Local` load balancers, opened and closed as the list of such Services changes.
pub struct HealthCheckServers {
    health: HealthState,
    bind_ips: Vec<IpAddr>,
    endpoints: Endpoints,
    instances: BTreeMap<ServiceRef, Instance>,
}

impl HealthCheckServers {
    /// `bind_ips`: the addresses to listen on. kube-proxy listens on every address (`0.0.0.0`,
    /// both families) unless `nodePortAddresses` restricts NodePorts, in which case it listens on
    /// the node addresses that match; the caller computes that list. Empty means `0.0.0.0`.
    pub fn new(health: HealthState, bind_ips: Vec<IpAddr>) -> Self {
        let bind_ips = if bind_ips.is_empty() {
            vec![IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED)]
        } else {
            bind_ips
        };
        Self {
            health,
            bind_ips,
            endpoints: Arc::default(),
            instances: BTreeMap::new(),
        }
    }

    /// Changes the addresses to listen on; every open health check is reopened.
    pub async fn set_bind_ips(
        &mut self,
        ips: Vec<IpAddr>,
        wanted: &[HealthCheckNodePort],
    ) -> Vec<HealthError> {
        let ips = if ips.is_empty() {
            vec![IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED)]
        } else {
            ips
        };
        if ips == self.bind_ips {
            return Vec::new();
        }
        self.bind_ips = ips;
        self.close_all().await;
        self.sync(wanted).await
    }

    /// Makes the open health checks those of `wanted`: opens new ones, closes those no longer
    /// wanted (or whose port changed), and updates every local endpoint count. Returns the
    /// listeners that could not be opened (retried on the next call).
    pub async fn sync(&mut self, wanted: &[HealthCheckNodePort]) -> Vec<HealthError> {
        let want: BTreeMap<&ServiceRef, &HealthCheckNodePort> =
            wanted.iter().map(|h| (&h.service, h)).collect();
        let stale: Vec<ServiceRef> = self
            .instances
            .iter()
            .filter(|(svc, inst)| want.get(svc).is_none_or(|h| h.port != inst.port))
            .map(|(svc, _)| svc.clone())
            .collect();
        for svc in stale {
            if let Some(inst) = self.instances.remove(&svc) {
                tracing::info!(service = %svc, port = inst.port, "closing health check");
                close(inst).await;
            }
        }
        {
            let mut eps = self
                .endpoints
                .write()
                .unwrap_or_else(PoisonError::into_inner);
            *eps = wanted
                .iter()
                .map(|h| (h.service.clone(), h.local_endpoints))
                .collect();
        }
        let mut errors = Vec::new();
        for h in wanted {
            if self.instances.contains_key(&h.service) {
                continue;
            }
            match self.open(h).await {
                Ok(inst) => {
                    tracing::info!(service = %h.service, port = h.port, "opened health check");
                    self.instances.insert(h.service.clone(), inst);
                }
                Err(e) => errors.push(e),
            }
        }
        errors
    }

    async fn open(&self, h: &HealthCheckNodePort) -> Result<Instance, HealthError> {
        let app = Router::new()
            .fallback(service_handler)
            .with_state(ServiceHandlerState {
                service: h.service.clone(),
                endpoints: self.endpoints.clone(),
                health: self.health.clone(),
            });
        let mut inst = Instance {
            port: h.port,
            tasks: Vec::new(),
        };
        for ip in &self.bind_ips {
            let address = SocketAddr::new(*ip, h.port);
            match spawn_server(address, app.clone(), "health check").await {
                Ok(task) => inst.tasks.push(task),
                Err(source) => {
                    close(inst).await;
                    return Err(HealthError::ServiceBind {
                        service: h.service.clone(),
                        port: h.port,
                        source,
                    });
                }
            }
        }
        Ok(inst)
    }

    /// The open health checks: Service and port.
    pub fn open_ports(&self) -> Vec<(ServiceRef, u16)> {
        self.instances
            .iter()
            .map(|(s, i)| (s.clone(), i.port))
            .collect()
    }

    async fn close_all(&mut self) {
        for (_, inst) in std::mem::take(&mut self.instances) {
            close(inst).await;
        }
    }

    /// Closes every health check.
    pub async fn shutdown(mut self) {
        self.close_all().await;
    }
}

/// Stops a health check's servers and waits until their listeners are closed, so the port can
/// be opened again at once.
async fn close(inst: Instance) {
    for t in &inst.tasks {
        t.abort();
    }
    for t in inst.tasks {
        let _ = t.await;
    }
}

#[cfg(test)]
mod tests;
