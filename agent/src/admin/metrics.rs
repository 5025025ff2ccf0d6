//! Prometheus metrics: this module owns the registry ([`Metrics`]), the HTTP server on
//! `metricsBindAddress` ([`serve`], `/metrics` and `/healthz`), and the bookkeeping that turns
//! snapshots into kube-proxy's change counters and network-programming latencies
//! ([`ChangeTracker`], [`no_local_endpoints`]).
//!
//! # Naming
//!
//! Where a metric means what a kube-proxy metric means, it has kube-proxy's name, type, labels
//! and buckets (v1.36, `pkg/proxy/metrics`), so kube-proxy dashboards and alerts keep working:
//!
//! | metric | type | labels | fed by |
//! |---|---|---|---|
//! | `kubeproxy_sync_proxy_rules_duration_seconds` | histogram | `ip_family` | every sync, [`Metrics::observe_sync`] / [`Metrics::sync_failed`] |
//! | `kubeproxy_sync_full_proxy_rules_duration_seconds` | histogram | `ip_family` | syncs that dump the kernel first (full resyncs) |
//! | `kubeproxy_sync_partial_proxy_rules_duration_seconds` | histogram | `ip_family` | syncs against the cached kernel state |
//! | `kubeproxy_sync_proxy_rules_last_timestamp_seconds` | gauge | `ip_family` | last successful sync |
//! | `kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds` | gauge | `ip_family` | [`Metrics::queued`] |
//! | `kubeproxy_network_programming_duration_seconds` | histogram | `ip_family` | EndpointSlice `endpoints.kubernetes.io/last-change-trigger-time` → programmed |
//! | `kubeproxy_sync_proxy_rules_endpoint_changes_total`, `..._service_changes_total` | counter | | [`Metrics::changes`] |
//! | `kubeproxy_sync_proxy_rules_endpoint_changes_pending`, `..._service_changes_pending` | gauge | | changes not yet synced |
//! | `kubeproxy_sync_proxy_rules_no_local_endpoints_total` | gauge | `ip_family`, `traffic_policy` | [`Metrics::no_local_endpoints`] |
//! | `kubeproxy_proxy_healthz_total`, `kubeproxy_proxy_livez_total` | counter | `code` | the health server |
//!
//! One sync here programs both IP families, where kube-proxy runs one proxier per family: the
//! `ip_family` series are written once for each configured family ([`Metrics::new`]), with the
//! same values, as a dual-stack kube-proxy's two proxiers would each report their sync. The
//! change counters count each changed object once (a dual-stack kube-proxy counts a change once
//! per family that sees it). kube-proxy's iptables/nftables-only metrics (`..._iptables_*`,
//! `..._nftables_*`, conntrack reconciler) have no meaning here and are not exported.
//!
//! This agent's own metrics are under `kube_ipvs_bpf_`:
//!
//! | metric | type | labels |
//! |---|---|---|
//! | `kube_ipvs_bpf_ipvs_operations_total` | counter | `operation` (`add_service`, …), `result` (`success`, `failure`) |
//! | `kube_ipvs_bpf_datapath_events_total` | counter | `event` (the datapath's counters: `snat_alloc`, `port_exhausted`, `map_full`, `rev_hit`, `icmp_xlate`, `frag_xlate`, `probe_hit`, `probe_miss`, `filtered_port`, …) |
//! | `kube_ipvs_bpf_datapath_drops_total` | counter | `reason` ([`DROP_REASONS`]: the counters that count dropped packets) |
//! | `kube_ipvs_bpf_datapath_map_entries`, `..._map_capacity` | gauge | `map` (`snat`: live SNAT records, `conns`, `switch_flows`: tuples of connections kept on conntrack since the switch from kube-proxy, four each) |
//! | `kube_ipvs_bpf_sweep_duration_seconds` | histogram | |
//! | `kube_ipvs_bpf_sweep_expired_entries_total` | counter | `map` (`snat`, `conns`) |
//! | `kube_ipvs_bpf_sweep_failures_total` | counter | |
//! | `kube_ipvs_bpf_rejected_objects` | gauge | `kind` (`Service`, `EndpointSlice`) |
//! | `kube_ipvs_bpf_sync_failures_total` | counter | |
//! | `kube_ipvs_bpf_node_repairs_total` | counter | `what` (`iptables`, `nftables`, `sysctl`, `tc`, `kube_ipvs0`): node state found changed behind the agent's back and rewritten (`crate::node_state`) |
//! | `kube_ipvs_bpf_ipvs_snat_reroute` | gauge | `mode` (`auto`, `on`, `off`): `net.ipv4.vs.snat_reroute` as the agent last wrote it, 1 or 0 (`crate::datapath::reroute`); absent without the datapath |
//!
//! The datapath series are refreshed by the sweeper after each pass (`--sweep-period`, 10 s) and
//! after each sync.
//!
//! The text is OpenMetrics (`application/openmetrics-text`), which Prometheus scrapes natively;
//! sample names are kube-proxy's (`..._total`, `..._bucket`, `..._sum`, `..._count`).

