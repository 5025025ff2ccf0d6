//! The agent's own nf_tables table, `inet kube-ipvs-bpf`: the native `notrack` of service
//! traffic, written over nfnetlink (`crate::cleanup::nfnetlink`) in one batch, checked by
//! dumping its chains and rules, and replaced whole when anything is missing.
//!
//! ```text
//! table inet kube-ipvs-bpf {
//!     chain prerouting {
//!         type filter hook prerouting priority raw; policy accept;
//!         meta mark & SVC == SVC notrack comment "kube-ipvs-bpf: service traffic is not tracked"
//!     }
//! }
//! ```
//!
//! The rule runs native nf_tables expressions (`meta`, `bitwise`, `cmp`, `notrack`) where the
//! iptables rule it replaces (`-m mark … -j CT --notrack`) ran `xt_CT` through nft_compat on an
//! iptables-nft node. One `inet` table covers IPv4 and IPv6. There is no output chain:
//! the packets IPVS forwards through LOCAL_OUT were untracked here already, and host-originated
//! service traffic needs the `xt_svc` program, which only iptables can run (`-m bpf`): that
//! rule stays in iptables raw OUTPUT (`datapath::rules`). A kernel without nf_tables keeps the
//! iptables notrack rule instead ([`crate::datapath::rules::Notrack::Iptables`]).

use crate::cleanup::nfnetlink::{
    BaseChain, NF_INET_PRE_ROUTING, NF_IP_PRI_RAW, NFPROTO_INET, NFT_META_MARK, NFT_REG_1, Nfnl,
    NfnlError, NftChainInfo, NftRule, NftRuleInfo, NftTable, nft_bitwise_and, nft_cmp_eq,
    nft_meta_load, nft_notrack,
};

/// The table's name (family `inet`).
pub const TABLE: &str = "kube-ipvs-bpf";
/// The base chain at the prerouting hook.
pub const CHAIN_PREROUTING: &str = "prerouting";
/// The comment of the notrack rule (how a check recognizes it).
pub const COMMENT: &str = "kube-ipvs-bpf: service traffic is not tracked";
/// The expressions of the notrack rule, in order, as a dump names them.
const EXPRS: [&str; 4] = ["meta", "bitwise", "cmp", "notrack"];

/// The table as [`crate::cleanup`] sees it.
pub fn table() -> NftTable {
    NftTable {
        family: NFPROTO_INET,
        name: TABLE.to_owned(),
    }
}

/// The table's base chains.
pub fn chains() -> Vec<BaseChain> {
    vec![BaseChain {
        name: CHAIN_PREROUTING.to_owned(),
        hook: NF_INET_PRE_ROUTING,
        priority: NF_IP_PRI_RAW,
    }]
}

/// `meta mark & SVC == SVC notrack` (the mark as the kernel's register holds it: host order).
pub fn rules(mark_svc: u32) -> Vec<NftRule> {
    let mark = mark_svc.to_ne_bytes();
    let mut exprs = nft_meta_load(NFT_META_MARK, NFT_REG_1);
    exprs.extend(nft_bitwise_and(NFT_REG_1, &mark));
    exprs.extend(nft_cmp_eq(NFT_REG_1, &mark));
    exprs.extend(nft_notrack());
    vec![NftRule {
        chain: CHAIN_PREROUTING.to_owned(),
        exprs,
        comment: COMMENT.to_owned(),
    }]
}

/// Creates the table or replaces it whole (idempotent: the same table after any number of
/// calls).
pub fn apply(nl: &mut Nfnl, mark_svc: u32) -> Result<(), NfnlError> {
    nl.nft_replace_table(NFPROTO_INET, TABLE, &chains(), &rules(mark_svc))
}

