//! Incremental model building. [`ModelCache::build`] gives the same [`DesiredState`] as
//! [`super::build`], but keeps everything between calls: the per-Service output (validation,
//! endpoint categorization, virtual services), the candidates and winner of every
//! virtual-service key (conflict resolution), the address sets, rejections and health checks.
//! A call finds what changed with [`Objects::changes`] against the previous call's input (a
//! source's maps share what did not change, so this visits only the changes), recomputes only
//! the Services touched, updates the keys they claim in place, and reports those keys
//! ([`Changed`]) so the reconcilers diff only them. The output shares the maintained virtual
//! services and address sets, so one change costs O(log n) here, not O(n).
//!
//! A new node view or configuration recomputes everything.

use std::borrow::Borrow;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;
use std::sync::Arc;

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;

use super::endpoint_slice::EndpointSliceInfo;
use super::endpoints::SliceIndex;
use super::objects::{ObjectKey, Objects};
use super::service::{self, Candidate, NodeContext};
use super::service_info::ServiceInfo;
use super::validate;
use super::{
    DesiredState, HealthCheckNodePort, ModelConfig, NodeInfo, Rejection, ServiceError, ServicePort,
    VirtualService, VirtualServiceKind, VirtualServices,
};

/// Which virtual services may differ from the previous build.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Changed {
    /// Anything (first build, or the node or configuration changed).
    All,
    /// Only these keys (added, removed or modified).
    Keys(BTreeSet<ServicePort>),
}

impl Changed {
    pub fn is_empty(&self) -> bool {
        matches!(self, Changed::Keys(k) if k.is_empty())
    }
}

fn owned((ns, name): (&str, &str)) -> ObjectKey {
    (ns.to_string(), name.to_string())
}

/// The Service (namespace, name) an EndpointSlice belongs to.
fn slice_service(s: &EndpointSliceInfo) -> Option<ObjectKey> {
    s.service().map(owned)
}

/// The slices of one Service, sorted by name. Most Services have one slice: a sorted `Vec`
/// holds it in one small allocation where a `BTreeMap` allocates a node for eleven.
#[derive(Debug, Default)]
struct ServiceSlices(Vec<Arc<EndpointSliceInfo>>);

impl ServiceSlices {
    /// Adds `slice`, replacing the one of the same name.
    fn insert(&mut self, slice: Arc<EndpointSliceInfo>) {
        match self.0.binary_search_by(|s| s.name.cmp(&slice.name)) {
            Ok(i) => self.0[i] = slice,
            Err(i) => self.0.insert(i, slice),
        }
    }

    fn remove(&mut self, name: &str) {
        if let Ok(i) = self.0.binary_search_by(|s| (*s.name).cmp(name)) {
            self.0.remove(i);
        }
    }

    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    fn iter(&self) -> impl Iterator<Item = &EndpointSliceInfo> {
        self.0.iter().map(|s| &**s)
    }
}

/// One Service's part of the model.
#[derive(Debug, Default)]
struct ServiceOutput {
    candidates: Vec<Candidate>,
    health: Option<HealthCheckNodePort>,
    rejected: Vec<Rejection>,
}

/// Computes one Service's part of the model.
fn compute(
    svc: &ServiceInfo,
    slices: Option<&ServiceSlices>,
    ctx: &NodeContext<'_>,
    node: &NodeInfo,
    cfg: &ModelConfig,
) -> ServiceOutput {
    let mut out = ServiceOutput::default();
    match validate::parse_service(svc, cfg) {
        Err(e) => out.rejected.push(Rejection {
            object: format!("Service {}", validate::service_ref(svc)),
            reason: e.to_string(),
        }),
        Ok(None) => {}
        Ok(Some(p)) => {
            out.rejected
                .extend(p.refused.iter().map(|reason| Rejection {
                    object: format!("Service {}", p.service),
                    reason: reason.clone(),
                }));
            let index = SliceIndex::build(
                slices.into_iter().flat_map(ServiceSlices::iter),
                |_| true,
                &node.name,
                cfg.proxy_name.as_deref(),
                &mut out.rejected,
            );
            let eps = index.get(&p.service);
            service::virtual_services(&p, eps, ctx, cfg, &mut out.candidates);
            if let Some(port) = p.health_check_node_port {
                out.health = Some(HealthCheckNodePort {
                    service: p.service.clone(),
                    port,
                    local_endpoints: eps.map_or(0, |e| e.local_ready_ips()),
                });
            }
        }
    }
    out
}

