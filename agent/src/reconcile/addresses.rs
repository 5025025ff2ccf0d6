//! Address reconciler: the service addresses bound on `kube-ipvs0` (created if missing), added
//! and removed one request per address, [`crate::node::ADDRESS_BATCH`] requests per system
//! call (a first sync binds one address per Service, 10,000 and more). Every address on
//! `kube-ipvs0` is this agent's.

use std::collections::BTreeSet;
use std::net::IpAddr;

use crate::node::{AddressChange, NodeError, Rtnl};

/// The changes that turn `observed` into `desired`.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct AddressPlan {
    pub add: Vec<IpAddr>,
    pub remove: Vec<IpAddr>,
}

impl AddressPlan {
    pub fn is_empty(&self) -> bool {
        self.add.is_empty() && self.remove.is_empty()
    }
}

pub fn plan(desired: &BTreeSet<IpAddr>, observed: &BTreeSet<IpAddr>) -> AddressPlan {
    AddressPlan {
        add: desired.difference(observed).copied().collect(),
        remove: observed.difference(desired).copied().collect(),
    }
}

/// Applies `plan` on interface `index`, updating `observed`; returns the failures (each
/// address is independent of the others).
pub fn apply(
    rtnl: &Rtnl,
    index: u32,
    plan: &AddressPlan,
    observed: &mut BTreeSet<IpAddr>,
) -> Vec<NodeError> {
    let mut failures = Vec::new();
    for (a, r) in rtnl.change_addresses(index, AddressChange::Add, &plan.add) {
        match r {
            Ok(()) => {
                observed.insert(a);
            }
            Err(e) => failures.push(e),
        }
    }
    for (a, r) in rtnl.change_addresses(index, AddressChange::Remove, &plan.remove) {
        match r {
            Ok(()) => {
                observed.remove(&a);
            }
            Err(e) => failures.push(e),
        }
    }
    failures
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plan_adds_missing_and_removes_extra_addresses() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let desired = [ip("10.96.0.1"), ip("fd00::1")].into_iter().collect();
        let observed = [ip("10.96.0.1"), ip("10.96.0.9")].into_iter().collect();
        assert_eq!(
            plan(&desired, &observed),
            AddressPlan {
                add: vec![ip("fd00::1")],
                remove: vec![ip("10.96.0.9")]
            }
        );
        assert!(plan(&desired, &desired).is_empty());
    }
}