/// What the kernel's view (the `inet` chains and our table's rules) lacks of the table: a chain
/// (or its hook), or the rule (known by its comment and expressions). Empty: all as wanted.
pub fn missing(chains_seen: &[NftChainInfo], rules_seen: &[NftRuleInfo]) -> Vec<String> {
    let mut out = Vec::new();
    let ours: Vec<&NftChainInfo> = chains_seen
        .iter()
        .filter(|c| c.family == NFPROTO_INET && c.table == TABLE)
        .collect();
    for want in chains() {
        match ours.iter().find(|c| c.name == want.name) {
            None => out.push(format!("chain inet {TABLE} {} missing", want.name)),
            Some(c) if c.hook != Some((want.hook, want.priority)) => out.push(format!(
                "chain inet {TABLE} {} hooked at {:?}, want hook {} priority {}",
                want.name, c.hook, want.hook, want.priority
            )),
            Some(_) => {}
        }
    }
    for want in rules(0) {
        let found = rules_seen.iter().any(|r| {
            r.table == TABLE
                && r.chain == want.chain
                && r.comment.as_deref() == Some(want.comment.as_str())
                && r.exprs == EXPRS
        });
        if !found {
            out.push(format!(
                "rule \"{}\" missing from inet {TABLE} {}",
                want.comment, want.chain
            ));
        }
    }
    out
}