/// The order in which candidates of one key win: oldest Service first (CVE-2020-8554), then
/// namespace/name, then kind.
fn rank(a: &Candidate, b: &Candidate) -> std::cmp::Ordering {
    service::candidate_order(a, b)
}

/// What role an address plays for a winning virtual service: (bound on kube-ipvs0, NodePort).
fn roles(vs: &VirtualService, ctx: &NodeContext<'_>) -> (bool, bool) {
    match vs.kind {
        VirtualServiceKind::ClusterIp => (true, false),
        VirtualServiceKind::LoadBalancer | VirtualServiceKind::ExternalIp => {
            (!ctx.is_node_address(vs.address), false)
        }
        VirtualServiceKind::NodePort => (false, true),
    }
}

/// The memo of the model between builds (see the module documentation).
#[derive(Debug, Default)]
pub struct ModelCache {
    context: Option<(NodeInfo, ModelConfig)>,
    /// The input of the previous build: the next one diffs against it.
    services: Objects<ServiceInfo>,
    slices: Objects<EndpointSliceInfo>,
    /// (namespace, Service) → slice name → slice.
    slices_of: HashMap<ObjectKey, ServiceSlices>,
    /// (namespace, name) → the Service and its output.
    entries: HashMap<ObjectKey, (Arc<ServiceInfo>, ServiceOutput)>,
    /// Every key claimed by some Service, with its candidates in winning order.
    by_key: BTreeMap<ServicePort, Vec<Candidate>>,
    /// The first candidate of every key: the output's virtual services.
    winners: VirtualServices,
    /// Keys claimed by more than one Service: the losers' rejections.
    conflicts: BTreeMap<ServicePort, Vec<Rejection>>,
    /// Address → (winners binding it, winners carrying a NodePort on it).
    address_roles: HashMap<IpAddr, (usize, usize)>,
    bound: Arc<BTreeSet<IpAddr>>,
    node_ports: Arc<BTreeSet<IpAddr>>,
    /// Services with rejections or a health check (usually few): gathered per build, as are
    /// the conflicts, duplicates and ignored slices (O(those) per build).
    rejected_of: BTreeMap<ObjectKey, Vec<Rejection>>,
    health_of: BTreeMap<ObjectKey, HealthCheckNodePort>,
    /// Objects named twice in the input (the first one is used).
    duplicates: Vec<Rejection>,
    /// EndpointSlices of Services that do not exist, by that Service.
    ignored: BTreeMap<ObjectKey, Vec<String>>,
}

impl ModelCache {
    /// [`super::build`], recomputing only what changed since the previous call, plus which
    /// virtual services may have changed.
    pub fn build<S: Borrow<Service>, E: Borrow<EndpointSlice>>(
        &mut self,
        services: &[S],
        slices: &[E],
        node: &NodeInfo,
        cfg: &ModelConfig,
    ) -> (DesiredState, Changed) {
        // Copies: nothing is shared with the previous call, every object counts as changed.
        let services: Objects<ServiceInfo> = services
            .iter()
            .map(|s| Arc::new(ServiceInfo::from(s.borrow())))
            .collect();
        let slices: Objects<EndpointSliceInfo> = slices
            .iter()
            .map(|s| Arc::new(EndpointSliceInfo::from(s.borrow())))
            .collect();
        self.build_objects(&services, &slices, node, cfg)
    }