use std::collections::{BTreeMap, HashMap};
use std::hash::Hash;
use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use probes::maps::Counter as DatapathCounter;
use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use tokio::task::JoinHandle;

use crate::model::{DesiredState, Objects, Rejection, ServiceRef};
use crate::reconcile::ipvs::OpCounts;
use crate::source::Snapshot;

pub use crate::model::LAST_CHANGE_TRIGGER_TIME_ANNOTATION;

/// The datapath counters that count dropped packets, each a `reason` of
/// `kube_ipvs_bpf_datapath_drops_total` (docs/datapath.md, Counters). `parse_error` is not one:
/// it mostly counts packets passed untouched. Spelled from [`DatapathCounter::DROPS`], the one
/// list of them.
pub const DROP_REASONS: &[&str] = &{
    let mut names = [""; DatapathCounter::DROPS.len()];
    let mut i = 0;
    while i < names.len() {
        names[i] = DatapathCounter::DROPS[i].name();
        i += 1;
    }
    names
};

/// An IP family, as kube-proxy's `ip_family` label spells it.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, PartialOrd, Ord, EncodeLabelValue)]
pub enum IpFamily {
    IPv4,
    IPv6,
}

impl IpFamily {
    pub fn of(ip: std::net::IpAddr) -> Self {
        if ip.is_ipv4() { Self::IPv4 } else { Self::IPv6 }
    }
}

/// kube-proxy's `traffic_policy` label.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, PartialOrd, Ord)]
pub enum TrafficPolicy {
    Internal,
    External,
}

