//! The Kubernetes source's object stores: one per watched resource, fed by kube-rs watcher
//! events. A (re)list is buffered and swapped in whole at its `InitDone`, so a relist never
//! exposes a state missing objects; each event says whether it changed anything the model
//! sees, so bookkeeping-only updates (a new resourceVersion, a Node heartbeat) publish nothing.

use std::sync::Arc;

use k8s_openapi::Metadata;
use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::Resource;
use kube::runtime::watcher::Event;

use crate::model::{EndpointSliceInfo, Keyed, ObjectChange, Objects, ServiceInfo, object_key};
use crate::source::Snapshot;

/// What a store keeps of a watched resource's objects, and which of their changes count.
pub(crate) trait Watched: Resource + Clone + Metadata<Ty = ObjectMeta> {
    /// The stored form.
    type Stored: Keyed + PartialEq;

    /// `self` as stored.
    fn store(self) -> Self::Stored;

    /// Whether two stored objects differ only in what the API server changes on its own (a
    /// new resourceVersion, managed fields, a heartbeat): such a change publishes nothing.
    /// A reduced form holds none of that: equality.
    fn same(a: &Self::Stored, b: &Self::Stored) -> bool {
        a == b
    }
}

/// `obj` without the fields whose changes alone publish nothing.
fn stripped<K: Resource + Clone>(obj: &K) -> K {
    let mut obj = obj.clone();
    let meta = obj.meta_mut();
    meta.resource_version = None;
    meta.managed_fields = None;
    obj
}

/// Services are kept as [`ServiceInfo`]: what it drops changes nothing the model sees.
impl Watched for Service {
    type Stored = ServiceInfo;

    fn store(self) -> ServiceInfo {
        self.into()
    }
}

/// Slices are kept as [`EndpointSliceInfo`]: what it drops changes nothing the model sees.
impl Watched for EndpointSlice {
    type Stored = EndpointSliceInfo;

    fn store(self) -> EndpointSliceInfo {
        self.into()
    }
}

impl Watched for Node {
    type Stored = Node;

    fn store(self) -> Node {
        slim(self)
    }

    fn same(a: &Node, b: &Node) -> bool {
        // The kubelet's status heartbeats.
        let beatless = |n: &Node| {
            let mut n = stripped(n);
            if let Some(conds) = n.status.as_mut().and_then(|s| s.conditions.as_mut()) {
                for c in conds {
                    c.last_heartbeat_time = None;
                }
            }
            n
        };
        beatless(a) == beatless(b)
    }
}

/// Objects of one resource, by namespace and name, as stored ([`Watched::Stored`]).
#[derive(Debug)]
pub(crate) struct Reflected<K: Watched> {
    /// Shared with the published snapshots (a persistent map: an event changes it in
    /// O(log n) without copying what a snapshot holds).
    objects: Objects<K::Stored>,
    /// The relist in progress, from its `Init` to its `InitDone`.
    relist: Option<Objects<K::Stored>>,
    /// The first list has completed.
    listed: bool,
}

impl<K: Watched> Default for Reflected<K> {
    fn default() -> Self {
        Self {
            objects: Objects::default(),
            relist: None,
            listed: false,
        }
    }
}

/// Whether two lists differ only in stripped fields.
fn same_maps<K: Watched>(a: &Objects<K::Stored>, b: &Objects<K::Stored>) -> bool {
    a.changes(b).all(|c| match c {
        ObjectChange::Changed(old, new) => K::same(old, new),
        ObjectChange::Added(_) | ObjectChange::Removed(_) => false,
    })
}

/// What the agent never reads and a real API server sends in bulk: managed fields and
/// `kubectl apply`'s copy of the whole object.
fn slim<K: Resource>(mut obj: K) -> K {
    let meta = obj.meta_mut();
    meta.managed_fields = None;
    if let Some(a) = meta.annotations.as_mut() {
        a.remove("kubectl.kubernetes.io/last-applied-configuration");
    }
    obj
}

impl<K: Watched> Reflected<K> {
    /// `obj` as stored, or the stored object it is the [`Watched::same`] as: an object that
    /// did not change stays the one the snapshots hold, so the model sees no change in it
    /// (a relist then recomputes only what differs).
    fn kept(&self, obj: K) -> Arc<K::Stored> {
        let obj = obj.store();
        let (ns, name) = obj.object_key();
        match self.objects.get(ns, name) {
            Some(old) if K::same(old, &obj) => old.clone(),
            _ => Arc::new(obj),
        }
    }

    /// Applies one watcher event; returns whether what the model sees changed (always true
    /// at the end of the first list).
    pub(crate) fn apply(&mut self, event: Event<K>) -> bool {
        match event {
            Event::Init => {
                self.relist = Some(Objects::default());
                false
            }
            Event::InitApply(obj) => {
                let obj = self.kept(obj);
                self.relist.get_or_insert_with(Objects::default).insert(obj);
                false
            }
            Event::InitDone => {
                let listed = self.relist.take().unwrap_or_default();
                let changed = !self.listed || !same_maps::<K>(&self.objects, &listed);
                self.objects = listed;
                self.listed = true;
                changed
            }
            Event::Apply(obj) => {
                let obj = self.kept(obj);
                let old = self.objects.insert(obj.clone());
                old.is_none_or(|old| !Arc::ptr_eq(&old, &obj))
            }
            Event::Delete(obj) => {
                let (ns, name) = object_key(obj.metadata());
                self.objects.remove(ns, name).is_some()
            }
        }
    }