    /// [`Self::build`] on lists of shared objects (an object kept from the previous call is
    /// recognized by identity), collected into [`Objects`] (O(n log n)).
    pub fn build_shared(
        &mut self,
        services: Vec<Arc<ServiceInfo>>,
        slices: Vec<Arc<EndpointSliceInfo>>,
        node: &NodeInfo,
        cfg: &ModelConfig,
    ) -> (DesiredState, Changed) {
        self.build_objects(&services.into(), &slices.into(), node, cfg)
    }

    /// [`Self::build`] on a source's maps: the changes since the previous call are found by
    /// [`Objects::changes`], which skips what the two versions share, so a change to one
    /// object costs O(log n) here, whatever the number of objects.
    pub fn build_objects(
        &mut self,
        services: &Objects<ServiceInfo>,
        slices: &Objects<EndpointSliceInfo>,
        node: &NodeInfo,
        cfg: &ModelConfig,
    ) -> (DesiredState, Changed) {
        let same_context = matches!(&self.context, Some((n, c)) if n == node && c == cfg);
        if !same_context {
            // Everything from scratch.
            *self = ModelCache {
                context: Some((node.clone(), cfg.clone())),
                ..ModelCache::default()
            };
            let state = self.rebuild(services, slices, node, cfg);
            return (state, Changed::All);
        }
        let mut dirty: BTreeSet<ObjectKey> = BTreeSet::new();
        for d in self.slices.changes(slices) {
            if let Some(o) = d.before()
                && let Some(k) = slice_service(o)
            {
                if let Some(m) = self.slices_of.get_mut(&k) {
                    m.remove(&o.name);
                    if m.is_empty() {
                        self.slices_of.remove(&k);
                    }
                }
                dirty.insert(k);
            }
            if let Some(n) = d.after()
                && let Some(k) = slice_service(n)
            {
                self.slices_of
                    .entry(k.clone())
                    .or_default()
                    .insert(n.clone());
                dirty.insert(k);
            }
        }
        // The Services that changed: their new object, or `None` when deleted.
        let mut present: HashMap<ObjectKey, Option<Arc<ServiceInfo>>> = HashMap::new();
        for d in self.services.changes(services) {
            let key = d.before().or(d.after()).map(|s| owned(s.key()));
            if let Some(key) = key {
                present.insert(key.clone(), d.after().cloned());
                dirty.insert(key);
            }
        }
        let ctx = NodeContext::new(node, cfg);
        let mut changed = BTreeSet::new();
        for key in &dirty {
            let svc = match present.get(key) {
                Some(s) => s.clone(),
                // Only its slices changed: the Service object is the one we have.
                None => self.entries.get(key).map(|(s, _)| s.clone()),
            };
            self.update(key, svc, &ctx, node, cfg, &mut changed);
            self.refresh_ignored(key);
        }
        self.services = services.clone();
        self.slices = slices.clone();
        self.refresh_duplicates();
        let state = self.output();
        (state, Changed::Keys(changed))
    }

    /// Builds every Service from scratch into an empty cache.
    fn rebuild(
        &mut self,
        services: &Objects<ServiceInfo>,
        slices: &Objects<EndpointSliceInfo>,
        node: &NodeInfo,
        cfg: &ModelConfig,
    ) -> DesiredState {
        for s in slices.iter() {
            if let Some(k) = slice_service(s) {
                self.slices_of.entry(k).or_default().insert(s.clone());
            }
        }
        let ctx = NodeContext::new(node, cfg);
        let mut changed = BTreeSet::new();
        for svc in services.iter() {
            let key = owned(svc.key());
            self.update(&key, Some(svc.clone()), &ctx, node, cfg, &mut changed);
        }
        let keys: Vec<ObjectKey> = self.slices_of.keys().cloned().collect();
        for key in &keys {
            self.refresh_ignored(key);
        }
        self.services = services.clone();
        self.slices = slices.clone();
        self.refresh_duplicates();
        self.output()
    }

