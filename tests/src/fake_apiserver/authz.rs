//! The fake API server's optional authorizer: an allow-list of RBAC rules (a ClusterRole's
//! `rules`, as bound to the one anonymous client), so a test can run a client under exactly
//! the permissions a real cluster gives it. A resource request outside the rules gets `403
//! Forbidden` with a `Status` as the real server words it; non-resource paths (`/version`,
//! `/api`, `/apis`, ...) stay open, as `system:discovery` and `system:public-info-viewer` leave
//! them to every client. Off unless set ([`super::FakeApiServer::authorize`],
//! `POST /control/authorize`).

use serde::Deserialize;

/// kubeadm's (kube-apiserver's bootstrap policy) `system:node-proxier` ClusterRole, bound by
/// kubeadm to kube-proxy's ServiceAccount (v1.36).
pub const SYSTEM_NODE_PROXIER: &str = "\
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata:
  name: system:node-proxier
rules:
  - apiGroups: [\"\"]
    resources: [endpoints, services]
    verbs: [list, watch]
  - apiGroups: [\"\"]
    resources: [nodes]
    verbs: [get, list, watch]
  - apiGroups: [\"\", events.k8s.io]
    resources: [events]
    verbs: [create, patch, update]
  - apiGroups: [discovery.k8s.io]
    resources: [endpointslices]
    verbs: [list, watch]
";

/// One RBAC `PolicyRule` (resource rules only; `*` matches anything).
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Rule {
    #[serde(default)]
    pub api_groups: Vec<String>,
    #[serde(default)]
    pub resources: Vec<String>,
    #[serde(default)]
    pub verbs: Vec<String>,
}

impl Rule {
    fn allows(&self, a: &Attributes) -> bool {
        let any = |list: &[String], v: &str| list.iter().any(|x| x == "*" || x == v);
        any(&self.verbs, &a.verb)
            && any(&self.api_groups, &a.group)
            && any(&self.resources, &a.resource)
    }
}

/// The allow-list.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Authorizer {
    pub name: String,
    pub rules: Vec<Rule>,
}

#[derive(Deserialize)]
struct ClusterRole {
    #[serde(default)]
    metadata: Meta,
    #[serde(default)]
    rules: Vec<Rule>,
}

#[derive(Default, Deserialize)]
struct Meta {
    #[serde(default)]
    name: String,
}

impl Authorizer {
    /// The rules of a ClusterRole (or Role) manifest, YAML or JSON.
    pub fn from_role_yaml(text: &str) -> anyhow::Result<Authorizer> {
        let role: ClusterRole = serde_yaml::from_str(text)?;
        Ok(Authorizer {
            name: role.metadata.name,
            rules: role.rules,
        })
    }

    /// `system:node-proxier`.
    pub fn node_proxier() -> Authorizer {
        // The constant above is valid YAML (a unit test reads it).
        Self::from_role_yaml(SYSTEM_NODE_PROXIER).unwrap_or_default()
    }

    /// `None` when allowed; else the 403's message, as kube-apiserver writes it.
    pub fn check(&self, method: &str, path: &str, watch: bool) -> Option<String> {
        let a = Attributes::of(method, path, watch)?;
        if self.rules.iter().any(|r| r.allows(&a)) {
            return None;
        }
        let what = if a.group.is_empty() {
            a.resource.clone()
        } else {
            format!("{}.{}", a.resource, a.group)
        };
        let scope = match &a.namespace {
            Some(ns) => format!("in the namespace \"{ns}\""),
            None => "at the cluster scope".into(),
        };
        Some(format!(
            "{what} is forbidden: User \"system:anonymous\" cannot {} resource \"{}\" in API \
             group \"{}\" {scope} (allowed by {}: not this request)",
            a.verb, a.resource, a.group, self.name
        ))
    }
}

/// A resource request's RBAC attributes.
#[derive(Debug, PartialEq, Eq)]
pub struct Attributes {
    pub verb: String,
    pub group: String,
    pub resource: String,
    pub namespace: Option<String>,
}

impl Attributes {
    /// `None` for a non-resource path.
    pub fn of(method: &str, path: &str, watch: bool) -> Option<Attributes> {
        let segs: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
        let (group, rest) = match segs.as_slice() {
            ["api", _v, rest @ ..] if !rest.is_empty() => ("", rest),
            ["apis", g, _v, rest @ ..] if !rest.is_empty() => (*g, rest),
            _ => return None,
        };
        let (namespace, resource, name) = match rest {
            ["namespaces", ns, resource, tail @ ..] => {
                (Some(ns.to_string()), *resource, tail.first())
            }
            [resource, tail @ ..] => (None, *resource, tail.first()),
            [] => return None,
        };
        let verb = match (method, name.is_some()) {
            ("GET", true) => "get",
            ("GET", false) if watch => "watch",
            ("GET", false) => "list",
            ("POST", _) => "create",
            ("PUT", _) => "update",
            ("PATCH", _) => "patch",
            ("DELETE", true) => "delete",
            ("DELETE", false) => "deletecollection",
            _ => return None,
        };
        Some(Attributes {
            verb: verb.into(),
            group: group.into(),
            resource: resource.into(),
            namespace,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_proxier_allows_what_kube_proxy_does_and_nothing_else() {
        let a = Authorizer::node_proxier();
        assert_eq!(a.name, "system:node-proxier");
        assert_eq!(a.rules.len(), 4);
        for (m, p, w) in [
            ("GET", "/api/v1/services", false),
            ("GET", "/api/v1/services", true),
            ("GET", "/apis/discovery.k8s.io/v1/endpointslices", true),
            ("GET", "/api/v1/nodes", false),
            ("GET", "/api/v1/nodes/lab", false),
            (
                "POST",
                "/apis/events.k8s.io/v1/namespaces/lab/events",
                false,
            ),
            (
                "PATCH",
                "/apis/events.k8s.io/v1/namespaces/lab/events/e1",
                false,
            ),
            ("GET", "/version", false),
            ("GET", "/apis", false),
        ] {
            assert_eq!(a.check(m, p, w), None, "{m} {p}");
        }
        for (m, p) in [
            ("GET", "/api/v1/namespaces/lab/services/web"),
            ("GET", "/api/v1/pods"),
            (
                "GET",
                "/api/v1/namespaces/kube-system/configmaps/kube-proxy",
            ),
            ("DELETE", "/api/v1/namespaces/lab/services/web"),
            ("PATCH", "/api/v1/nodes/lab"),
            (
                "GET",
                "/apis/discovery.k8s.io/v1/namespaces/lab/endpointslices/web-1",
            ),
        ] {
            let msg = a.check(m, p, false).unwrap_or_default();
            assert!(msg.contains("is forbidden"), "{m} {p}: {msg:?}");
        }
    }
}
