//! The state file: after each sync the agent writes what it programmed (virtual services with
//! the Kubernetes Service each came from, bound addresses, rejected objects) so `inspect` can
//! name what it finds in the kernel without talking to the agent.

use std::path::{Path, PathBuf};

use anyhow::Context;
use serde::{Deserialize, Serialize};

use crate::model::{DesiredState, NodeInfo};

/// Default directory of the state file (tmpfs: it goes with the IPVS state at reboot).
pub const DEFAULT_STATE_DIR: &str = "/run/kube-ipvs-bpf";
const FILE: &str = "state.json";

/// One programmed virtual service, as recorded.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RecordedService {
    pub service: String,
    pub port_name: String,
    pub kind: String,
    pub protocol: String,
    pub address: std::net::IpAddr,
    pub port: u16,
    pub snat: bool,
}

/// The recorded state.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Recorded {
    pub node: String,
    pub virtual_services: Vec<RecordedService>,
    pub bound_addresses: Vec<std::net::IpAddr>,
    pub rejected: Vec<(String, String)>,
    /// Written by an agent that marks its IPVS services
    /// ([`crate::reconcile::ipvs::AGENT_MARK`]); absent (false) in older state files, whose
    /// virtual services the next agent adopts.
    #[serde(default)]
    pub ipvs_mark: bool,
}

pub fn path(dir: &Path) -> PathBuf {
    dir.join(FILE)
}

/// Writes the state atomically (a temporary file renamed over the old one).
pub fn write(dir: &Path, node: &NodeInfo, desired: &DesiredState) -> anyhow::Result<()> {
    let rec = Recorded {
        node: node.name.clone(),
        virtual_services: desired
            .virtual_services
            .iter()
            .map(|v| RecordedService {
                service: v.service.to_string(),
                port_name: v.port_name.clone(),
                kind: v.kind.to_string(),
                protocol: v.protocol.to_string(),
                address: v.address,
                port: v.port,
                snat: v.snat,
            })
            .collect(),
        bound_addresses: desired.bound_addresses.iter().copied().collect(),
        rejected: desired
            .rejected
            .iter()
            .map(|r| (r.object.clone(), r.reason.clone()))
            .collect(),
        ipvs_mark: true,
    };
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let tmp = dir.join(format!(".{FILE}.tmp"));
    std::fs::write(&tmp, serde_json::to_vec(&rec)?)
        .with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path(dir))
        .with_context(|| format!("renaming into {}", path(dir).display()))?;
    Ok(())
}

/// Reads the state file; a missing file is an empty state.
pub fn read(dir: &Path) -> anyhow::Result<Recorded> {
    let p = path(dir);
    match std::fs::read(&p) {
        Ok(bytes) => {
            serde_json::from_slice(&bytes).with_context(|| format!("parsing {}", p.display()))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Recorded::default()),
        Err(e) => Err(e).with_context(|| format!("reading {}", p.display())),
    }
}