    /// The rejections of objects a list named twice (the first one is used): O(such objects).
    fn refresh_duplicates(&mut self) {
        let services = self.services.repeated().iter().map(|s| {
            let (ns, name) = s.key();
            Rejection {
                object: format!("Service {ns}/{name}"),
                reason: ServiceError::Duplicate.to_string(),
            }
        });
        // A repeated slice of no Service is not reported (nothing reads it).
        let slices = self
            .slices
            .repeated()
            .iter()
            .filter(|s| slice_service(s).is_some())
            .map(|s| {
                let (ns, name) = s.key();
                Rejection {
                    object: format!("EndpointSlice {ns}/{name}"),
                    reason: "another EndpointSlice with the same namespace/name came first"
                        .to_owned(),
                }
            });
        self.duplicates = services.chain(slices).collect();
    }

    /// Recomputes one Service (or removes it, with `None`) and the keys it claims.
    fn update(
        &mut self,
        key: &ObjectKey,
        svc: Option<Arc<ServiceInfo>>,
        ctx: &NodeContext<'_>,
        node: &NodeInfo,
        cfg: &ModelConfig,
        changed: &mut BTreeSet<ServicePort>,
    ) {
        let old = self.entries.remove(key);
        let new = svc
            .as_ref()
            .map(|svc| compute(svc, self.slices_of.get(key), ctx, node, cfg));
        // Every key this Service claimed or claims, with its winner before the change.
        let mut keys: BTreeMap<ServicePort, Option<Arc<VirtualService>>> = BTreeMap::new();
        for c in old
            .iter()
            .flat_map(|(_, o)| &o.candidates)
            .chain(new.iter().flat_map(|o| &o.candidates))
        {
            let k = ServicePort::of(&c.vs);
            if let std::collections::btree_map::Entry::Vacant(e) = keys.entry(k) {
                e.insert(self.winner(&k));
            }
        }
        if let Some((_, out)) = &old {
            for c in &out.candidates {
                self.withdraw(ServicePort::of(&c.vs), c);
            }
        }
        if let Some(out) = &new {
            for c in &out.candidates {
                self.claim(ServicePort::of(&c.vs), c.clone());
            }
        }
        for (k, before) in keys {
            let after = self.winner(&k);
            self.set_winner(before.as_ref(), after.as_ref(), ctx);
            self.winners.set(k, after);
            self.refresh_conflicts(k);
            changed.insert(k);
        }
        self.rejected_of.remove(key);
        self.health_of.remove(key);
        let (Some(svc), Some(out)) = (svc, new) else {
            return;
        };
        if !out.rejected.is_empty() {
            self.rejected_of.insert(key.clone(), out.rejected.clone());
        }
        if let Some(h) = &out.health {
            self.health_of.insert(key.clone(), h.clone());
        }
        self.entries.insert(key.clone(), (svc, out));
    }

    /// Whether `key` names slices without a Service (reported, not an error).
    fn refresh_ignored(&mut self, key: &ObjectKey) {
        match self.slices_of.get(key) {
            Some(slices) if !self.entries.contains_key(key) => {
                let (ns, svc) = key;
                let lines = slices
                    .iter()
                    .map(|s| &s.name)
                    .map(|name| {
                        format!(
                            "EndpointSlice {ns}/{name}: its Service {ns}/{svc} is unknown; ignored"
                        )
                    })
                    .collect();
                self.ignored.insert(key.clone(), lines);
            }
            _ => {
                self.ignored.remove(key);
            }
        }
    }

