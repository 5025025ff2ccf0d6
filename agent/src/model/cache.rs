//! Incremental model building. [`ModelCache::build`] gives the same [`DesiredState`] as
//! [`super::build`], but keeps everything between calls: the per-Service output (validation,
//! endpoint categorization, virtual services), the candidates for every virtual-service key
//! (conflict resolution), the address sets, rejections and health checks. A call finds what
//! changed by object identity (sources share unchanged objects between snapshots, so comparing
//! two snapshots is a pointer walk), recomputes only the Services touched, updates the keys
//! they claim, and reports those keys ([`Changed`]) so the reconcilers diff only them.
//!
//! A new node view or configuration recomputes everything; so does an input that names the
//! same Service or EndpointSlice (namespace/name) twice (only a file source can do that).

use std::borrow::Borrow;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;
use std::sync::Arc;

use k8s_openapi::Metadata;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

use super::endpoints::SliceIndex;
use super::service::{self, Candidate, NodeContext};
use super::validate;
use super::{
    DesiredState, HealthCheckNodePort, ModelConfig, NodeInfo, Rejection, SERVICE_NAME_LABEL,
    ServiceError, ServicePort, VirtualService, VirtualServiceKind,
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

/// (namespace, name) of an object; namespace "default" when unset.
type ObjKey = (String, String);

fn obj_key(meta: &ObjectMeta) -> (&str, &str) {
    (
        meta.namespace
            .as_deref()
            .filter(|n| !n.is_empty())
            .unwrap_or("default"),
        meta.name.as_deref().unwrap_or(""),
    )
}

fn owned((ns, name): (&str, &str)) -> ObjKey {
    (ns.to_string(), name.to_string())
}

/// The Service (namespace, name) an EndpointSlice belongs to.
fn slice_service(s: &EndpointSlice) -> Option<ObjKey> {
    let svc = s
        .metadata
        .labels
        .as_ref()?
        .get(SERVICE_NAME_LABEL)
        .filter(|n| !n.is_empty())?;
    Some((obj_key(&s.metadata).0.to_string(), svc.clone()))
}

/// How one object differs between two lists.
enum Diff<'a, K> {
    Added(&'a Arc<K>),
    Changed(&'a Arc<K>, &'a Arc<K>),
    Removed(&'a Arc<K>),
}

/// Walks two lists of objects (each unique by key; `None` when `new` names a key twice) and
/// reports the differences. Lists that line up cost a pointer comparison per object.
fn diff<'a, K: Metadata<Ty = ObjectMeta>>(
    old: &'a [Arc<K>],
    new: &'a [Arc<K>],
) -> Option<Vec<Diff<'a, K>>> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < old.len() && i < new.len() {
        if !Arc::ptr_eq(&old[i], &new[i]) {
            if obj_key(old[i].metadata()) != obj_key(new[i].metadata()) {
                break;
            }
            out.push(Diff::Changed(&old[i], &new[i]));
        }
        i += 1;
    }
    if i == new.len() {
        // Nothing added (the usual change: objects edited in place): only removals are left,
        // and the aligned prefix is hashed for nothing.
        out.extend(old[i..].iter().map(Diff::Removed));
        return Some(out);
    }
    let mut rest: HashMap<(&str, &str), &Arc<K>> = old[i..]
        .iter()
        .map(|o| (obj_key(o.metadata()), o))
        .collect();
    // The aligned prefix has the previous list's keys (unique): a later object may repeat one.
    let mut seen: std::collections::HashSet<(&str, &str)> =
        new[..i].iter().map(|o| obj_key(o.metadata())).collect();
    for o in &new[i..] {
        let k = obj_key(o.metadata());
        if !seen.insert(k) {
            return None;
        }
        match rest.remove(&k) {
            Some(prev) if Arc::ptr_eq(prev, o) => {}
            Some(prev) => out.push(Diff::Changed(prev, o)),
            None => out.push(Diff::Added(o)),
        }
    }
    out.extend(rest.into_values().map(Diff::Removed));
    Some(out)
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
    svc: &Service,
    slices: Option<&BTreeMap<String, Arc<EndpointSlice>>>,
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
                slices.into_iter().flat_map(|m| m.values().map(|s| &**s)),
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
    services: Vec<Arc<Service>>,
    slices: Vec<Arc<EndpointSlice>>,
    /// (namespace, Service) → slice name → slice.
    slices_of: HashMap<ObjKey, BTreeMap<String, Arc<EndpointSlice>>>,
    /// (namespace, name) → the Service and its output.
    entries: HashMap<ObjKey, (Arc<Service>, ServiceOutput)>,
    /// Every key claimed by some Service, with its candidates in winning order.
    by_key: BTreeMap<ServicePort, Vec<Candidate>>,
    /// Address → (winners binding it, winners carrying a NodePort on it).
    address_roles: HashMap<IpAddr, (usize, usize)>,
    bound: Arc<BTreeSet<IpAddr>>,
    node_ports: Arc<BTreeSet<IpAddr>>,
    /// Services with rejections or a health check (usually few): gathered per build.
    rejected_of: BTreeMap<ObjKey, Vec<Rejection>>,
    health_of: BTreeMap<ObjKey, HealthCheckNodePort>,
    /// Objects named twice in the input (the first one is used); such an input is rebuilt
    /// from scratch every time.
    duplicates: Vec<Rejection>,
    /// EndpointSlices of Services that do not exist, by that Service.
    ignored: BTreeMap<ObjKey, Vec<String>>,
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
        // Shared objects are the fast path; other callers (tests, `plan`) get copies.
        let services: Vec<Arc<Service>> = services.iter().map(|s| to_arc(s.borrow())).collect();
        let slices: Vec<Arc<EndpointSlice>> = slices.iter().map(|s| to_arc(s.borrow())).collect();
        self.build_shared(services, slices, node, cfg)
    }

    /// [`Self::build`] on shared objects: an unchanged object is recognized by identity.
    pub fn build_shared(
        &mut self,
        services: Vec<Arc<Service>>,
        slices: Vec<Arc<EndpointSlice>>,
        node: &NodeInfo,
        cfg: &ModelConfig,
    ) -> (DesiredState, Changed) {
        let same_context = matches!(&self.context, Some((n, c)) if n == node && c == cfg);
        let diffs = if same_context {
            diff(&self.services, &services).zip(diff(&self.slices, &slices))
        } else {
            None
        };
        let Some((service_diffs, slice_diffs)) = diffs else {
            // Everything from scratch (new context, or a Service named twice).
            *self = ModelCache {
                context: Some((node.clone(), cfg.clone())),
                ..ModelCache::default()
            };
            let state = self.rebuild(services, slices, node, cfg);
            return (state, Changed::All);
        };
        let mut dirty: BTreeSet<ObjKey> = BTreeSet::new();
        for d in &slice_diffs {
            let (old, new) = match d {
                Diff::Added(n) => (None, Some(*n)),
                Diff::Changed(o, n) => (Some(*o), Some(*n)),
                Diff::Removed(o) => (Some(*o), None),
            };
            if let Some(o) = old
                && let Some(k) = slice_service(o)
            {
                if let Some(m) = self.slices_of.get_mut(&k) {
                    m.remove(obj_key(&o.metadata).1);
                    if m.is_empty() {
                        self.slices_of.remove(&k);
                    }
                }
                dirty.insert(k);
            }
            if let Some(n) = new
                && let Some(k) = slice_service(n)
            {
                self.slices_of
                    .entry(k.clone())
                    .or_default()
                    .insert(obj_key(&n.metadata).1.to_string(), n.clone());
                dirty.insert(k);
            }
        }
        for d in &service_diffs {
            let s = match d {
                Diff::Added(s) | Diff::Changed(_, s) | Diff::Removed(s) => s,
            };
            dirty.insert(owned(obj_key(&s.metadata)));
        }
        // Owned, so the old lists can be replaced while updating.
        let mut present: HashMap<ObjKey, Option<Arc<Service>>> = HashMap::new();
        for d in &service_diffs {
            match d {
                Diff::Added(s) | Diff::Changed(_, s) => {
                    present.insert(owned(obj_key(&s.metadata)), Some((*s).clone()));
                }
                Diff::Removed(s) => {
                    present.insert(owned(obj_key(&s.metadata)), None);
                }
            }
        }
        drop(service_diffs);
        drop(slice_diffs);
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
        self.services = services;
        self.slices = slices;
        let state = self.output(&ctx);
        (state, Changed::Keys(changed))
    }

    /// Builds every Service from scratch into an empty cache.
    fn rebuild(
        &mut self,
        services: Vec<Arc<Service>>,
        slices: Vec<Arc<EndpointSlice>>,
        node: &NodeInfo,
        cfg: &ModelConfig,
    ) -> DesiredState {
        // A namespace/name seen twice, whatever the slices' Services: the next build's diff
        // walks the list by namespace/name, so it must start from scratch too.
        let mut names: std::collections::HashSet<(&str, &str)> = std::collections::HashSet::new();
        let mut repeated = false;
        for s in &slices {
            let first = names.insert(obj_key(&s.metadata));
            if let Some(k) = slice_service(s) {
                let name = obj_key(&s.metadata).1.to_string();
                if !first {
                    self.duplicates.push(Rejection {
                        object: format!("EndpointSlice {}/{name}", obj_key(&s.metadata).0),
                        reason: "another EndpointSlice with the same namespace/name came first"
                            .to_owned(),
                    });
                    continue;
                }
                self.slices_of.entry(k).or_default().insert(name, s.clone());
            } else if !first {
                repeated = true;
            }
        }
        let ctx = NodeContext::new(node, cfg);
        let mut changed = BTreeSet::new();
        for svc in &services {
            let key = owned(obj_key(&svc.metadata));
            if self.entries.contains_key(&key) {
                self.duplicates.push(Rejection {
                    object: format!("Service {}/{}", key.0, key.1),
                    reason: ServiceError::Duplicate.to_string(),
                });
                continue;
            }
            self.update(&key, Some(svc.clone()), &ctx, node, cfg, &mut changed);
        }
        let keys: Vec<ObjKey> = self.slices_of.keys().cloned().collect();
        for key in &keys {
            self.refresh_ignored(key);
        }
        if !self.duplicates.is_empty() || repeated {
            self.context = None;
        }
        self.services = services;
        self.slices = slices;
        self.output(&ctx)
    }

    /// Recomputes one Service (or removes it, with `None`) and the keys it claims.
    fn update(
        &mut self,
        key: &ObjKey,
        svc: Option<Arc<Service>>,
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
    fn refresh_ignored(&mut self, key: &ObjKey) {
        match self.slices_of.get(key) {
            Some(slices) if !self.entries.contains_key(key) => {
                let (ns, svc) = key;
                let lines = slices
                    .keys()
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

    /// The desired state from the maintained parts (a pointer copy per virtual service).
    fn output(&self, ctx: &NodeContext<'_>) -> DesiredState {
        let _ = ctx;
        let mut rejected: Vec<Rejection> = self
            .rejected_of
            .values()
            .flatten()
            .chain(&self.duplicates)
            .cloned()
            .collect();
        let mut virtual_services = Vec::with_capacity(self.by_key.len());
        for list in self.by_key.values() {
            let Some(winner) = list.first() else { continue };
            virtual_services.push(winner.vs.clone());
            for loser in &list[1..] {
                if loser.vs.service != winner.vs.service {
                    rejected.push(service::conflict_rejection(&loser.vs, &winner.vs));
                }
            }
        }
        rejected.sort();
        rejected.dedup();
        let ignored_slices: Vec<String> = self.ignored.values().flatten().cloned().collect();
        DesiredState {
            virtual_services,
            bound_addresses: self.bound.clone(),
            service_addresses: self.bound.clone(),
            node_port_addresses: self.node_ports.clone(),
            health_check_node_ports: self.health_of.values().cloned().collect(),
            rejected,
            ignored_slices,
        }
    }
}

fn to_arc<K: Clone>(k: &K) -> Arc<K> {
    Arc::new(k.clone())
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::model::{LocalAddress, build};

    fn service(i: usize, rv: u32, port: u16, ip: Option<&str>) -> Arc<Service> {
        let ip = ip.map_or(format!("10.96.0.{}", i + 1), str::to_string);
        Arc::new(
            serde_json::from_value(json!({
                "metadata": {"namespace": "ns", "name": format!("s{i}"), "resourceVersion": rv.to_string(),
                             "creationTimestamp": format!("2026-01-01T00:00:{:02}Z", i % 60)},
                "spec": {"type": "NodePort", "clusterIP": ip, "clusterIPs": [ip],
                         "ports": [{"name": "p", "port": port, "protocol": "TCP", "nodePort": 30000 + i}]}
            }))
            .unwrap(),
        )
    }

    fn slice(i: usize, rv: u32, endpoints: usize) -> Arc<EndpointSlice> {
        let eps: Vec<_> = (0..endpoints)
            .map(|j| json!({"addresses": [format!("10.244.{i}.{}", j + 1)], "conditions": {"ready": true}}))
            .collect();
        Arc::new(
            serde_json::from_value(json!({
                "metadata": {"namespace": "ns", "name": format!("s{i}-1"), "resourceVersion": rv.to_string(),
                             "labels": {SERVICE_NAME_LABEL: format!("s{i}")}},
                "addressType": "IPv4",
                "ports": [{"name": "p", "port": 8080, "protocol": "TCP"}],
                "endpoints": eps
            }))
            .unwrap(),
        )
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

    type Step = Box<dyn Fn(&mut Vec<Arc<Service>>, &mut Vec<Arc<EndpointSlice>>)>;

    /// After every change: the incremental build equals a fresh one, and every virtual service
    /// that differs from the previous build is in `Changed`.
    #[test]
    fn incremental_builds_equal_fresh_builds_and_report_every_change() {
        let mut services: Vec<Arc<Service>> = (0..20).map(|i| service(i, 1, 80, None)).collect();
        let mut slices: Vec<Arc<EndpointSlice>> = (0..20).map(|i| slice(i, 1, 2)).collect();
        let (node, cfg) = (node(), ModelConfig::default());
        let mut cache = ModelCache::default();
        let (first, changed) = cache.build_shared(services.clone(), slices.clone(), &node, &cfg);
        assert_eq!(changed, Changed::All);
        assert_eq!(first, build(&services, &slices, &node, &cfg));
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
                Box::new(|sv, _| sv.retain(|s| s.metadata.name.as_deref() != Some("s1"))),
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
            assert_eq!(got, build(&services, &slices, &node, &cfg), "{what}");
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
            s.metadata.labels = Some([(SERVICE_NAME_LABEL.to_owned(), "s2".to_owned())].into());
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
                build(&services, &slices, &node, &cfg),
                "slices twice: {slices_twice}"
            );
            let (services, slices) = (vec![service(1, 4, 80, None)], Vec::new());
            let (got, _) = cache.build_shared(services.clone(), slices.clone(), &node, &cfg);
            assert_eq!(
                got,
                build(&services, &slices, &node, &cfg),
                "slices twice: {slices_twice}"
            );
        }
    }
}