/// Checks the table against the kernel's and replaces it when anything is missing; returns what
/// was missing (empty: nothing was written).
pub fn repair(mark_svc: u32) -> Result<Vec<String>, NfnlError> {
    let mut nl = Nfnl::open()?;
    let chains_seen = nl.nft_chains(NFPROTO_INET)?;
    let rules_seen = nl.nft_rules(NFPROTO_INET, TABLE)?;
    let found = missing(&chains_seen, &rules_seen);
    if !found.is_empty() {
        apply(&mut nl, mark_svc)?;
    }
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cleanup::nfnetlink::{
        NF_INET_LOCAL_OUT, nft_replace_table_batch, parse_messages, parse_nft_rules,
    };

    /// The attributes (after `nfgenmsg`) of the `NFT_MSG_NEWRULE` that nft 1.0.6 (Debian 12,
    /// x86_64) sends for `nft add rule inet kube-ipvs-bpf prerouting meta mark & 0x00200000 ==
    /// 0x00200000 notrack comment "kube-ipvs-bpf: service traffic is not tracked"`, captured with
    /// `strace -e trace=sendmsg -xx`: table, chain, the four expressions (`nft --debug=netlink`
    /// prints `[ meta load mark => reg 1 ] [ bitwise reg 1 = ( reg 1 & 0x00200000 ) ^
    /// 0x00000000 ] [ cmp eq reg 1 0x00200000 ] [ notrack ]`), the userdata comment.
    #[cfg(target_endian = "little")]
    const NFT_RULE_ATTRS_HEX: &str = concat!(
        "120001006b7562652d697076732d6270660000000f000200707265726f7574696e670000b00004802400018009000100",
        "6d6574610000000014000280080002000000000308000100000000014c0001800c00010062697477697365003c000280",
        "08000100000000010800020000000001080006000000000008000300000000040c00048008000100000020000c000580",
        "08000100000000002c00018008000100636d700020000280080001000000000108000200000000000c00038008000100",
        "00002000100001800c0001006e6f747261636b0034000700002e6b7562652d697076732d6270663a2073657276696365",
        "2074726166666963206973206e6f7420747261636b656400",
    );

    fn unhex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    #[cfg(target_endian = "little")]
    #[test]
    fn the_rule_is_byte_for_byte_what_nft_sends() {
        let (batch, count) =
            nft_replace_table_batch(1, NFPROTO_INET, TABLE, &chains(), &rules(0x0020_0000));
        // begin, table, delete, table, one chain, one rule, end.
        assert_eq!(count, 7);
        let msgs = parse_messages(&batch).unwrap();
        assert_eq!(msgs.len(), 7);
        let rule = &msgs[5];
        assert_eq!(rule.ty, 0x0a06, "NFT_MSG_NEWRULE");
        assert_eq!(rule.payload[4..], unhex(NFT_RULE_ATTRS_HEX));
    }

    #[cfg(target_endian = "little")]
    #[test]
    fn the_base_chain_is_hooked_at_prerouting_with_raw_priority() {
        let (batch, _) =
            nft_replace_table_batch(1, NFPROTO_INET, TABLE, &chains(), &rules(0x0020_0000));
        let msgs = parse_messages(&batch).unwrap();
        let chain = &msgs[4];
        assert_eq!(chain.ty, 0x0a03, "NFT_MSG_NEWCHAIN");
        // NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE.
        assert_eq!(chain.flags, 0x0405);
        assert_eq!(chain.payload[0], NFPROTO_INET);
        // What nft 1.0.6 sends for `nft add chain inet kube-ipvs-bpf prerouting { type filter
        // hook prerouting priority raw; policy accept; }` (strace -xx), attribute by attribute.
        let mut want = Vec::new();
        // NFTA_CHAIN_TABLE, NFTA_CHAIN_NAME.
        want.extend([18, 0, 1, 0]);
        want.extend(b"kube-ipvs-bpf\0\0\0");
        want.extend([15, 0, 3, 0]);
        want.extend(b"prerouting\0\0");
        // NFTA_CHAIN_TYPE "filter", NFTA_CHAIN_POLICY NF_ACCEPT (big-endian).
        want.extend([11, 0, 7, 0]);
        want.extend(b"filter\0\0");
        want.extend([8, 0, 5, 0, 0, 0, 0, 1]);
        // NFTA_CHAIN_HOOK | NLA_F_NESTED { HOOKNUM 0, PRIORITY -300 }, both big-endian.
        want.extend([20, 0, 4, 0x80, 8, 0, 1, 0, 0, 0, 0, 0, 8, 0, 2, 0]);
        want.extend([0xff, 0xff, 0xfe, 0xd4]);
        assert_eq!(&chain.payload[4..], &want[..]);
        // Table messages: add (create), delete, add: create-or-replace in one transaction.
        assert_eq!(
            msgs[1..4].iter().map(|m| m.ty).collect::<Vec<_>>(),
            [0x0a00, 0x0a02, 0x0a00]
        );
        assert_eq!(msgs[0].ty, 0x10);
        assert_eq!(msgs[6].ty, 0x11);
    }

    fn seen(hook: u32) -> Vec<NftChainInfo> {
        vec![NftChainInfo {
            family: NFPROTO_INET,
            table: TABLE.to_owned(),
            name: CHAIN_PREROUTING.to_owned(),
            hook: Some((hook, NF_IP_PRI_RAW)),
        }]
    }

    /// The rule as a dump of the kernel shows it (built from what apply sends).
    fn rule_seen() -> Vec<NftRuleInfo> {
        let (batch, _) =
            nft_replace_table_batch(1, NFPROTO_INET, TABLE, &chains(), &rules(0x0020_0000));
        parse_nft_rules(&parse_messages(&batch).unwrap())
    }

    #[test]
    fn missing_names_the_absent_chain_rule_or_wrong_hook() {
        let rule = rule_seen();
        assert_eq!(rule.len(), 1);
        assert_eq!(rule[0].exprs, EXPRS);
        assert_eq!(rule[0].comment.as_deref(), Some(COMMENT));
        assert_eq!(
            missing(&seen(NF_INET_PRE_ROUTING), &rule),
            Vec::<String>::new()
        );
        assert_eq!(
            missing(&[], &[]),
            vec![
                "chain inet kube-ipvs-bpf prerouting missing".to_owned(),
                format!("rule \"{COMMENT}\" missing from inet kube-ipvs-bpf prerouting"),
            ]
        );
        assert_eq!(missing(&seen(NF_INET_LOCAL_OUT), &rule).len(), 1);
        // Same name and comment, different expressions (someone replaced it): rewritten.
        let mut other = rule.clone();
        other[0].exprs.pop();
        assert_eq!(missing(&seen(NF_INET_PRE_ROUTING), &other).len(), 1);
    }
}