    /// Moves an address's roles from one winning virtual service to another, touching the
    /// address sets only when a membership really changes (they are shared with the last
    /// output, so a needless touch would copy them and make the next diff think they changed).
    fn set_winner(
        &mut self,
        from: Option<&Arc<VirtualService>>,
        to: Option<&Arc<VirtualService>>,
        ctx: &NodeContext<'_>,
    ) {
        if from.zip(to).is_some_and(|(a, b)| Arc::ptr_eq(a, b)) {
            return;
        }
        let mut deltas: Vec<(IpAddr, isize, isize)> = Vec::with_capacity(2);
        for (vs, sign) in [(from, -1isize), (to, 1)] {
            let Some(vs) = vs else { continue };
            let (bound, node_port) = roles(vs, ctx);
            let d = (sign * bound as isize, sign * node_port as isize);
            match deltas.iter_mut().find(|(a, ..)| *a == vs.address) {
                Some(e) => {
                    e.1 += d.0;
                    e.2 += d.1;
                }
                None => deltas.push((vs.address, d.0, d.1)),
            }
        }
        for (address, db, dn) in deltas {
            if db == 0 && dn == 0 {
                continue;
            }
            let e = self.address_roles.entry(address).or_default();
            let before = *e;
            e.0 = e.0.saturating_add_signed(db);
            e.1 = e.1.saturating_add_signed(dn);
            let after = *e;
            if after == (0, 0) {
                self.address_roles.remove(&address);
            }
            if (before.0 > 0) != (after.0 > 0) {
                let set = Arc::make_mut(&mut self.bound);
                if after.0 > 0 {
                    set.insert(address);
                } else {
                    set.remove(&address);
                }
            }
            if (before.1 > 0) != (after.1 > 0) {
                let set = Arc::make_mut(&mut self.node_ports);
                if after.1 > 0 {
                    set.insert(address);
                } else {
                    set.remove(&address);
                }
            }
        }
    }

    fn claim(&mut self, k: ServicePort, c: Candidate) {
        let list = self.by_key.entry(k).or_default();
        let at = list.partition_point(|x| rank(x, &c) != std::cmp::Ordering::Greater);
        list.insert(at, c);
    }

    fn withdraw(&mut self, k: ServicePort, c: &Candidate) {
        let Some(list) = self.by_key.get_mut(&k) else {
            return;
        };
        list.retain(|x| !Arc::ptr_eq(&x.vs, &c.vs));
        if list.is_empty() {
            self.by_key.remove(&k);
        }
    }

    fn winner(&self, k: &ServicePort) -> Option<Arc<VirtualService>> {
        self.by_key
            .get(k)
            .and_then(|l| l.first())
            .map(|c| c.vs.clone())
    }

    /// The rejections of the candidates of `k` that lose to another Service's.
    fn refresh_conflicts(&mut self, k: ServicePort) {
        let lost: Vec<Rejection> = match self.by_key.get(&k).and_then(|l| l.split_first()) {
            Some((winner, losers)) => losers
                .iter()
                .filter(|l| l.vs.service != winner.vs.service)
                .map(|l| service::conflict_rejection(&l.vs, &winner.vs))
                .collect(),
            None => Vec::new(),
        };
        if lost.is_empty() {
            self.conflicts.remove(&k);
        } else {
            self.conflicts.insert(k, lost);
        }
    }

