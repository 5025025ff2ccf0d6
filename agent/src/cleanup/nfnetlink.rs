//! The nfnetlink conversations the agent needs, without shelling out: nf_tables tables (list,
//! and delete in a one-message batch), the agent's own notrack table (one batch replacing it,
//! and dumps of chains and rules to check it: `crate::datapath::notrack`), the ruleset's
//! generation (which every nf_tables transaction bumps: the node check reads it to skip
//! re-reading rules nobody changed) and ipset sets (list
//! names, destroy one). This module owns the message layouts (pure builders and parsers,
//! byte-tested) and a small blocking socket ([`Nfnl`]) that speaks them in the network namespace
//! of the calling thread.
//!
//! Layouts (all from the kernel's uapi headers):
//! - `struct nlmsghdr` (16 bytes, host order) + `struct nfgenmsg` (`nfgen_family` u8, `version`
//!   u8 = `NFNETLINK_V0`, `res_id` u16 big-endian) + attributes (`struct nlattr`, 4-byte
//!   aligned);
//! - message type = subsystem << 8 | command: `NFNL_SUBSYS_NFTABLES` = 10, `NFNL_SUBSYS_IPSET` = 6;
//! - nf_tables changes go in a batch: `NFNL_MSG_BATCH_BEGIN` (16) and `NFNL_MSG_BATCH_END` (17)
//!   with `res_id` = `NFNL_SUBSYS_NFTABLES`, around `NFT_MSG_DELTABLE` (2) carrying
//!   `NFTA_TABLE_NAME` (1) and the table's family in `nfgen_family`;
//! - a base chain (`NFT_MSG_NEWCHAIN`, 3): `NFTA_CHAIN_TABLE` (1), `NFTA_CHAIN_NAME` (3),
//!   `NFTA_CHAIN_HOOK` (4, nested: `NFTA_HOOK_HOOKNUM` (1) and `NFTA_HOOK_PRIORITY` (2), both
//!   big-endian u32), `NFTA_CHAIN_POLICY` (5, big-endian `NF_ACCEPT` = 1), `NFTA_CHAIN_TYPE` (7,
//!   "filter"); a rule (`NFT_MSG_NEWRULE`, 6): `NFTA_RULE_TABLE` (1), `NFTA_RULE_CHAIN` (2),
//!   `NFTA_RULE_EXPRESSIONS` (4, a nested list of `NFTA_LIST_ELEM` (1), each `NFTA_EXPR_NAME`
//!   (1) and nested `NFTA_EXPR_DATA` (2)) and `NFTA_RULE_USERDATA` (7, where `nft` keeps a
//!   comment: type `NFTNL_UDATA_RULE_COMMENT` (0) u8, length u8, the NUL-terminated text).
//!   Nested attributes carry `NLA_F_NESTED` (0x8000), as libnftnl sends them;
//! - the ruleset's generation: `NFT_MSG_GETGEN` (16) is answered by `NFT_MSG_NEWGEN` (15)
//!   carrying `NFTA_GEN_ID` (1, big-endian u32), the counter each committed transaction bumps;
//! - ipset: `IPSET_CMD_LIST` (7) dumps sets (`IPSET_ATTR_FLAGS` with `IPSET_FLAG_LIST_SETNAME`
//!   asks for names only), `IPSET_CMD_DESTROY` (3) with `IPSET_ATTR_SETNAME` (2) destroys one;
//!   every request carries `IPSET_ATTR_PROTOCOL` (1) = 6, the oldest protocol, which every
//!   kernel since 2.6.39 accepts. A destroy without a name destroys *every* set: the builder
//!   refuses to make one.

use std::os::fd::AsFd;

use netlink_sys::{Socket, SocketAddr};

pub const NETLINK_NETFILTER: isize = 12;

pub const NLM_F_REQUEST: u16 = 0x1;
pub const NLM_F_ACK: u16 = 0x4;
pub const NLM_F_DUMP: u16 = 0x300;
pub const NLMSG_ERROR: u16 = 2;
pub const NLMSG_DONE: u16 = 3;
pub const NLA_F_NET_BYTEORDER: u16 = 1 << 14;
pub const NLA_F_NESTED: u16 = 1 << 15;
const NLA_TYPE_MASK: u16 = 0x3fff;

pub const NFNETLINK_V0: u8 = 0;
pub const NFNL_SUBSYS_IPSET: u8 = 6;
pub const NFNL_SUBSYS_NFTABLES: u8 = 10;
pub const NFNL_MSG_BATCH_BEGIN: u16 = 16;
pub const NFNL_MSG_BATCH_END: u16 = 17;

