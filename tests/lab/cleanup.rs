//! `kube-ipvs-bpf cleanup --kube-proxy` on a real kernel: the state a real kube-proxy v1.36
//! wrote (tests/fixtures/kube-proxy-v1.36: its iptables chains, ipsets, IPVS services and
//! kube-ipvs0 from ipvs mode, its nft tables from nftables mode) is recreated in a namespace
//! beside foreign state; the cleanup removes kube-proxy's and nothing else.

use lab::agent::agent_bin;
use lab::{Netns, ipvsadm, require_lab};

const IPTABLES: &str = include_str!("../fixtures/kube-proxy-v1.36/iptables-nft-save.txt");
const IPSETS: &str = include_str!("../fixtures/kube-proxy-v1.36/ipset.txt");
const IPVSADM: &str = include_str!("../fixtures/kube-proxy-v1.36/ipvsadm.txt");
const KUBE_IPVS0: &str = include_str!("../fixtures/kube-proxy-v1.36/kube-ipvs0.txt");
const NFT: &str = include_str!("../fixtures/kube-proxy-v1.36/nft-ruleset.txt");

/// `ipset list` output → `ipset restore` input.
fn ipset_restore(list: &str) -> String {
    let mut out = String::new();
    let (mut name, mut ty) = (String::new(), String::new());
    let mut members = false;
    for line in list.lines() {
        if let Some(n) = line.strip_prefix("Name: ") {
            name = n.trim().to_string();
            members = false;
        } else if let Some(t) = line.strip_prefix("Type: ") {
            ty = t.trim().to_string();
        } else if let Some(h) = line.strip_prefix("Header: ") {
            let mut opts = Vec::new();
            let mut it = h.split_whitespace();
            while let Some(k) = it.next() {
                let v = it.next().unwrap_or("");
                if !matches!(k, "initval" | "bucketsize") {
                    opts.push(format!("{k} {v}"));
                }
            }
            out.push_str(&format!("create {name} {ty} {}\n", opts.join(" ")));
        } else if line.starts_with("Members:") {
            members = true;
        } else if members && !line.trim().is_empty() {
            out.push_str(&format!("add {name} {}\n", line.trim()));
        }
    }
    out
}

/// The `ipvsadm -Ln` section → `ipvsadm -R` input.
fn ipvsadm_restore(dump: &str) -> String {
    let first = dump.split("\n# ").next().unwrap_or(dump);
    let mut out = String::new();
    for s in ipvsadm::parse_list(first) {
        let (Some(a), flag) = (s.address, if s.proto == "UDP" { "-u" } else { "-t" }) else {
            continue;
        };
        let vip = std::net::SocketAddr::new(a, s.port);
        out.push_str(&format!("-A {flag} {vip} -s {}", s.scheduler));
        if let Some(p) = s.persistent {
            out.push_str(&format!(" -p {p}"));
        }
        out.push('\n');
        for d in &s.destinations {
            let Some(da) = d.address else { continue };
            out.push_str(&format!(
                "-a {flag} {vip} -r {} -m -w {}\n",
                std::net::SocketAddr::new(da, d.port),
                d.weight
            ));
        }
    }
    out
}