    pub(crate) fn listed(&self) -> bool {
        self.listed
    }

    pub(crate) fn objects(&self) -> &Objects<K::Stored> {
        &self.objects
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.objects.len()
    }
}

/// The three stores of the source.
#[derive(Debug, Default)]
pub(crate) struct Stores {
    pub(crate) services: Reflected<Service>,
    pub(crate) endpoint_slices: Reflected<EndpointSlice>,
    pub(crate) node: Reflected<Node>,
}

impl Stores {
    /// Whether the first list of every resource has completed.
    pub(crate) fn all_listed(&self) -> bool {
        self.services.listed() && self.endpoint_slices.listed() && self.node.listed()
    }

    pub(crate) fn snapshot(&self, node_name: &str, generation: u64) -> Snapshot {
        Snapshot {
            services: self.services.objects().clone(),
            endpoint_slices: self.endpoint_slices.objects().clone(),
            node: self
                .node
                .objects()
                .iter()
                .find(|n| n.metadata.name.as_deref() == Some(node_name))
                .map(|n| (**n).clone()),
            generation,
        }
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    use super::*;

    fn svc(name: &str, rv: &str, ip: &str) -> Service {
        Service {
            metadata: ObjectMeta {
                namespace: Some("ns".into()),
                name: Some(name.into()),
                resource_version: Some(rv.into()),
                ..ObjectMeta::default()
            },
            spec: Some(k8s_openapi::api::core::v1::ServiceSpec {
                cluster_ip: Some(ip.into()),
                ..Default::default()
            }),
            ..Service::default()
        }
    }

    fn names(r: &Reflected<Service>) -> Vec<String> {
        r.objects().iter().map(|s| s.name.to_string()).collect()
    }

    #[test]
    fn relist_is_swapped_in_whole_at_init_done() {
        let mut r = Reflected::default();
        assert!(!r.apply(Event::Init));
        assert!(!r.apply(Event::InitApply(svc("a", "1", "10.0.0.1"))));
        assert!(!r.listed());
        assert!(r.apply(Event::InitDone), "the first list always publishes");
        assert!(r.listed());
        assert!(r.apply(Event::Apply(svc("b", "2", "10.0.0.2"))));
        // A relist: until InitDone the old objects stay, even if the list fails midway and
        // restarts.
        assert!(!r.apply(Event::Init));
        assert!(!r.apply(Event::InitApply(svc("a", "3", "10.0.0.1"))));
        assert_eq!(names(&r), ["a", "b"]);
        assert!(!r.apply(Event::Init));
        assert!(!r.apply(Event::InitApply(svc("b", "3", "10.0.0.2"))));
        assert_eq!(names(&r), ["a", "b"]);
        // "a" was deleted during the gap.
        assert!(r.apply(Event::InitDone));
        assert_eq!(names(&r), ["b"]);
        assert_eq!(r.len(), 1);
    }

    #[test]
    fn bookkeeping_only_changes_publish_nothing() {
        let mut r = Reflected::default();
        r.apply(Event::Init);
        r.apply(Event::InitApply(svc("a", "1", "10.0.0.1")));
        assert!(r.apply(Event::InitDone));
        assert!(!r.apply(Event::Apply(svc("a", "2", "10.0.0.1"))));
        // ...and the object the snapshots hold stays the same one, so the model sees no
        // change in it.
        let held = r.objects().iter().next().cloned().expect("a");
        r.apply(Event::Apply(svc("a", "3", "10.0.0.1")));
        assert!(Arc::ptr_eq(&held, r.objects().iter().next().expect("a")));
        // A relist with the same content publishes nothing either.
        r.apply(Event::Init);
        r.apply(Event::InitApply(svc("a", "5", "10.0.0.1")));
        assert!(!r.apply(Event::InitDone));
        assert!(r.apply(Event::Apply(svc("a", "6", "10.0.0.9"))));
        assert!(r.apply(Event::Delete(svc("a", "7", "10.0.0.9"))));
        assert!(!r.apply(Event::Delete(svc("a", "7", "10.0.0.9"))));
    }

    #[test]
    fn node_heartbeats_publish_nothing() {
        use k8s_openapi::api::core::v1::{NodeCondition, NodeStatus};
        use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
        let node = |rv: &str, beat: i64, ready: &str| Node {
            metadata: ObjectMeta {
                name: Some("n".into()),
                resource_version: Some(rv.into()),
                ..ObjectMeta::default()
            },
            status: Some(NodeStatus {
                conditions: Some(vec![NodeCondition {
                    type_: "Ready".into(),
                    status: ready.into(),
                    last_heartbeat_time: Some(Time(
                        k8s_openapi::jiff::Timestamp::from_second(beat).expect("time"),
                    )),
                    ..NodeCondition::default()
                }]),
                ..NodeStatus::default()
            }),
            ..Node::default()
        };
        let mut r = Reflected::default();
        r.apply(Event::Init);
        r.apply(Event::InitApply(node("1", 100, "True")));
        assert!(r.apply(Event::InitDone));
        assert!(!r.apply(Event::Apply(node("2", 200, "True"))));
        assert!(r.apply(Event::Apply(node("3", 300, "False"))));
    }
}