pub const NFT_MSG_NEWTABLE: u8 = 0;
pub const NFT_MSG_GETTABLE: u8 = 1;
pub const NFT_MSG_DELTABLE: u8 = 2;
pub const NFT_MSG_NEWCHAIN: u8 = 3;
pub const NFT_MSG_GETCHAIN: u8 = 4;
pub const NFT_MSG_NEWRULE: u8 = 6;
pub const NFT_MSG_GETRULE: u8 = 7;
pub const NFT_MSG_NEWGEN: u8 = 15;
pub const NFT_MSG_GETGEN: u8 = 16;
pub const NFTA_GEN_ID: u16 = 1;
pub const NFTA_TABLE_NAME: u16 = 1;
pub const NFTA_CHAIN_TABLE: u16 = 1;
pub const NFTA_CHAIN_NAME: u16 = 3;
pub const NFTA_CHAIN_HOOK: u16 = 4;
pub const NFTA_CHAIN_POLICY: u16 = 5;
pub const NFTA_CHAIN_TYPE: u16 = 7;
pub const NFTA_HOOK_HOOKNUM: u16 = 1;
pub const NFTA_HOOK_PRIORITY: u16 = 2;
pub const NFTA_RULE_TABLE: u16 = 1;
pub const NFTA_RULE_CHAIN: u16 = 2;
pub const NFTA_RULE_EXPRESSIONS: u16 = 4;
pub const NFTA_RULE_USERDATA: u16 = 7;
pub const NFTA_LIST_ELEM: u16 = 1;
pub const NFTA_EXPR_NAME: u16 = 1;
pub const NFTA_EXPR_DATA: u16 = 2;
pub const NFTA_DATA_VALUE: u16 = 1;
pub const NFTA_META_DREG: u16 = 1;
pub const NFTA_META_KEY: u16 = 2;
pub const NFTA_BITWISE_SREG: u16 = 1;
pub const NFTA_BITWISE_DREG: u16 = 2;
pub const NFTA_BITWISE_LEN: u16 = 3;
pub const NFTA_BITWISE_MASK: u16 = 4;
pub const NFTA_BITWISE_XOR: u16 = 5;
pub const NFTA_BITWISE_OP: u16 = 6;
/// `NFT_BITWISE_BOOL`: `(reg & mask) ^ xor`.
pub const NFT_BITWISE_BOOL: u32 = 0;
pub const NFTA_CMP_SREG: u16 = 1;
pub const NFTA_CMP_OP: u16 = 2;
pub const NFTA_CMP_DATA: u16 = 3;
pub const NFT_META_MARK: u32 = 3;
pub const NFT_CMP_EQ: u32 = 0;
/// `NFT_REG_1`: the 16-byte register `nft` loads a meta key into.
pub const NFT_REG_1: u32 = 1;
pub const NF_ACCEPT: u32 = 1;
pub const NF_INET_PRE_ROUTING: u32 = 0;
pub const NF_INET_LOCAL_OUT: u32 = 3;
/// `NF_IP_PRI_RAW`: the priority of the raw table (`priority raw` in `nft`).
pub const NF_IP_PRI_RAW: i32 = -300;
/// `NFTNL_UDATA_RULE_COMMENT`: a rule comment in `NFTA_RULE_USERDATA`.
pub const NFTNL_UDATA_RULE_COMMENT: u8 = 0;
pub const NLM_F_CREATE: u16 = 0x400;
pub const NLM_F_APPEND: u16 = 0x800;

pub const NFPROTO_UNSPEC: u8 = 0;
pub const NFPROTO_INET: u8 = 1;
pub const NFPROTO_IPV4: u8 = 2;
pub const NFPROTO_ARP: u8 = 3;
pub const NFPROTO_NETDEV: u8 = 5;
pub const NFPROTO_BRIDGE: u8 = 7;
pub const NFPROTO_IPV6: u8 = 10;

pub const IPSET_CMD_DESTROY: u8 = 3;
pub const IPSET_CMD_LIST: u8 = 7;
pub const IPSET_ATTR_PROTOCOL: u16 = 1;
pub const IPSET_ATTR_SETNAME: u16 = 2;
pub const IPSET_ATTR_FLAGS: u16 = 6;
pub const IPSET_PROTOCOL: u8 = 6;
pub const IPSET_FLAG_LIST_SETNAME: u32 = 1 << 1;
/// `IPSET_MAXNAMELEN`, including the terminating NUL.
pub const IPSET_MAXNAMELEN: usize = 32;
/// `IPSET_ERR_BUSY`: the set is referenced (by an iptables rule or another set).
pub const IPSET_ERR_BUSY: i32 = 4100;