impl EncodeLabelValue for TrafficPolicy {
    fn encode(
        &self,
        encoder: &mut prometheus_client::encoding::LabelValueEncoder,
    ) -> Result<(), std::fmt::Error> {
        let s = match self {
            Self::Internal => "internal",
            Self::External => "external",
        };
        EncodeLabelValue::encode(&s, encoder)
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FamilyLabels {
    ip_family: IpFamily,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct NoLocalLabels {
    ip_family: IpFamily,
    traffic_policy: TrafficPolicy,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CodeLabels {
    code: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OpLabels {
    operation: String,
    result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EventLabels {
    event: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct WhatLabels {
    what: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ModeLabels {
    mode: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MapLabels {
    map: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabels {
    kind: String,
}

type FloatGauge = Gauge<f64, AtomicU64>;

fn sync_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.001, 2.0, 15))
}

/// kube-proxy's buckets: 0.25 s, 0.5 s, 1..59 s, 60..115 s by 5, 2..5 min by 30 s.
fn programming_buckets() -> Vec<f64> {
    let mut b = vec![0.25, 0.5];
    b.extend((1..=59).map(f64::from));
    b.extend((0..12).map(|i| 60.0 + 5.0 * f64::from(i)));
    b.extend((0..7).map(|i| 120.0 + 30.0 * f64::from(i)));
    b
}

fn programming_histogram() -> Histogram {
    Histogram::new(programming_buckets())
}

struct Inner {
    registry: Registry,
    families: Vec<IpFamily>,
    sync_duration: Family<FamilyLabels, Histogram, fn() -> Histogram>,
    sync_full_duration: Family<FamilyLabels, Histogram, fn() -> Histogram>,
    sync_partial_duration: Family<FamilyLabels, Histogram, fn() -> Histogram>,
    network_programming: Family<FamilyLabels, Histogram, fn() -> Histogram>,
    last_timestamp: Family<FamilyLabels, FloatGauge>,
    last_queued: Family<FamilyLabels, FloatGauge>,
    endpoint_changes_total: Counter,
    service_changes_total: Counter,
    endpoint_changes_pending: Gauge,
    service_changes_pending: Gauge,
    no_local_endpoints: Family<NoLocalLabels, Gauge>,
    healthz: Family<CodeLabels, Counter>,
    livez: Family<CodeLabels, Counter>,
    ipvs_operations: Family<OpLabels, Counter>,
    datapath_events: Family<EventLabels, Counter>,
    datapath_seen: Mutex<HashMap<String, u64>>,
    datapath_drops: Family<ReasonLabels, Counter>,
    map_entries: Family<MapLabels, Gauge>,
    map_capacity: Family<MapLabels, Gauge>,
    sweep_duration: Histogram,
    sweep_expired: Family<MapLabels, Counter>,
    sweep_failures: Counter,
    rejected: Family<KindLabels, Gauge>,
    sync_failures: Counter,
    node_repairs: Family<WhatLabels, Counter>,
    snat_reroute: Family<ModeLabels, Gauge>,
}

/// The agent's metrics. Cheap to clone; every method takes `&self`.
#[derive(Clone)]
pub struct Metrics {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics")
            .field("families", &self.inner.families)
            .finish_non_exhaustive()
    }
}

fn unix_seconds(t: SystemTime) -> f64 {
    t.duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs_f64()
}

/// Service and EndpointSlice changes seen in a new snapshot.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Changes {
    pub services: u64,
    pub endpoint_slices: u64,
}

/// Services with a `Local` traffic policy and no local endpoints, per family.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NoLocalEndpoints {
    pub counts: BTreeMap<(IpFamily, TrafficPolicy), i64>,
}

impl Metrics {
    /// `families`: the IP families this node proxies (from its node IPs or cluster CIDRs);
    /// empty means IPv4 only.
    pub fn new(families: &[IpFamily]) -> Self {
        let mut families: Vec<IpFamily> = families.to_vec();
        families.sort();
        families.dedup();
        if families.is_empty() {
            families.push(IpFamily::IPv4);
        }
        let mut registry = Registry::default();
        let hist = || {
            Family::<FamilyLabels, Histogram, fn() -> Histogram>::new_with_constructor(
                sync_histogram as fn() -> Histogram,
            )
        };
        let inner = Inner {
            families,
            sync_duration: hist(),
            sync_full_duration: hist(),
            sync_partial_duration: hist(),
            network_programming: Family::new_with_constructor(
                programming_histogram as fn() -> Histogram,
            ),
            last_timestamp: Family::default(),
            last_queued: Family::default(),
            endpoint_changes_total: Counter::default(),
            service_changes_total: Counter::default(),
            endpoint_changes_pending: Gauge::default(),
            service_changes_pending: Gauge::default(),
            no_local_endpoints: Family::default(),
            healthz: Family::default(),
            livez: Family::default(),
            ipvs_operations: Family::default(),
            datapath_events: Family::default(),
            datapath_seen: Mutex::default(),
            datapath_drops: Family::default(),
            map_entries: Family::default(),
            map_capacity: Family::default(),
            sweep_duration: sync_histogram(),
            sweep_expired: Family::default(),
            sweep_failures: Counter::default(),
            rejected: Family::default(),
            sync_failures: Counter::default(),
            node_repairs: Family::default(),
            snat_reroute: Family::default(),
            registry: Registry::default(),
        };
        // Counters are registered without their `_total` suffix: the encoder adds it.
        registry.register(
            "kubeproxy_sync_proxy_rules_duration_seconds",
            "SyncProxyRules latency in seconds",
            inner.sync_duration.clone(),
        );
        registry.register(
            "kubeproxy_sync_full_proxy_rules_duration_seconds",
            "SyncProxyRules latency in seconds for full resyncs",
            inner.sync_full_duration.clone(),
        );
        registry.register(
            "kubeproxy_sync_partial_proxy_rules_duration_seconds",
            "SyncProxyRules latency in seconds for partial resyncs",
            inner.sync_partial_duration.clone(),
        );
        registry.register(
            "kubeproxy_network_programming_duration_seconds",
            "In Cluster Network Programming Latency in seconds",
            inner.network_programming.clone(),
        );
        registry.register(
            "kubeproxy_sync_proxy_rules_last_timestamp_seconds",
            "The last time proxy rules were successfully synced",
            inner.last_timestamp.clone(),
        );
        registry.register(
            "kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds",
            "The last time a sync of proxy rules was queued",
            inner.last_queued.clone(),
        );
        registry.register(
            "kubeproxy_sync_proxy_rules_endpoint_changes",
            "Cumulative proxy rules Endpoint changes",
            inner.endpoint_changes_total.clone(),
        );
        registry.register(
            "kubeproxy_sync_proxy_rules_service_changes",
            "Cumulative proxy rules Service changes",
            inner.service_changes_total.clone(),
        );
        registry.register(
            "kubeproxy_sync_proxy_rules_endpoint_changes_pending",
            "Pending proxy rules Endpoint changes",
            inner.endpoint_changes_pending.clone(),
        );
        registry.register(
            "kubeproxy_sync_proxy_rules_service_changes_pending",
            "Pending proxy rules Service changes",
            inner.service_changes_pending.clone(),
        );
        registry.register(
            "kubeproxy_sync_proxy_rules_no_local_endpoints_total",
            "Number of services with a Local traffic policy and no endpoints",
            inner.no_local_endpoints.clone(),
        );
        registry.register(
            "kubeproxy_proxy_healthz",
            "Cumulative proxy healthz HTTP status",
            inner.healthz.clone(),
        );
        registry.register(
            "kubeproxy_proxy_livez",
            "Cumulative proxy livez HTTP status",
            inner.livez.clone(),
        );
        registry.register(
            "kube_ipvs_bpf_ipvs_operations",
            "IPVS netlink operations issued, by operation and result",
            inner.ipvs_operations.clone(),
        );
        registry.register(
            "kube_ipvs_bpf_datapath_events",
            "Events counted by the eBPF datapath (summed over CPUs)",
            inner.datapath_events.clone(),
        );
        registry.register(
            "kube_ipvs_bpf_datapath_drops",
            "Packets the eBPF datapath dropped, by reason (summed over CPUs)",
            inner.datapath_drops.clone(),
        );
        registry.register(
            "kube_ipvs_bpf_datapath_map_entries",
            "Entries in a datapath map after the last sweep (snat: live SNAT records)",
            inner.map_entries.clone(),
        );
        registry.register(
            "kube_ipvs_bpf_datapath_map_capacity",
            "Entries a datapath map can hold",
            inner.map_capacity.clone(),
        );
        registry.register(
            "kube_ipvs_bpf_sweep_duration_seconds",
            "Duration of a sweep of the datapath maps in seconds",
            inner.sweep_duration.clone(),
        );
        registry.register(
            "kube_ipvs_bpf_sweep_expired_entries",
            "Datapath map entries the sweeper expired, by map",
            inner.sweep_expired.clone(),
        );
        registry.register(
            "kube_ipvs_bpf_sweep_failures",
            "Sweeps of the datapath maps that failed",
            inner.sweep_failures.clone(),
        );
        registry.register(
            "kube_ipvs_bpf_rejected_objects",
            "Objects (or parts of objects) skipped because they are invalid, by kind",
            inner.rejected.clone(),
        );
        registry.register(
            "kube_ipvs_bpf_sync_failures",
            "Syncs that failed before programming the kernel",
            inner.sync_failures.clone(),
        );
        registry.register(
            "kube_ipvs_bpf_node_repairs",
            "Node state (iptables rules, sysctls, TC attachments, kube-ipvs0) found changed and repaired, by part",
            inner.node_repairs.clone(),
        );
        registry.register(
            "kube_ipvs_bpf_ipvs_snat_reroute",
            "net.ipv4.vs.snat_reroute as the agent last wrote it: 1, IPVS routes each forwarded reply again by its new source; 0, it does not (kubeIpvsBpf.datapath.snatReroute)",
            inner.snat_reroute.clone(),
        );
        // Every part is exported from the start, at 0.
        for part in crate::node_state::Part::ALL {
            let _ = inner.node_repairs.get_or_create(&WhatLabels {
                what: part.as_str().to_owned(),
            });
        }
        let inner = Inner { registry, ..inner };
        // The no-local-endpoints gauges exist from the start, at 0 (kube-proxy sets them on
        // every sync); timestamps appear once set, as kube-proxy's do.
        for f in &inner.families {
            for p in [TrafficPolicy::Internal, TrafficPolicy::External] {
                let _ = inner.no_local_endpoints.get_or_create(&NoLocalLabels {
                    ip_family: *f,
                    traffic_policy: p,
                });
            }
        }
        Self {
            inner: Arc::new(inner),
        }
    }

    fn each_family(&self, mut f: impl FnMut(&FamilyLabels)) {
        for fam in &self.inner.families {
            f(&FamilyLabels { ip_family: *fam });
        }
    }

    /// A change was queued for the next sync (call with each new snapshot).
    pub fn queued(&self, now: SystemTime) {
        let t = unix_seconds(now);
        self.each_family(|l| {
            self.inner.last_queued.get_or_create(l).set(t);
        });
    }

    /// Counts the changes a new snapshot brings ([`ChangeTracker::observe`]); they stay pending
    /// until the next successful sync.
    pub fn changes(&self, c: Changes) {
        let i = &self.inner;
        i.service_changes_total.inc_by(c.services);
        i.endpoint_changes_total.inc_by(c.endpoint_slices);
        i.service_changes_pending
            .inc_by(i64::try_from(c.services).unwrap_or(i64::MAX));
        i.endpoint_changes_pending
            .inc_by(i64::try_from(c.endpoint_slices).unwrap_or(i64::MAX));
    }

    fn observe_duration(&self, duration: Duration, full: bool) {
        let secs = duration.as_secs_f64();
        self.each_family(|l| {
            self.inner.sync_duration.get_or_create(l).observe(secs);
            let h = if full {
                &self.inner.sync_full_duration
            } else {
                &self.inner.sync_partial_duration
            };
            h.get_or_create(l).observe(secs);
        });
    }

    /// A successful sync that took `duration`; `full` when it dumped the kernel first. Sets the
    /// last-sync time to now and clears the pending change counts.
    pub fn observe_sync(&self, duration: Duration, full: bool) {
        self.observe_sync_at(duration, full, SystemTime::now());
    }

    /// [`Self::observe_sync`] at a given time.
    pub fn observe_sync_at(&self, duration: Duration, full: bool, now: SystemTime) {
        self.observe_duration(duration, full);
        let t = unix_seconds(now);
        self.each_family(|l| {
            self.inner.last_timestamp.get_or_create(l).set(t);
        });
        self.inner.service_changes_pending.set(0);
        self.inner.endpoint_changes_pending.set(0);
    }

    /// Counts node state repairs, one per repair, by part.
    pub fn node_repairs(&self, repairs: &[crate::node_state::Repair]) {
        for r in repairs {
            self.inner
                .node_repairs
                .get_or_create(&WhatLabels {
                    what: r.part.as_str().to_owned(),
                })
                .inc();
        }
    }

    /// `net.ipv4.vs.snat_reroute` as last written under `mode` (one series: a new mode replaces
    /// the old one).
    pub fn snat_reroute(&self, mode: &str, on: bool) {
        let labels = ModeLabels {
            mode: mode.to_owned(),
        };
        if self.inner.snat_reroute.get(&labels).is_none() {
            self.inner.snat_reroute.clear();
        }
        self.inner
            .snat_reroute
            .get_or_create(&labels)
            .set(i64::from(on));
    }

    /// A sync that failed after `duration` (kube-proxy records its duration too).
    pub fn sync_failed(&self, duration: Duration, full: bool) {
        self.observe_duration(duration, full);
        self.inner.sync_failures.inc();
    }

    /// One network-programming latency: from an EndpointSlice's last-change trigger time to the
    /// end of the sync that programmed it.
    pub fn network_programming(&self, latency: Duration) {
        let secs = latency.as_secs_f64();
        self.each_family(|l| {
            self.inner
                .network_programming
                .get_or_create(l)
                .observe(secs);
        });
    }

    /// The latencies of `trigger_times` ([`ChangeTracker::take_trigger_times`]) programmed at
    /// `now`.
    pub fn programmed(&self, trigger_times: &[SystemTime], now: SystemTime) {
        for t in trigger_times {
            self.network_programming(now.duration_since(*t).unwrap_or_default());
        }
    }

    /// The IPVS operations of one sync.
    pub fn ipvs_ops(&self, counts: &OpCounts) {
        for (op, issued) in &counts.issued {
            let failed = counts.failed.get(op).copied().unwrap_or(0);
            let ok = issued.saturating_sub(failed);
            for (result, n) in [("success", ok), ("failure", failed)] {
                if n > 0 {
                    self.inner
                        .ipvs_operations
                        .get_or_create(&OpLabels {
                            operation: (*op).to_owned(),
                            result: result.to_owned(),
                        })
                        .inc_by(n);
                }
            }
        }
    }

    /// A snapshot of the datapath's cumulative counters (name, value summed over CPUs). Each is
    /// exported as a counter that advances by the difference with the previous snapshot; a
    /// value lower than before (the maps were recreated) counts as a reset.
    pub fn datapath_counters(&self, snapshot: &[(&str, u64)]) {
        let mut seen = self
            .inner
            .datapath_seen
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        for (name, value) in snapshot {
            let prev = seen.insert((*name).to_owned(), *value);
            let delta = match prev {
                Some(p) if *value >= p => value - p,
                _ => *value,
            };
            let c = self.inner.datapath_events.get_or_create(&EventLabels {
                event: (*name).to_owned(),
            });
            c.inc_by(delta);
            if DROP_REASONS.contains(name) {
                self.inner
                    .datapath_drops
                    .get_or_create(&ReasonLabels {
                        reason: (*name).to_owned(),
                    })
                    .inc_by(delta);
            }
        }
    }

    /// A sweep that took `duration`: each map's (name, entries after it, capacity), and the
    /// entries it expired per map.
    pub fn swept(
        &self,
        duration: Duration,
        occupancy: &[(&str, u64, u64)],
        expired: &[(&str, u64)],
    ) {
        self.inner.sweep_duration.observe(duration.as_secs_f64());
        let gauge = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        for (map, entries, capacity) in occupancy {
            let labels = MapLabels {
                map: (*map).to_owned(),
            };
            self.inner
                .map_entries
                .get_or_create(&labels)
                .set(gauge(*entries));
            self.inner
                .map_capacity
                .get_or_create(&labels)
                .set(gauge(*capacity));
        }
        for (map, n) in expired {
            self.inner
                .sweep_expired
                .get_or_create(&MapLabels {
                    map: (*map).to_owned(),
                })
                .inc_by(*n);
        }
    }

    /// A sweep that failed after `duration`.
    pub fn sweep_failed(&self, duration: Duration) {
        self.inner.sweep_duration.observe(duration.as_secs_f64());
        self.inner.sweep_failures.inc();
    }

    /// The objects the last model build rejected, counted by kind (`Service`, `EndpointSlice`).
    pub fn rejected(&self, rejected: &[Rejection]) {
        let mut by_kind: BTreeMap<String, i64> = BTreeMap::new();
        for kind in ["Service", "EndpointSlice"] {
            by_kind.insert(kind.to_owned(), 0);
        }
        for r in rejected {
            let kind = r.object.split(' ').next().unwrap_or("").to_owned();
            *by_kind.entry(kind).or_default() += 1;
        }
        for (kind, n) in by_kind {
            self.inner
                .rejected
                .get_or_create(&KindLabels { kind })
                .set(n);
        }
    }

    /// The Services with a `Local` traffic policy and no local endpoints ([`no_local_endpoints`]).
    pub fn no_local_endpoints(&self, n: &NoLocalEndpoints) {
        for fam in &self.inner.families {
            for p in [TrafficPolicy::Internal, TrafficPolicy::External] {
                let v = n.counts.get(&(*fam, p)).copied().unwrap_or(0);
                self.inner
                    .no_local_endpoints
                    .get_or_create(&NoLocalLabels {
                        ip_family: *fam,
                        traffic_policy: p,
                    })
                    .set(v);
            }
        }
    }

    /// Counts one `/healthz` answer.
    pub fn healthz(&self, code: u16) {
        self.inner
            .healthz
            .get_or_create(&CodeLabels {
                code: code.to_string(),
            })
            .inc();
    }

    /// Counts one `/livez` answer.
    pub fn livez(&self, code: u16) {
        self.inner
            .livez
            .get_or_create(&CodeLabels {
                code: code.to_string(),
            })
            .inc();
    }

    /// The metrics in OpenMetrics text format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &self.inner.registry) {
            tracing::error!("encoding metrics: {e}");
        }
        out
    }
}

async fn metrics_handler(State(m): State<Metrics>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/openmetrics-text; version=1.0.0; charset=utf-8"),
        )],
        m.encode(),
    )
        .into_response()
}