#[test]
fn cleanup_kube_proxy_removes_kube_proxys_state_and_nothing_else() {
    require_lab();
    let ns = Netns::new("cleanup");
    // The node's addresses as kube-proxy saw them (NodePorts were on each).
    ns.sh("ip link add eth0 type dummy && ip link set eth0 up");
    for a in [
        "10.0.2.15/24",
        "10.10.1.1/24",
        "10.10.3.1/24",
        "10.244.1.1/24",
    ] {
        ns.sh(&format!("ip addr add {a} dev eth0"));
    }
    // kube-proxy's state: ipsets first (its iptables rules refer to them).
    std::fs::write("/tmp/cleanup-ipsets", ipset_restore(IPSETS)).unwrap();
    ns.sh("ipset restore -f /tmp/cleanup-ipsets");
    let (v4, v6) = IPTABLES
        .split_once("# ip6tables-nft-save")
        .expect("two families");
    std::fs::write("/tmp/cleanup-ip4", v4).unwrap();
    std::fs::write("/tmp/cleanup-ip6", format!("# {v6}")).unwrap();
    ns.sh(
        "iptables-nft-restore -c < /tmp/cleanup-ip4 && ip6tables-nft-restore -c < /tmp/cleanup-ip6",
    );
    std::fs::write("/tmp/cleanup-nft", NFT).unwrap();
    ns.sh("nft -f /tmp/cleanup-nft");
    ns.sh("ip link add kube-ipvs0 type dummy");
    for line in KUBE_IPVS0.lines() {
        if let Some(a) = line.trim().strip_prefix("inet ") {
            ns.sh(&format!(
                "ip addr add {} dev kube-ipvs0",
                a.split_whitespace().next().unwrap()
            ));
        }
    }
    std::fs::write("/tmp/cleanup-ipvs", ipvsadm_restore(IPVSADM)).unwrap();
    ns.sh("ipvsadm -R < /tmp/cleanup-ipvs");

    // Foreign state that must survive.
    ns.sh("iptables -N FOREIGN && iptables -A FOREIGN -j ACCEPT && iptables -I INPUT -p tcp --dport 22 -j FOREIGN");
    ns.sh("iptables -t nat -A POSTROUTING -s 172.17.0.0/16 -j MASQUERADE");
    ns.sh("nft add table inet foreign && nft add chain inet foreign input '{ type filter hook input priority 10; }'");
    ns.sh("ipset create FOREIGN-SET hash:ip && ipset add FOREIGN-SET 192.0.2.1");
    ns.sh("ipvsadm -A -f 77 -s rr && ipvsadm -A -t 192.0.2.10:80 -s rr && ipvsadm -a -t 192.0.2.10:80 -r 10.9.9.9:80 -m");
    ns.sh("ip link add other0 type dummy");

    let before = ipvsadm::view(|c| ns.sh(c));
    assert!(
        before.len() > 10,
        "kube-proxy's IPVS state was not recreated: {before:?}"
    );
    assert!(ns.sh("ipset list -n").contains("KUBE-CLUSTER-IP"));
    assert!(ns.sh("nft list tables").contains("kube-proxy"));

    let report = ns.sh(&format!("{} cleanup --kube-proxy", agent_bin()));

    let ipt = ns.sh("iptables-nft-save && ip6tables-nft-save");
    for chain in [
        "KUBE-SERVICES",
        "KUBE-POSTROUTING",
        "KUBE-MARK-MASQ",
        "KUBE-NODE-PORT",
        "KUBE-FORWARD",
        "KUBE-IPVS-FILTER",
        "KUBE-LOAD-BALANCER",
        "KUBE-PROXY-FIREWALL",
    ] {
        assert!(!ipt.contains(chain), "{chain} left:\n{ipt}\n{report}");
    }
    assert!(
        ipt.contains("-A FOREIGN -j ACCEPT") && ipt.contains("--dport 22 -j FOREIGN"),
        "foreign rules removed:\n{ipt}"
    );
    assert!(
        ipt.contains("-s 172.17.0.0/16 -j MASQUERADE"),
        "foreign NAT rule removed:\n{ipt}"
    );
    let sets = ns.sh("ipset list -n");
    assert!(
        !sets.lines().any(|l| l.starts_with("KUBE-")),
        "kube-proxy ipsets left:\n{sets}"
    );
    assert!(sets.contains("FOREIGN-SET"));
    let tables = ns.sh("nft list tables");
    assert!(!tables.contains("kube-proxy"), "{tables}");
    assert!(tables.contains("inet foreign"), "{tables}");
    let after = ipvsadm::view(|c| ns.sh(c));
    let keys: Vec<String> = after.iter().map(|s| s.key()).collect();
    assert_eq!(
        keys.len(),
        2,
        "only the foreign IPVS services remain: {keys:?}\n{report}"
    );
    assert!(
        keys.contains(&"FWM 77".to_string()) && keys.contains(&"TCP 192.0.2.10:80".to_string())
    );
    assert!(
        !ns.sh_status("ip link show kube-ipvs0").0.eq(&0),
        "kube-ipvs0 left"
    );
    assert!(
        ns.sh_status("ip link show other0").0 == 0,
        "a foreign interface was removed"
    );
    // Idempotent: a second run removes nothing and succeeds.
    ns.sh(&format!("{} cleanup --kube-proxy", agent_bin()));
}

#[test]
fn ipset_and_ipvsadm_fixtures_convert() {
    require_lab();
    let r = ipset_restore(IPSETS);
    assert!(
        r.contains("create KUBE-CLUSTER-IP hash:ip,port family inet hashsize 1024 maxelem 65536")
    );
    assert!(ipvsadm_restore(IPVSADM).contains("-A -t 10.96.10.13:80 -s rr -p 10800"));
}