/// An nfnetlink failure.
#[derive(Debug, thiserror::Error)]
pub enum NfnlError {
    #[error("netlink socket: {0}")]
    Io(#[from] std::io::Error),
    /// The kernel refused the request (`errno` is positive).
    #[error("{what}: {}", describe(*errno))]
    Kernel { what: String, errno: i32 },
    #[error("malformed netlink reply: {0}")]
    Malformed(&'static str),
    #[error("invalid ipset name {0:?} (1 to 31 bytes)")]
    BadSetName(String),
}

fn describe(errno: i32) -> String {
    match errno {
        IPSET_ERR_BUSY => "set is in use (referenced by a rule or another set)".to_owned(),
        e if e > 4096 => format!("ipset error {e}"),
        e => std::io::Error::from_raw_os_error(e).to_string(),
    }
}

/// One netlink attribute, padded to 4 bytes.
pub fn attr(ty: u16, payload: &[u8]) -> Vec<u8> {
    let len = 4 + payload.len();
    let mut b = Vec::with_capacity(len.div_ceil(4) * 4);
    b.extend_from_slice(&(len as u16).to_ne_bytes());
    b.extend_from_slice(&ty.to_ne_bytes());
    b.extend_from_slice(payload);
    b.resize(len.div_ceil(4) * 4, 0);
    b
}

/// A NUL-terminated string attribute.
pub fn attr_str(ty: u16, s: &str) -> Vec<u8> {
    let mut p = s.as_bytes().to_vec();
    p.push(0);
    attr(ty, &p)
}

/// One nfnetlink message: header, `nfgenmsg`, attributes.
pub fn message(ty: u16, flags: u16, seq: u32, family: u8, res_id: u16, attrs: &[u8]) -> Vec<u8> {
    let len = 16 + 4 + attrs.len();
    let mut b = Vec::with_capacity(len);
    b.extend_from_slice(&(len as u32).to_ne_bytes());
    b.extend_from_slice(&ty.to_ne_bytes());
    b.extend_from_slice(&flags.to_ne_bytes());
    b.extend_from_slice(&seq.to_ne_bytes());
    b.extend_from_slice(&0u32.to_ne_bytes());
    b.push(family);
    b.push(NFNETLINK_V0);
    b.extend_from_slice(&res_id.to_be_bytes());
    b.extend_from_slice(attrs);
    b
}

fn nft_type(cmd: u8) -> u16 {
    u16::from(NFNL_SUBSYS_NFTABLES) << 8 | u16::from(cmd)
}

fn ipset_type(cmd: u8) -> u16 {
    u16::from(NFNL_SUBSYS_IPSET) << 8 | u16::from(cmd)
}

/// Dump of every nf_tables table of every family.
pub fn nft_list_tables(seq: u32) -> Vec<u8> {
    message(
        nft_type(NFT_MSG_GETTABLE),
        NLM_F_REQUEST | NLM_F_DUMP,
        seq,
        NFPROTO_UNSPEC,
        0,
        &[],
    )
}

/// A batch deleting table `name` of `family`: begin (`seq`), delete (`seq + 1`, acknowledged),
/// end (`seq + 2`).
pub fn nft_delete_table_batch(seq: u32, family: u8, name: &str) -> Vec<u8> {
    let res_id = u16::from(NFNL_SUBSYS_NFTABLES);
    let mut b = message(
        NFNL_MSG_BATCH_BEGIN,
        NLM_F_REQUEST,
        seq,
        NFPROTO_UNSPEC,
        res_id,
        &[],
    );
    b.extend(message(
        nft_type(NFT_MSG_DELTABLE),
        NLM_F_REQUEST | NLM_F_ACK,
        seq.wrapping_add(1),
        family,
        0,
        &attr_str(NFTA_TABLE_NAME, name),
    ));
    b.extend(message(
        NFNL_MSG_BATCH_END,
        NLM_F_REQUEST,
        seq.wrapping_add(2),
        NFPROTO_UNSPEC,
        res_id,
        &[],
    ));
    b
}

/// A nested attribute (`NLA_F_NESTED` set).
pub fn attr_nested(ty: u16, inner: &[u8]) -> Vec<u8> {
    attr(ty | NLA_F_NESTED, inner)
}

/// A big-endian u32 attribute (nf_tables' integers).
pub fn attr_be32(ty: u16, v: u32) -> Vec<u8> {
    attr(ty, &v.to_be_bytes())
}

/// One expression of a rule: `NFTA_LIST_ELEM { NFTA_EXPR_NAME, NFTA_EXPR_DATA { data } }`
/// (no data attribute when `data` is empty, as for `notrack`).
pub fn nft_expr(name: &str, data: &[u8]) -> Vec<u8> {
    let mut e = attr_str(NFTA_EXPR_NAME, name);
    if !data.is_empty() {
        e.extend(attr_nested(NFTA_EXPR_DATA, data));
    }
    attr_nested(NFTA_LIST_ELEM, &e)
}

/// `[ meta load KEY => reg DREG ]`.
pub fn nft_meta_load(key: u32, dreg: u32) -> Vec<u8> {
    let mut d = attr_be32(NFTA_META_KEY, key);
    d.extend(attr_be32(NFTA_META_DREG, dreg));
    nft_expr("meta", &d)
}

/// `[ bitwise reg REG = ( reg REG & MASK ) ^ 0 ]` over `mask.len()` bytes. The operation
/// attribute (`NFT_BITWISE_BOOL`, kernel 5.6 on) is sent as nft 1.0 sends it; older kernels
/// ignore it and do the same.
pub fn nft_bitwise_and(reg: u32, mask: &[u8]) -> Vec<u8> {
    let mut d = attr_be32(NFTA_BITWISE_SREG, reg);
    d.extend(attr_be32(NFTA_BITWISE_DREG, reg));
    d.extend(attr_be32(NFTA_BITWISE_OP, NFT_BITWISE_BOOL));
    d.extend(attr_be32(NFTA_BITWISE_LEN, mask.len() as u32));
    d.extend(attr_nested(NFTA_BITWISE_MASK, &attr(NFTA_DATA_VALUE, mask)));
    d.extend(attr_nested(
        NFTA_BITWISE_XOR,
        &attr(NFTA_DATA_VALUE, &vec![0; mask.len()]),
    ));
    nft_expr("bitwise", &d)
}

/// `[ cmp eq reg REG VALUE ]`.
pub fn nft_cmp_eq(reg: u32, value: &[u8]) -> Vec<u8> {
    let mut d = attr_be32(NFTA_CMP_SREG, reg);
    d.extend(attr_be32(NFTA_CMP_OP, NFT_CMP_EQ));
    d.extend(attr_nested(NFTA_CMP_DATA, &attr(NFTA_DATA_VALUE, value)));
    nft_expr("cmp", &d)
}

/// `[ notrack ]`.
pub fn nft_notrack() -> Vec<u8> {
    nft_expr("notrack", &[])
}

/// `NFTA_RULE_USERDATA` holding a comment as `nft` writes one (`comment "..."` in `nft list`).
pub fn rule_comment_userdata(comment: &str) -> Vec<u8> {
    let mut text = comment.as_bytes().to_vec();
    text.push(0);
    let mut u = vec![NFTNL_UDATA_RULE_COMMENT, text.len() as u8];
    u.extend(text);
    u
}

/// The comment in a rule's `NFTA_RULE_USERDATA`, if it has one.
pub fn userdata_comment(mut u: &[u8]) -> Option<String> {
    while u.len() >= 2 {
        let (ty, len) = (u[0], u[1] as usize);
        let value = u.get(2..2 + len)?;
        if ty == NFTNL_UDATA_RULE_COMMENT {
            return Some(c_string(value));
        }
        u = &u[2 + len..];
    }
    None
}

/// A base chain of type filter with policy accept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BaseChain {
    pub name: String,
    /// `NF_INET_*`.
    pub hook: u32,
    pub priority: i32,
}

/// A rule: its chain, its expressions (the concatenated `NFTA_LIST_ELEM`s) and its comment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NftRule {
    pub chain: String,
    pub exprs: Vec<u8>,
    pub comment: String,
}