    /// The desired state from the maintained parts: the virtual services and address sets are
    /// shared (O(1)); rejections, health checks and ignored slices are gathered (O(those)).
    fn output(&self) -> DesiredState {
        let mut rejected: Vec<Rejection> = self
            .rejected_of
            .values()
            .flatten()
            .chain(self.conflicts.values().flatten())
            .chain(&self.duplicates)
            .cloned()
            .collect();
        rejected.sort();
        rejected.dedup();
        let ignored_slices: Vec<String> = self.ignored.values().flatten().cloned().collect();
        DesiredState {
            virtual_services: self.winners.clone(),
            bound_addresses: self.bound.clone(),
            service_addresses: self.bound.clone(),
            node_port_addresses: self.node_ports.clone(),
            health_check_node_ports: self.health_of.values().cloned().collect(),
            rejected,
            ignored_slices,
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::model::SERVICE_NAME_LABEL;

    /// A fresh cache's build: what [`super::super::build`] gives for these objects.
    fn fresh(
        services: &[Arc<ServiceInfo>],
        slices: &[Arc<EndpointSliceInfo>],
        node: &NodeInfo,
        cfg: &ModelConfig,
    ) -> DesiredState {
        ModelCache::default()
            .build_shared(services.to_vec(), slices.to_vec(), node, cfg)
            .0
    }
    use crate::model::LocalAddress;

    fn service(i: usize, rv: u32, port: u16, ip: Option<&str>) -> Arc<ServiceInfo> {
        let ip = ip.map_or(format!("10.96.0.{}", i + 1), str::to_string);
        Arc::new(ServiceInfo::from(
            serde_json::from_value::<Service>(json!({
                "metadata": {"namespace": "ns", "name": format!("s{i}"), "resourceVersion": rv.to_string(),
                             "creationTimestamp": format!("2026-01-01T00:00:{:02}Z", i % 60)},
                "spec": {"type": "NodePort", "clusterIP": ip, "clusterIPs": [ip],
                         "ports": [{"name": "p", "port": port, "protocol": "TCP", "nodePort": 30000 + i}]}
            }))
            .unwrap(),
        ))
    }

    fn slice(i: usize, rv: u32, endpoints: usize) -> Arc<EndpointSliceInfo> {
        let eps: Vec<_> = (0..endpoints)
            .map(|j| json!({"addresses": [format!("10.244.{i}.{}", j + 1)], "conditions": {"ready": true}}))
            .collect();
        Arc::new(EndpointSliceInfo::from(
            serde_json::from_value::<EndpointSlice>(json!({
                "metadata": {"namespace": "ns", "name": format!("s{i}-1"), "resourceVersion": rv.to_string(),
                             "labels": {SERVICE_NAME_LABEL: format!("s{i}")}},
                "addressType": "IPv4",
                "ports": [{"name": "p", "port": 8080, "protocol": "TCP"}],
                "endpoints": eps
            }))
            .unwrap(),
        ))
    }

    fn node() -> NodeInfo {
        NodeInfo {
            name: "n1".into(),
            addresses: vec![LocalAddress {
                address: "10.0.0.1".parse().unwrap(),
                interface: "eth0".into(),
            }],
            ..NodeInfo::default()
        }
    }

    fn by_key(d: &DesiredState) -> BTreeMap<ServicePort, Arc<VirtualService>> {
        d.virtual_services
            .iter()
            .map(|v| (ServicePort::of(v), v.clone()))
            .collect()
    }

    type Step = Box<dyn Fn(&mut Vec<Arc<ServiceInfo>>, &mut Vec<Arc<EndpointSliceInfo>>)>;

    /// After every change: the incremental build equals a fresh one, and every virtual service
    /// that differs from the previous build is in `Changed`.
    #[test]
    fn incremental_builds_equal_fresh_builds_and_report_every_change() {
        let mut services: Vec<Arc<ServiceInfo>> =
            (0..20).map(|i| service(i, 1, 80, None)).collect();
        let mut slices: Vec<Arc<EndpointSliceInfo>> = (0..20).map(|i| slice(i, 1, 2)).collect();
        let (node, cfg) = (node(), ModelConfig::default());
        let mut cache = ModelCache::default();
        let (first, changed) = cache.build_shared(services.clone(), slices.clone(), &node, &cfg);
        assert_eq!(changed, Changed::All);
        assert_eq!(first, fresh(&services, &slices, &node, &cfg));
        let mut previous = first;
        let steps: Vec<(&str, Step)> = vec![
            (
                "an endpoint added",
                Box::new(|_, sl| sl[3] = slice(3, 2, 3)),
            ),
            (
                "two endpoints removed",
                Box::new(|_, sl| sl[3] = slice(3, 3, 1)),
            ),
            (
                "a port changed",
                Box::new(|sv, _| sv[5] = service(5, 2, 81, None)),
            ),
            (
                "a Service deleted",
                Box::new(|sv, _| {
                    sv.remove(7);
                }),
            ),
            (
                "a slice deleted",
                Box::new(|_, sl| {
                    sl.remove(9);
                }),
            ),
            (
                "a Service and slice added",
                Box::new(|sv, sl| {
                    sv.push(service(30, 1, 80, None));
                    sl.push(slice(30, 1, 2));
                }),
            ),
            // A newer Service claims an older one's address: the older keeps it.
            (
                "a conflicting Service",
                Box::new(|sv, sl| {
                    sv.push(service(40, 1, 80, Some("10.96.0.2")));
                    sl.push(slice(40, 1, 1));
                }),
            ),
            (
                "the older one deleted: the newer wins",
                Box::new(|sv, _| sv.retain(|s| &*s.name != "s1")),
            ),
            (
                "a slice for an unknown Service",
                Box::new(|_, sl| sl.push(slice(50, 1, 1))),
            ),
            ("nothing", Box::new(|_, _| {})),
        ];
        for (what, step) in &steps {
            step(&mut services, &mut slices);
            let (got, changed) = cache.build_shared(services.clone(), slices.clone(), &node, &cfg);
            assert_eq!(got, fresh(&services, &slices, &node, &cfg), "{what}");
            let (old, new) = (by_key(&previous), by_key(&got));
            let differing: BTreeSet<ServicePort> = old
                .keys()
                .chain(new.keys())
                .filter(|k| old.get(*k) != new.get(*k))
                .copied()
                .collect();
            let Changed::Keys(keys) = &changed else {
                panic!("{what}: {changed:?}")
            };
            assert!(
                differing.is_subset(keys),
                "{what}: {differing:?} not in {keys:?}"
            );
            if *what == "nothing" {
                assert!(changed.is_empty(), "nothing changed but {changed:?}");
            }
            previous = got;
        }
        // A node change recomputes everything.
        let mut other = node.clone();
        other.name = "n2".into();
        assert_eq!(
            cache.build_shared(services, slices, &other, &cfg).1,
            Changed::All
        );
    }

    /// One step of a source's life: an object set or deleted, or a sync reading the map.
    #[derive(Debug, Clone)]
    enum Op {
        /// Service `i` with port `port` and ClusterIP `ip` (few values: Services conflict),
        /// `internalTrafficPolicy: Local` or not.
        Service {
            i: usize,
            port: u16,
            ip: u8,
            local: bool,
        },
        NoService(usize),
        /// Slice of Service `i` with `endpoints` endpoints (a Service may not exist).
        Slice {
            i: usize,
            endpoints: usize,
        },
        NoSlice(usize),
        Sync,
    }

    fn op() -> impl proptest::strategy::Strategy<Value = Op> {
        use proptest::prelude::*;
        prop_oneof![
            3 => (0..8usize, 80..82u16, 1..4u8, any::<bool>())
                .prop_map(|(i, port, ip, local)| Op::Service { i, port, ip, local }),
            1 => (0..8usize).prop_map(Op::NoService),
            4 => (0..10usize, 0..4usize).prop_map(|(i, endpoints)| Op::Slice { i, endpoints }),
            1 => (0..10usize).prop_map(Op::NoSlice),
            2 => Just(Op::Sync),
        ]
    }

    proptest::proptest! {
        /// A source's maps changed by single watch events and read at random points (changes
        /// coalesced between syncs, as the sync loop does): each incremental build equals a
        /// full build of the same objects, and its `Changed` holds every key that differs.
        #[test]
        fn builds_from_changed_maps_equal_full_builds(ops in proptest::collection::vec(op(), 1..60)) {
            let (node, cfg) = (node(), ModelConfig::default());
            let mut services: Objects<ServiceInfo> = Objects::default();
            let mut slices: Objects<EndpointSliceInfo> = Objects::default();
            let mut cache = ModelCache::default();
            let mut previous = cache.build_objects(&services, &slices, &node, &cfg).0;
            let mut rv = 1;
            for op in ops.iter().chain([&Op::Sync]) {
                rv += 1;
                match *op {
                    Op::Service { i, port, ip, local } => {
                        let ip = format!("10.96.0.{ip}");
                        let mut s = (*service(i, rv, port, Some(&ip))).clone();
                        if local {
                            s.internal_traffic_policy = Some("Local".into());
                        }
                        services.insert(Arc::new(s));
                    }
                    Op::NoService(i) => {
                        services.remove("ns", &format!("s{i}"));
                    }
                    Op::Slice { i, endpoints } => {
                        slices.insert(slice(i, rv, endpoints));
                    }
                    Op::NoSlice(i) => {
                        slices.remove("ns", &format!("s{i}-1"));
                    }
                    Op::Sync => {
                        let (got, changed) = cache.build_objects(&services, &slices, &node, &cfg);
                        let all_services: Vec<Arc<ServiceInfo>> = services.iter().cloned().collect();
                        let all_slices: Vec<Arc<EndpointSliceInfo>> = slices.iter().cloned().collect();
                        proptest::prop_assert_eq!(&got, &fresh(&all_services, &all_slices, &node, &cfg));
                        let vss = &got.virtual_services;
                        proptest::prop_assert!(vss.local_only().eq(vss.iter().filter(|v| v.local_only)));
                        let (old, new) = (by_key(&previous), by_key(&got));
                        let Changed::Keys(keys) = &changed else {
                            proptest::prop_assert!(false, "rebuilt everything: {changed:?}");
                            return Ok(());
                        };
                        for k in old.keys().chain(new.keys()) {
                            proptest::prop_assert!(old.get(k) == new.get(k) || keys.contains(k), "{k} not in {keys:?}");
                        }
                        previous = got;
                    }
                }
            }
        }
    }

    /// Two defects found by fuzzing the file source (issue 13), the incremental build then
    /// differing from a fresh one: an object named twice whose first occurrence lies in the part
    /// of the list that lines up with the previous one was not seen as a duplicate; and two
    /// EndpointSlices of one namespace/name for different Services were both kept, so the next
    /// diff (by namespace/name) lost one of them and kept a stale slice. Each case here, and the
    /// build after it, equals a fresh build (which keeps the first and rejects the second).
    #[test]
    fn a_name_repeated_after_the_aligned_prefix_is_a_duplicate() {
        let (node, cfg) = (node(), ModelConfig::default());
        // The same slice name for another Service.
        let renamed = |rv: u32| {
            let mut s = (*slice(1, rv, 1)).clone();
            s.service_name = Some("s2".into());
            Arc::new(s)
        };
        for twice in ["services", "slices", "slice names"] {
            let mut cache = ModelCache::default();
            cache.build_shared(
                vec![service(1, 1, 80, None)],
                vec![slice(1, 1, 2)],
                &node,
                &cfg,
            );
            let (services, slices) = match twice {
                "services" => (
                    vec![service(1, 2, 80, None), service(1, 3, 81, None)],
                    vec![slice(1, 2, 2)],
                ),
                "slices" => (
                    vec![service(1, 2, 80, None)],
                    vec![slice(1, 2, 2), slice(1, 3, 1)],
                ),
                _ => (
                    vec![service(1, 2, 80, None)],
                    vec![slice(1, 2, 2), renamed(3)],
                ),
            };
            let slices_twice = twice;
            let (got, _) = cache.build_shared(services.clone(), slices.clone(), &node, &cfg);
            assert_eq!(
                got,
                fresh(&services, &slices, &node, &cfg),
                "slices twice: {slices_twice}"
            );
            let (services, slices) = (vec![service(1, 4, 80, None)], Vec::new());
            let (got, _) = cache.build_shared(services.clone(), slices.clone(), &node, &cfg);
            assert_eq!(
                got,
                fresh(&services, &slices, &node, &cfg),
                "slices twice: {slices_twice}"
            );
        }
    }
}