/// The router of the metrics server: `/metrics`, and `/healthz` answering `ok` as kube-proxy's
/// metrics server does.
pub fn router(metrics: Metrics) -> Router {
    Router::new()
        .route("/metrics", get(metrics_handler))
        .route("/healthz", get(|| async { "ok" }))
        .with_state(metrics)
}

/// Failure to open the metrics listener.
#[derive(Debug, thiserror::Error)]
#[error("cannot listen on {address}: {source}")]
pub struct ServeError {
    pub address: SocketAddr,
    #[source]
    pub source: std::io::Error,
}

/// Starts the metrics server on `address` (kube-proxy's `metricsBindAddress`, default
/// `127.0.0.1:10249`) on [`super::server_runtime`]. Binding happens before this returns;
/// serving runs in the returned task.
pub async fn serve(address: SocketAddr, metrics: Metrics) -> Result<JoinHandle<()>, ServeError> {
    super::spawn_server(address, router(metrics), "metrics")
        .await
        .map_err(|source| ServeError { address, source })
}

/// Follows successive snapshots to count Service and EndpointSlice changes (adds, updates and
/// deletions, as kube-proxy counts its events) and to collect the last-change trigger times of
/// the EndpointSlices that changed, for `kubeproxy_network_programming_duration_seconds`.
#[derive(Debug)]
pub struct ChangeTracker {
    started: SystemTime,
    previous: Option<Arc<Snapshot>>,
    trigger_times: Vec<SystemTime>,
}