/// A batch that creates table `name` of `family` or replaces it whole (`add table`, `delete
/// table`, `add table`, its chains, its rules: one transaction, so packets see the old table or
/// the new one). Every message but begin and end asks for an acknowledgement; returns the
/// bytes and the number of messages (sequence numbers `seq..seq + count`).
pub fn nft_replace_table_batch(
    seq: u32,
    family: u8,
    name: &str,
    chains: &[BaseChain],
    rules: &[NftRule],
) -> (Vec<u8>, u32) {
    let res_id = u16::from(NFNL_SUBSYS_NFTABLES);
    let mut n = seq;
    let mut next = || {
        let s = n;
        n = n.wrapping_add(1);
        s
    };
    let table = attr_str(NFTA_TABLE_NAME, name);
    let mut b = message(
        NFNL_MSG_BATCH_BEGIN,
        NLM_F_REQUEST,
        next(),
        NFPROTO_UNSPEC,
        res_id,
        &[],
    );
    let ack = NLM_F_REQUEST | NLM_F_ACK;
    for (cmd, flags) in [
        (NFT_MSG_NEWTABLE, ack | NLM_F_CREATE),
        (NFT_MSG_DELTABLE, ack),
        (NFT_MSG_NEWTABLE, ack | NLM_F_CREATE),
    ] {
        b.extend(message(nft_type(cmd), flags, next(), family, 0, &table));
    }
    for c in chains {
        let mut a = attr_str(NFTA_CHAIN_TABLE, name);
        a.extend(attr_str(NFTA_CHAIN_NAME, &c.name));
        // In the order nft 1.0 sends them.
        a.extend(attr_str(NFTA_CHAIN_TYPE, "filter"));
        a.extend(attr_be32(NFTA_CHAIN_POLICY, NF_ACCEPT));
        let mut hook = attr_be32(NFTA_HOOK_HOOKNUM, c.hook);
        hook.extend(attr_be32(NFTA_HOOK_PRIORITY, c.priority as u32));
        a.extend(attr_nested(NFTA_CHAIN_HOOK, &hook));
        b.extend(message(
            nft_type(NFT_MSG_NEWCHAIN),
            ack | NLM_F_CREATE,
            next(),
            family,
            0,
            &a,
        ));
    }
    for r in rules {
        let mut a = attr_str(NFTA_RULE_TABLE, name);
        a.extend(attr_str(NFTA_RULE_CHAIN, &r.chain));
        a.extend(attr_nested(NFTA_RULE_EXPRESSIONS, &r.exprs));
        a.extend(attr(NFTA_RULE_USERDATA, &rule_comment_userdata(&r.comment)));
        b.extend(message(
            nft_type(NFT_MSG_NEWRULE),
            ack | NLM_F_CREATE | NLM_F_APPEND,
            next(),
            family,
            0,
            &a,
        ));
    }
    b.extend(message(
        NFNL_MSG_BATCH_END,
        NLM_F_REQUEST,
        next(),
        NFPROTO_UNSPEC,
        res_id,
        &[],
    ));
    (b, n.wrapping_sub(seq))
}

/// A request for the ruleset's generation (answered by one `NFT_MSG_NEWGEN`, then the
/// acknowledgement).
pub fn nft_get_generation(seq: u32) -> Vec<u8> {
    message(
        nft_type(NFT_MSG_GETGEN),
        NLM_F_REQUEST | NLM_F_ACK,
        seq,
        NFPROTO_UNSPEC,
        0,
        &[],
    )
}

/// The generation an `NFT_MSG_NEWGEN` reply carries.
pub fn parse_nft_generation(msgs: &[Received]) -> Option<u32> {
    msgs.iter()
        .filter(|m| m.ty == nft_type(NFT_MSG_NEWGEN))
        .find_map(|m| {
            parse_attrs(&m.payload)
                .into_iter()
                .find(|(ty, _)| *ty == NFTA_GEN_ID)
                .and_then(|(_, v)| Some(u32::from_be_bytes(v.get(..4)?.try_into().ok()?)))
        })
}

/// Dump of every chain of `family`.
pub fn nft_list_chains(seq: u32, family: u8) -> Vec<u8> {
    message(
        nft_type(NFT_MSG_GETCHAIN),
        NLM_F_REQUEST | NLM_F_DUMP,
        seq,
        family,
        0,
        &[],
    )
}

/// Dump of the rules of table `table` of `family`.
pub fn nft_list_rules(seq: u32, family: u8, table: &str) -> Vec<u8> {
    message(
        nft_type(NFT_MSG_GETRULE),
        NLM_F_REQUEST | NLM_F_DUMP,
        seq,
        family,
        0,
        &attr_str(NFTA_RULE_TABLE, table),
    )
}

/// Dump of every ipset's name.
pub fn ipset_list_names(seq: u32) -> Vec<u8> {
    let mut attrs = attr(IPSET_ATTR_PROTOCOL, &[IPSET_PROTOCOL]);
    attrs.extend(attr(
        IPSET_ATTR_FLAGS | NLA_F_NET_BYTEORDER,
        &IPSET_FLAG_LIST_SETNAME.to_be_bytes(),
    ));
    message(
        ipset_type(IPSET_CMD_LIST),
        NLM_F_REQUEST | NLM_F_DUMP,
        seq,
        NFPROTO_IPV4,
        0,
        &attrs,
    )
}

/// Destroys set `name` (which must be named: the kernel destroys every set otherwise).
pub fn ipset_destroy(seq: u32, name: &str) -> Result<Vec<u8>, NfnlError> {
    if name.is_empty() || name.len() >= IPSET_MAXNAMELEN || name.contains('\0') {
        return Err(NfnlError::BadSetName(name.to_owned()));
    }
    let mut attrs = attr(IPSET_ATTR_PROTOCOL, &[IPSET_PROTOCOL]);
    attrs.extend(attr_str(IPSET_ATTR_SETNAME, name));
    Ok(message(
        ipset_type(IPSET_CMD_DESTROY),
        NLM_F_REQUEST | NLM_F_ACK,
        seq,
        NFPROTO_IPV4,
        0,
        &attrs,
    ))
}

