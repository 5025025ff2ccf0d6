//! The model's input collections: [`Objects`], the Services or EndpointSlices a source knows,
//! by (namespace, name), as a persistent map. A source keeps one, changes it per watch event
//! (O(log n), copying only the path to the change) and publishes clones of it (O(1), sharing
//! everything); [`Objects::changes`] between two versions of one map skips the parts they
//! share, so the model's work per change is in proportion to the change, not to the number of
//! objects.

use std::fmt;
use std::sync::Arc;

use k8s_openapi::Metadata;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

/// (namespace, name) of an object; namespace "default" when unset.
pub type ObjectKey = (String, String);

/// An object's (namespace, name), namespace "default" when unset or empty.
pub fn object_key(meta: &ObjectMeta) -> (&str, &str) {
    (
        meta.namespace
            .as_deref()
            .filter(|n| !n.is_empty())
            .unwrap_or("default"),
        meta.name.as_deref().unwrap_or(""),
    )
}

fn owned((ns, name): (&str, &str)) -> ObjectKey {
    (ns.to_string(), name.to_string())
}

/// What an object is stored under in [`Objects`]: its (namespace, name), namespace "default"
/// when unset or empty.
pub trait Keyed {
    fn object_key(&self) -> (&str, &str);
}

impl Keyed for super::ServiceInfo {
    fn object_key(&self) -> (&str, &str) {
        self.key()
    }
}

impl Keyed for k8s_openapi::api::core::v1::Node {
    fn object_key(&self) -> (&str, &str) {
        object_key(self.metadata())
    }
}

impl Keyed for super::EndpointSliceInfo {
    fn object_key(&self) -> (&str, &str) {
        self.key()
    }
}

/// An object as stored: two are equal when they are the same object (a source replaces an
/// object that changed and keeps the one that did not), so comparing costs a pointer.
struct Shared<K>(Arc<K>);

impl<K> Clone for Shared<K> {
    fn clone(&self) -> Self {
        Shared(self.0.clone())
    }
}

impl<K> PartialEq for Shared<K> {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

/// Objects of one kind by (namespace, name), each once (see the module documentation).
pub struct Objects<K> {
    map: imbl::OrdMap<ObjectKey, Shared<K>>,
    /// Objects collected from a list after one of the same (namespace, name) (only a file
    /// source can list two): not in the map, the first one is; the model rejects them.
    repeated: Vec<Arc<K>>,
}

impl<K> Clone for Objects<K> {
    fn clone(&self) -> Self {
        Objects {
            map: self.map.clone(),
            repeated: self.repeated.clone(),
        }
    }
}

impl<K> Default for Objects<K> {
    fn default() -> Self {
        Objects {
            map: imbl::OrdMap::new(),
            repeated: Vec::new(),
        }
    }
}

impl<K: fmt::Debug> fmt::Debug for Objects<K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.iter()).finish()
    }
}

/// How one object differs between two versions of a map.
pub enum ObjectChange<'a, K> {
    Added(&'a Arc<K>),
    Changed(&'a Arc<K>, &'a Arc<K>),
    Removed(&'a Arc<K>),
}

impl<'a, K> ObjectChange<'a, K> {
    /// The object before the change (none when added).
    pub fn before(&self) -> Option<&'a Arc<K>> {
        match *self {
            ObjectChange::Added(_) => None,
            ObjectChange::Changed(o, _) | ObjectChange::Removed(o) => Some(o),
        }
    }

    /// The object after the change (none when removed).
    pub fn after(&self) -> Option<&'a Arc<K>> {
        match *self {
            ObjectChange::Removed(_) => None,
            ObjectChange::Added(n) | ObjectChange::Changed(_, n) => Some(n),
        }
    }
}

impl<K: Keyed> Objects<K> {
    /// Stores `obj` under its (namespace, name); returns the object it replaces.
    pub fn insert(&mut self, obj: Arc<K>) -> Option<Arc<K>> {
        let key = owned(obj.object_key());
        self.map.insert(key, Shared(obj)).map(|s| s.0)
    }

    /// Removes the object named `namespace`/`name`.
    pub fn remove(&mut self, namespace: &str, name: &str) -> Option<Arc<K>> {
        self.map
            .remove(&(namespace.to_string(), name.to_string()))
            .map(|s| s.0)
    }

    /// The object named `namespace`/`name`.
    pub fn get(&self, namespace: &str, name: &str) -> Option<&Arc<K>> {
        self.map
            .get(&(namespace.to_string(), name.to_string()))
            .map(|s| &s.0)
    }
}

impl<K> Objects<K> {
    /// Every object, in (namespace, name) order.
    pub fn iter(&self) -> impl Iterator<Item = &Arc<K>> {
        self.map.values().map(|s| &s.0)
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Objects of a list that repeated an earlier one's (namespace, name), in list order.
    pub fn repeated(&self) -> &[Arc<K>] {
        &self.repeated
    }

    /// What differs from `self` to `newer`, in (namespace, name) order. Costs a pointer
    /// comparison per object that differs or lies in a part of the maps that is not shared:
    /// between two versions of one source's map, O(changes × log n).
    pub fn changes<'a>(&'a self, newer: &'a Self) -> impl Iterator<Item = ObjectChange<'a, K>> {
        self.map.diff(&newer.map).map(|d| match d {
            imbl::ordmap::DiffItem::Add(_, n) => ObjectChange::Added(&n.0),
            imbl::ordmap::DiffItem::Update { old, new } => {
                ObjectChange::Changed(&old.1.0, &new.1.0)
            }
            imbl::ordmap::DiffItem::Remove(_, o) => ObjectChange::Removed(&o.0),
        })
    }

    /// Whether `self` and `other` are the same version (a clone with no change since).
    pub fn ptr_eq(&self, other: &Self) -> bool {
        self.map.ptr_eq(&other.map)
    }
}

/// The first object of each (namespace, name) is kept, the later ones are
/// [`Objects::repeated`].
impl<K: Keyed> FromIterator<Arc<K>> for Objects<K> {
    fn from_iter<I: IntoIterator<Item = Arc<K>>>(iter: I) -> Self {
        let mut out = Objects::default();
        for obj in iter {
            let key = owned(obj.object_key());
            if out.map.contains_key(&key) {
                out.repeated.push(obj);
            } else {
                out.map.insert(key, Shared(obj));
            }
        }
        out
    }
}

impl<K: Keyed> From<Vec<Arc<K>>> for Objects<K> {
    fn from(v: Vec<Arc<K>>) -> Self {
        v.into_iter().collect()
    }
}