impl ChangeTracker {
    /// `started`: trigger times before it are ignored (they predate this agent, as kube-proxy
    /// ignores those before its tracker started).
    pub fn new(started: SystemTime) -> Self {
        Self {
            started,
            previous: None,
            trigger_times: Vec::new(),
        }
    }

    /// The changes `snapshot` brings over the previous one (the first counts every object).
    /// Objects are compared by identity, and a source's snapshots share what did not change
    /// ([`crate::model::Objects::changes`]): this visits only the changes.
    pub fn observe(&mut self, snapshot: &Arc<Snapshot>) -> Changes {
        let mut changes = Changes::default();
        let empty = Snapshot::default();
        let previous = self.previous.as_deref().unwrap_or(&empty);
        changes.services = count_changes(&previous.services, &snapshot.services, |_| {});
        let (started, trigger_times) = (self.started, &mut self.trigger_times);
        changes.endpoint_slices =
            count_changes(&previous.endpoint_slices, &snapshot.endpoint_slices, |s| {
                if let Some(t) = s.last_change_trigger_time.as_deref().and_then(trigger_time)
                    && t > started
                {
                    trigger_times.push(t);
                }
            });
        self.previous = Some(snapshot.clone());
        changes
    }

    /// The trigger times collected since the last call (call after a successful sync and pass
    /// them to [`Metrics::programmed`]).
    pub fn take_trigger_times(&mut self) -> Vec<SystemTime> {
        std::mem::take(&mut self.trigger_times)
    }
}