/// One received netlink message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Received {
    pub ty: u16,
    pub flags: u16,
    pub seq: u32,
    /// Everything after the 16-byte header.
    pub payload: Vec<u8>,
}

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_ne_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

/// Splits a receive buffer into messages.
pub fn parse_messages(mut buf: &[u8]) -> Result<Vec<Received>, NfnlError> {
    let mut out = Vec::new();
    while buf.len() >= 16 {
        let len = u32_at(buf, 0).ok_or(NfnlError::Malformed("header"))? as usize;
        if len < 16 || len > buf.len() {
            return Err(NfnlError::Malformed("message length"));
        }
        out.push(Received {
            ty: u16_at(buf, 4).ok_or(NfnlError::Malformed("header"))?,
            flags: u16_at(buf, 6).ok_or(NfnlError::Malformed("header"))?,
            seq: u32_at(buf, 8).ok_or(NfnlError::Malformed("header"))?,
            payload: buf[16..len].to_vec(),
        });
        buf = &buf[(len.div_ceil(4) * 4).min(buf.len())..];
    }
    Ok(out)
}

/// The attributes of an nfnetlink payload (after `nfgenmsg`): (type without flags, value).
pub fn parse_attrs(payload: &[u8]) -> Vec<(u16, &[u8])> {
    parse_nlattrs(payload.get(4..).unwrap_or(&[]))
}

/// A run of netlink attributes (a nested attribute's value): (type without flags, value).
pub fn parse_nlattrs(mut b: &[u8]) -> Vec<(u16, &[u8])> {
    let mut out = Vec::new();
    while b.len() >= 4 {
        let (Some(len), Some(ty)) = (u16_at(b, 0), u16_at(b, 2)) else {
            break;
        };
        let len = len as usize;
        if len < 4 || len > b.len() {
            break;
        }
        out.push((ty & NLA_TYPE_MASK, &b[4..len]));
        b = &b[(len.div_ceil(4) * 4).min(b.len())..];
    }
    out
}

fn c_string(b: &[u8]) -> String {
    let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
    String::from_utf8_lossy(&b[..end]).into_owned()
}

/// An nf_tables table: family (`NFPROTO_*`) and name.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct NftTable {
    pub family: u8,
    pub name: String,
}

impl NftTable {
    /// `nft`'s spelling of the family.
    pub fn family_name(&self) -> &'static str {
        match self.family {
            NFPROTO_INET => "inet",
            NFPROTO_IPV4 => "ip",
            NFPROTO_ARP => "arp",
            NFPROTO_NETDEV => "netdev",
            NFPROTO_BRIDGE => "bridge",
            NFPROTO_IPV6 => "ip6",
            _ => "unknown",
        }
    }
}

impl std::fmt::Display for NftTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.family_name(), self.name)
    }
}

/// The tables in a `NFT_MSG_GETTABLE` dump's replies.
pub fn parse_nft_tables(msgs: &[Received]) -> Vec<NftTable> {
    msgs.iter()
        .filter(|m| m.ty == nft_type(NFT_MSG_NEWTABLE))
        .filter_map(|m| {
            let family = *m.payload.first()?;
            let name = parse_attrs(&m.payload)
                .into_iter()
                .find(|(t, _)| *t == NFTA_TABLE_NAME)
                .map(|(_, v)| c_string(v))?;
            Some(NftTable { family, name })
        })
        .collect()
}

/// A chain as a `NFT_MSG_GETCHAIN` dump shows it: its table, name and hook (number and
/// priority; `None` for a regular chain).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NftChainInfo {
    pub family: u8,
    pub table: String,
    pub name: String,
    pub hook: Option<(u32, i32)>,
}

fn be32(v: &[u8]) -> Option<u32> {
    Some(u32::from_be_bytes(v.get(..4)?.try_into().ok()?))
}

fn attr_of<'a>(attrs: &[(u16, &'a [u8])], ty: u16) -> Option<&'a [u8]> {
    attrs.iter().find(|(t, _)| *t == ty).map(|(_, v)| *v)
}

/// The chains in a `NFT_MSG_GETCHAIN` dump's replies.
pub fn parse_nft_chains(msgs: &[Received]) -> Vec<NftChainInfo> {
    msgs.iter()
        .filter(|m| m.ty == nft_type(NFT_MSG_NEWCHAIN))
        .filter_map(|m| {
            let family = *m.payload.first()?;
            let attrs = parse_attrs(&m.payload);
            let hook = attr_of(&attrs, NFTA_CHAIN_HOOK).and_then(|h| {
                let h = parse_nlattrs(h);
                Some((
                    be32(attr_of(&h, NFTA_HOOK_HOOKNUM)?)?,
                    be32(attr_of(&h, NFTA_HOOK_PRIORITY)?)? as i32,
                ))
            });
            Some(NftChainInfo {
                family,
                table: c_string(attr_of(&attrs, NFTA_CHAIN_TABLE)?),
                name: c_string(attr_of(&attrs, NFTA_CHAIN_NAME)?),
                hook,
            })
        })
        .collect()
}

/// A rule as a `NFT_MSG_GETRULE` dump shows it: its table, chain, the names of its
/// expressions in order, and its comment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NftRuleInfo {
    pub table: String,
    pub chain: String,
    pub exprs: Vec<String>,
    pub comment: Option<String>,
}

/// The rules in a `NFT_MSG_GETRULE` dump's replies.
pub fn parse_nft_rules(msgs: &[Received]) -> Vec<NftRuleInfo> {
    msgs.iter()
        .filter(|m| m.ty == nft_type(NFT_MSG_NEWRULE))
        .filter_map(|m| {
            let attrs = parse_attrs(&m.payload);
            let exprs = attr_of(&attrs, NFTA_RULE_EXPRESSIONS)
                .map(|e| {
                    parse_nlattrs(e)
                        .into_iter()
                        .filter(|(t, _)| *t == NFTA_LIST_ELEM)
                        .filter_map(|(_, el)| {
                            attr_of(&parse_nlattrs(el), NFTA_EXPR_NAME).map(c_string)
                        })
                        .collect()
                })
                .unwrap_or_default();
            Some(NftRuleInfo {
                table: c_string(attr_of(&attrs, NFTA_RULE_TABLE)?),
                chain: c_string(attr_of(&attrs, NFTA_RULE_CHAIN)?),
                exprs,
                comment: attr_of(&attrs, NFTA_RULE_USERDATA).and_then(userdata_comment),
            })
        })
        .collect()
}

/// The set names in an `IPSET_CMD_LIST` dump's replies.
pub fn parse_ipset_names(msgs: &[Received]) -> Vec<String> {
    msgs.iter()
        .filter(|m| m.ty == ipset_type(IPSET_CMD_LIST))
        .filter_map(|m| {
            parse_attrs(&m.payload)
                .into_iter()
                .find(|(t, _)| *t == IPSET_ATTR_SETNAME)
                .map(|(_, v)| c_string(v))
        })
        .collect()
}

/// The error code of an `NLMSG_ERROR` (0 is an acknowledgement), as a positive errno.
fn error_code(m: &Received) -> Option<i32> {
    let raw = i32::from_ne_bytes(m.payload.get(0..4)?.try_into().ok()?);
    Some(-raw)
}

/// A blocking `NETLINK_NETFILTER` socket in the calling thread's network namespace.
pub struct Nfnl {
    socket: Socket,
    seq: u32,
}

impl Nfnl {
    pub fn open() -> Result<Self, NfnlError> {
        Nfnl::open_protocol(NETLINK_NETFILTER)
    }

    /// A blocking socket of another netlink protocol, for its dumps ([`Nfnl::dump`]):
    /// `NETLINK_ROUTE` and `NETLINK_XFRM` (`crate::datapath::reroute`).
    pub fn open_protocol(protocol: isize) -> Result<Self, NfnlError> {
        let mut socket = Socket::new(protocol)?;
        socket.bind_auto()?;
        socket.connect(&SocketAddr::new(0, 0))?;
        let timeout = nix::sys::time::TimeVal::new(5, 0);
        nix::sys::socket::setsockopt(
            &socket.as_fd(),
            nix::sys::socket::sockopt::ReceiveTimeout,
            &timeout,
        )
        .map_err(std::io::Error::from)?;
        Ok(Self { socket, seq: 1 })
    }

    /// Dump requests are checked strictly, and their headers filter (`NETLINK_GET_STRICT_CHK`).
    pub fn strict_checking(&self) -> Result<(), NfnlError> {
        Ok(self.socket.set_netlink_get_strict_chk(true)?)
    }

    fn next_seq(&mut self, n: u32) -> u32 {
        let s = self.seq;
        self.seq = self.seq.wrapping_add(n);
        s
    }

    fn recv(&self) -> Result<Vec<Received>, NfnlError> {
        let (buf, _) = self.socket.recv_from_full()?;
        parse_messages(&buf)
    }

    /// Sends a dump request and collects its replies until `NLMSG_DONE`.
    pub(crate) fn dump(
        &mut self,
        what: &str,
        build: impl FnOnce(u32) -> Vec<u8>,
    ) -> Result<Vec<Received>, NfnlError> {
        let seq = self.next_seq(1);
        self.socket.send(&build(seq), 0)?;
        let mut out = Vec::new();
        loop {
            for m in self.recv()? {
                if m.seq != seq {
                    continue;
                }
                match m.ty {
                    NLMSG_DONE => return Ok(out),
                    NLMSG_ERROR => {
                        let errno = error_code(&m).ok_or(NfnlError::Malformed("error"))?;
                        if errno == 0 {
                            return Ok(out);
                        }
                        return Err(NfnlError::Kernel {
                            what: what.to_owned(),
                            errno,
                        });
                    }
                    _ => out.push(m),
                }
            }
        }
    }

    /// Sends `msg` (whose messages use sequence numbers `seq..seq + count`) and waits for the
    /// acknowledgement of `ack_seq`; any error among them is returned.
    fn request(
        &mut self,
        what: &str,
        msg: &[u8],
        seqs: std::ops::Range<u32>,
        ack_seq: u32,
    ) -> Result<(), NfnlError> {
        self.socket.send(msg, 0)?;
        loop {
            for m in self.recv()? {
                if m.ty != NLMSG_ERROR || !seqs.contains(&m.seq) {
                    continue;
                }
                let errno = error_code(&m).ok_or(NfnlError::Malformed("error"))?;
                if errno != 0 {
                    return Err(NfnlError::Kernel {
                        what: what.to_owned(),
                        errno,
                    });
                }
                if m.seq == ack_seq {
                    return Ok(());
                }
            }
        }
    }

    /// Every nf_tables table.
    pub fn nft_tables(&mut self) -> Result<Vec<NftTable>, NfnlError> {
        let msgs = self.dump("listing nf_tables tables", nft_list_tables)?;
        Ok(parse_nft_tables(&msgs))
    }