/// Counts the objects added, changed (a different object) or deleted between two versions,
/// and calls `changed` on each new or changed one.
fn count_changes<K>(old: &Objects<K>, new: &Objects<K>, mut changed: impl FnMut(&K)) -> u64 {
    let mut count = 0;
    for c in old.changes(new) {
        count += 1;
        if let Some(n) = c.after() {
            changed(n);
        }
    }
    count
}

/// An EndpointSlice's `endpoints.kubernetes.io/last-change-trigger-time` annotation (RFC 3339)
/// as a time.
pub fn trigger_time(annotation: &str) -> Option<SystemTime> {
    let ts: jiff::Timestamp = annotation.parse().ok()?;
    Some(SystemTime::from(ts))
}

/// kube-proxy's `sync_proxy_rules_no_local_endpoints_total`: per family, the service ports with
/// `internalTrafficPolicy: Local` whose ClusterIP has no local endpoint, and those with
/// `externalTrafficPolicy: Local` whose external addresses (NodePort, load balancer, external
/// IPs) have none. Computed from the model's output, whose destinations for a `Local` policy
/// are the local endpoints ([`crate::model::VirtualService::local_only`]); only those are read
/// (every sync: O(them), not O(every virtual service)).
pub fn no_local_endpoints(desired: &DesiredState) -> NoLocalEndpoints {
    // (service, port name, family, policy) → has a destination
    let mut groups: BTreeMap<(&ServiceRef, &str, IpFamily, TrafficPolicy), bool> = BTreeMap::new();
    for vs in desired.virtual_services.local_only() {
        let policy = if vs.kind.is_external() {
            TrafficPolicy::External
        } else {
            TrafficPolicy::Internal
        };
        let e = groups
            .entry((
                &vs.service,
                vs.port_name.as_str(),
                IpFamily::of(vs.address),
                policy,
            ))
            .or_insert(false);
        *e |= !vs.destinations.is_empty();
    }
    let mut out = NoLocalEndpoints::default();
    for ((_, _, fam, policy), has) in groups {
        if !has {
            *out.counts.entry((fam, policy)).or_default() += 1;
        }
    }
    out
}

#[cfg(test)]
mod tests;