    /// Deletes a table with everything in it; `Ok(false)` when it does not exist.
    pub fn nft_delete_table(&mut self, table: &NftTable) -> Result<bool, NfnlError> {
        let seq = self.next_seq(3);
        let msg = nft_delete_table_batch(seq, table.family, &table.name);
        match self.request(
            &format!("deleting nf_tables table {table}"),
            &msg,
            seq..seq.wrapping_add(3),
            seq.wrapping_add(1),
        ) {
            Ok(()) => Ok(true),
            Err(NfnlError::Kernel { errno, .. }) if errno == libc::ENOENT => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Creates table `name` of `family` with `chains` and `rules`, or replaces it whole
    /// ([`nft_replace_table_batch`]).
    pub fn nft_replace_table(
        &mut self,
        family: u8,
        name: &str,
        chains: &[BaseChain],
        rules: &[NftRule],
    ) -> Result<(), NfnlError> {
        let seq = self.seq;
        let (msg, count) = nft_replace_table_batch(seq, family, name, chains, rules);
        self.next_seq(count);
        self.request(
            &format!("writing nf_tables table {name}"),
            &msg,
            seq..seq.wrapping_add(count),
            // The last message before the batch end.
            seq.wrapping_add(count - 2),
        )
    }

    /// The ruleset's generation: it changes with every committed nf_tables transaction (any
    /// table's, iptables-nft's included), and only then.
    pub fn nft_generation(&mut self) -> Result<u32, NfnlError> {
        let msgs = self.dump("reading the nf_tables generation", nft_get_generation)?;
        parse_nft_generation(&msgs).ok_or(NfnlError::Malformed("no NFTA_GEN_ID"))
    }

    /// Every chain of `family`.
    pub fn nft_chains(&mut self, family: u8) -> Result<Vec<NftChainInfo>, NfnlError> {
        let msgs = self.dump("listing nf_tables chains", |seq| {
            nft_list_chains(seq, family)
        })?;
        Ok(parse_nft_chains(&msgs))
    }

    /// The rules of table `table` of `family` (none when it does not exist).
    pub fn nft_rules(&mut self, family: u8, table: &str) -> Result<Vec<NftRuleInfo>, NfnlError> {
        let msgs = match self.dump("listing nf_tables rules", |seq| {
            nft_list_rules(seq, family, table)
        }) {
            Ok(m) => m,
            Err(NfnlError::Kernel { errno, .. }) if errno == libc::ENOENT => Vec::new(),
            Err(e) => return Err(e),
        };
        Ok(parse_nft_rules(&msgs)
            .into_iter()
            .filter(|r| r.table == table)
            .collect())
    }

    /// Every ipset's name.
    pub fn ipset_names(&mut self) -> Result<Vec<String>, NfnlError> {
        let msgs = self.dump("listing ipsets", ipset_list_names)?;
        Ok(parse_ipset_names(&msgs))
    }

    /// Destroys set `name`; `Ok(false)` when it does not exist.
    pub fn ipset_destroy(&mut self, name: &str) -> Result<bool, NfnlError> {
        let seq = self.next_seq(1);
        let msg = ipset_destroy(seq, name)?;
        match self.request(
            &format!("destroying ipset {name}"),
            &msg,
            seq..seq.wrapping_add(1),
            seq,
        ) {
            Ok(()) => Ok(true),
            Err(NfnlError::Kernel { errno, .. }) if errno == libc::ENOENT => Ok(false),
            Err(e) => Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The 16-byte header, little-endian (the byte tests assume a little-endian host).
    fn hdr(len: u32, ty: u16, flags: u16, seq: u32) -> Vec<u8> {
        let mut b = Vec::new();
        b.extend_from_slice(&len.to_le_bytes());
        b.extend_from_slice(&ty.to_le_bytes());
        b.extend_from_slice(&flags.to_le_bytes());
        b.extend_from_slice(&seq.to_le_bytes());
        b.extend_from_slice(&[0, 0, 0, 0]);
        b
    }

    #[cfg(target_endian = "little")]
    #[test]
    fn the_generation_request_and_its_reply_follow_the_uapi_layout() {
        // NFT_MSG_GETGEN (10 << 8 | 16), NLM_F_REQUEST | NLM_F_ACK, NFPROTO_UNSPEC, no attributes.
        let mut want = hdr(20, 0x0a10, 0x5, 9);
        want.extend_from_slice(&[0, 0, 0, 0]);
        assert_eq!(nft_get_generation(9), want);
        // NFT_MSG_NEWGEN as 6.12 sends it: NFTA_GEN_ID 0x1234 (big-endian), the process id, and
        // its name; then the acknowledgement.
        let mut reply = hdr(48, 0x0a0f, 0, 9);
        reply.extend_from_slice(&[0, 0, 0, 0]);
        reply.extend_from_slice(&attr(NFTA_GEN_ID, &0x1234u32.to_be_bytes()));
        reply.extend_from_slice(&attr(2, &77u32.to_be_bytes()));
        reply.extend_from_slice(&attr_str(3, "agent"));
        let mut ack = hdr(36, NLMSG_ERROR, 0, 9);
        ack.extend_from_slice(&[0; 20]);
        reply.extend_from_slice(&ack);
        let msgs = parse_messages(&reply).unwrap();
        assert_eq!(msgs.len(), 2);
        assert_eq!(parse_nft_generation(&msgs), Some(0x1234));
        assert_eq!(parse_nft_generation(&msgs[1..]), None);
    }

    #[cfg(target_endian = "little")]
    #[test]
    fn nft_delete_table_batch_bytes() {
        let got = nft_delete_table_batch(7, NFPROTO_IPV4, "kube-proxy");
        let mut want = Vec::new();
        // NFNL_MSG_BATCH_BEGIN, NLM_F_REQUEST, res_id = htons(NFNL_SUBSYS_NFTABLES).
        want.extend(hdr(20, 0x0010, 0x0001, 7));
        want.extend([0, 0, 0x00, 0x0a]);
        // NFT_MSG_DELTABLE (0x0a02), NLM_F_REQUEST|NLM_F_ACK, family ip, NFTA_TABLE_NAME.
        want.extend(hdr(36, 0x0a02, 0x0005, 8));
        want.extend([2, 0, 0, 0]);
        want.extend([15, 0, 1, 0]);
        want.extend(b"kube-proxy\0");
        want.push(0);
        // NFNL_MSG_BATCH_END.
        want.extend(hdr(20, 0x0011, 0x0001, 9));
        want.extend([0, 0, 0x00, 0x0a]);
        assert_eq!(got, want);
        assert_eq!(
            nft_delete_table_batch(1, NFPROTO_IPV6, "kube-proxy")[20 + 16],
            10,
            "ip6 family in the delete's nfgenmsg"
        );
    }

    #[cfg(target_endian = "little")]
    #[test]
    fn nft_list_tables_bytes() {
        let mut want = hdr(20, 0x0a01, 0x0301, 3);
        want.extend([0, 0, 0, 0]);
        assert_eq!(nft_list_tables(3), want);
    }

    #[cfg(target_endian = "little")]
    #[test]
    fn ipset_list_names_bytes() {
        let mut want = hdr(36, 0x0607, 0x0301, 4);
        want.extend([2, 0, 0, 0]);
        // IPSET_ATTR_PROTOCOL = 6, padded.
        want.extend([5, 0, 1, 0, 6, 0, 0, 0]);
        // IPSET_ATTR_FLAGS | NLA_F_NET_BYTEORDER, IPSET_FLAG_LIST_SETNAME big-endian.
        want.extend([8, 0, 0x06, 0x40, 0, 0, 0, 2]);
        assert_eq!(ipset_list_names(4), want);
    }

    #[cfg(target_endian = "little")]
    #[test]
    fn ipset_destroy_bytes() {
        let mut want = hdr(48, 0x0603, 0x0005, 9);
        want.extend([2, 0, 0, 0]);
        want.extend([5, 0, 1, 0, 6, 0, 0, 0]);
        // "KUBE-CLUSTER-IP\0": 16 bytes, attribute length 20.
        want.extend([20, 0, 2, 0]);
        want.extend(b"KUBE-CLUSTER-IP\0");
        assert_eq!(ipset_destroy(9, "KUBE-CLUSTER-IP").unwrap(), want);
    }

    #[test]
    fn ipset_destroy_refuses_to_destroy_everything() {
        assert!(matches!(
            ipset_destroy(1, ""),
            Err(NfnlError::BadSetName(_))
        ));
        assert!(ipset_destroy(1, &"K".repeat(32)).is_err());
        assert!(ipset_destroy(1, &"K".repeat(31)).is_ok());
        assert!(ipset_destroy(1, "A\0B").is_err());
    }

    #[test]
    fn attributes_are_padded() {
        assert_eq!(
            attr(1, &[]),
            4u16.to_ne_bytes()
                .iter()
                .chain(&1u16.to_ne_bytes())
                .copied()
                .collect::<Vec<u8>>()
        );
        for n in 0..9 {
            let a = attr(2, &vec![0xaa; n]);
            assert_eq!(a.len() % 4, 0);
            assert_eq!(u16::from_ne_bytes([a[0], a[1]]) as usize, 4 + n);
        }
    }

    #[test]
    fn parses_replies() {
        // A NEWTABLE reply for "ip kube-proxy" and one for "inet filter", then DONE.
        let mut buf = Vec::new();
        for (family, name) in [(NFPROTO_IPV4, "kube-proxy"), (NFPROTO_INET, "filter")] {
            let mut attrs = attr_str(NFTA_TABLE_NAME, name);
            attrs.extend(attr(2, &0u32.to_be_bytes()));
            buf.extend(message(
                nft_type(NFT_MSG_NEWTABLE),
                0x2,
                5,
                family,
                0,
                &attrs,
            ));
        }
        buf.extend(message(NLMSG_DONE, 0x2, 5, 0, 0, &[]));
        let msgs = parse_messages(&buf).unwrap();
        assert_eq!(msgs.len(), 3);
        let tables = parse_nft_tables(&msgs);
        assert_eq!(
            tables,
            vec![
                NftTable {
                    family: NFPROTO_IPV4,
                    name: "kube-proxy".into()
                },
                NftTable {
                    family: NFPROTO_INET,
                    name: "filter".into()
                }
            ]
        );
        assert_eq!(tables[0].to_string(), "ip kube-proxy");

        let mut buf = Vec::new();
        for name in ["KUBE-CLUSTER-IP", "other"] {
            let mut attrs = attr(IPSET_ATTR_PROTOCOL, &[7]);
            attrs.extend(attr_str(IPSET_ATTR_SETNAME, name));
            buf.extend(message(
                ipset_type(IPSET_CMD_LIST),
                0x2,
                6,
                NFPROTO_IPV4,
                0,
                &attrs,
            ));
        }
        assert_eq!(
            parse_ipset_names(&parse_messages(&buf).unwrap()),
            vec!["KUBE-CLUSTER-IP".to_string(), "other".to_string()]
        );
    }

    #[test]
    fn parses_errors_and_rejects_truncation() {
        let mut payload = (-libc::ENOENT).to_ne_bytes().to_vec();
        payload.extend([0u8; 16]);
        let mut buf = Vec::new();
        buf.extend(((16 + payload.len()) as u32).to_ne_bytes());
        buf.extend(NLMSG_ERROR.to_ne_bytes());
        buf.extend(0u16.to_ne_bytes());
        buf.extend(8u32.to_ne_bytes());
        buf.extend(0u32.to_ne_bytes());
        buf.extend(&payload);
        let msgs = parse_messages(&buf).unwrap();
        assert_eq!(error_code(&msgs[0]), Some(libc::ENOENT));
        buf.truncate(buf.len() - 1);
        assert!(parse_messages(&buf).is_err());
        assert!(describe(IPSET_ERR_BUSY).contains("in use"));
    }
}
