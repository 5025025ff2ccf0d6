//! Numeric constants from the kernel's `include/uapi/linux/ip_vs.h`.
//!
//! Names follow the C header so they can be grepped against it. Only what the
//! crate encodes or decodes is listed; values are ABI and never change.

/// Generic netlink family name registered by `ip_vs.ko` (`IPVS_GENL_NAME`).
pub const IPVS_GENL_NAME: &str = "IPVS";
/// Generic netlink family version (`IPVS_GENL_VERSION`).
pub const IPVS_GENL_VERSION: u8 = 1;

/// `IP_VS_SCHEDNAME_MAXLEN`: size of the kernel's scheduler-name buffer,
/// including the terminating NUL.
pub const IP_VS_SCHEDNAME_MAXLEN: usize = 16;
/// `IP_VS_PENAME_MAXLEN`: size of the kernel's persistence-engine-name buffer.
pub const IP_VS_PENAME_MAXLEN: usize = 16;
/// Longest scheduler name (bytes, without NUL) the kernel's netlink policy
/// accepts: `NLA_NUL_STRING` with `.len = IP_VS_SCHEDNAME_MAXLEN - 1`.
pub const MAX_SCHEDULER_NAME_LEN: usize = IP_VS_SCHEDNAME_MAXLEN - 1;
/// Longest persistence-engine name (bytes, without NUL) the kernel's netlink
/// policy accepts: `NLA_NUL_STRING` with `.len = IP_VS_PENAME_MAXLEN`.
pub const MAX_PE_NAME_LEN: usize = IP_VS_PENAME_MAXLEN;

/// `AF_INET`.
pub const AF_INET: u16 = 2;
/// `AF_INET6`.
pub const AF_INET6: u16 = 10;

/// `IPPROTO_TCP`.
pub const IPPROTO_TCP: u16 = 6;
/// `IPPROTO_UDP`.
pub const IPPROTO_UDP: u16 = 17;
/// `IPPROTO_SCTP`.
pub const IPPROTO_SCTP: u16 = 132;

// Commands (enum IPVS_CMD_*).
/// `IPVS_CMD_UNSPEC`.
pub const IPVS_CMD_UNSPEC: u8 = 0;
/// `IPVS_CMD_NEW_SERVICE`: add a service; also the command of service replies.
pub const IPVS_CMD_NEW_SERVICE: u8 = 1;
/// `IPVS_CMD_SET_SERVICE`: modify a service.
pub const IPVS_CMD_SET_SERVICE: u8 = 2;
/// `IPVS_CMD_DEL_SERVICE`: delete a service.
pub const IPVS_CMD_DEL_SERVICE: u8 = 3;
/// `IPVS_CMD_GET_SERVICE`: get one service (doit) or all of them (dump).
pub const IPVS_CMD_GET_SERVICE: u8 = 4;
/// `IPVS_CMD_NEW_DEST`: add a destination; also the command of dest replies.
pub const IPVS_CMD_NEW_DEST: u8 = 5;
/// `IPVS_CMD_SET_DEST`: modify a destination.
pub const IPVS_CMD_SET_DEST: u8 = 6;
/// `IPVS_CMD_DEL_DEST`: delete a destination.
pub const IPVS_CMD_DEL_DEST: u8 = 7;
/// `IPVS_CMD_GET_DEST`: dump the destinations of a service.
pub const IPVS_CMD_GET_DEST: u8 = 8;
/// `IPVS_CMD_NEW_DAEMON`: start a sync daemon.
pub const IPVS_CMD_NEW_DAEMON: u8 = 9;
/// `IPVS_CMD_DEL_DAEMON`: stop a sync daemon.
pub const IPVS_CMD_DEL_DAEMON: u8 = 10;
/// `IPVS_CMD_GET_DAEMON`: dump sync daemons.
pub const IPVS_CMD_GET_DAEMON: u8 = 11;
/// `IPVS_CMD_SET_CONFIG`: set timeouts; also the command of GET_CONFIG replies.
pub const IPVS_CMD_SET_CONFIG: u8 = 12;
/// `IPVS_CMD_GET_CONFIG`: get timeouts.
pub const IPVS_CMD_GET_CONFIG: u8 = 13;
/// `IPVS_CMD_SET_INFO`: only used as the command of GET_INFO replies.
pub const IPVS_CMD_SET_INFO: u8 = 14;
/// `IPVS_CMD_GET_INFO`: get version and connection table size.
pub const IPVS_CMD_GET_INFO: u8 = 15;
/// `IPVS_CMD_ZERO`: zero the counters of one service or of all.
pub const IPVS_CMD_ZERO: u8 = 16;
/// `IPVS_CMD_FLUSH`: delete all services and destinations.
pub const IPVS_CMD_FLUSH: u8 = 17;

// First-level attributes (enum IPVS_CMD_ATTR_*).
/// `IPVS_CMD_ATTR_SERVICE`: nested service attributes.
pub const IPVS_CMD_ATTR_SERVICE: u16 = 1;
/// `IPVS_CMD_ATTR_DEST`: nested destination attributes.
pub const IPVS_CMD_ATTR_DEST: u16 = 2;
/// `IPVS_CMD_ATTR_DAEMON`: nested sync daemon attributes.
pub const IPVS_CMD_ATTR_DAEMON: u16 = 3;
/// `IPVS_CMD_ATTR_TIMEOUT_TCP`: u32 seconds.
pub const IPVS_CMD_ATTR_TIMEOUT_TCP: u16 = 4;
/// `IPVS_CMD_ATTR_TIMEOUT_TCP_FIN`: u32 seconds.
pub const IPVS_CMD_ATTR_TIMEOUT_TCP_FIN: u16 = 5;
/// `IPVS_CMD_ATTR_TIMEOUT_UDP`: u32 seconds.
pub const IPVS_CMD_ATTR_TIMEOUT_UDP: u16 = 6;

// Service attributes (enum IPVS_SVC_ATTR_*).
/// `IPVS_SVC_ATTR_AF`: u16 address family.
pub const IPVS_SVC_ATTR_AF: u16 = 1;
/// `IPVS_SVC_ATTR_PROTOCOL`: u16 IP protocol number.
pub const IPVS_SVC_ATTR_PROTOCOL: u16 = 2;
/// `IPVS_SVC_ATTR_ADDR`: `union nf_inet_addr` (16 bytes).
pub const IPVS_SVC_ATTR_ADDR: u16 = 3;
/// `IPVS_SVC_ATTR_PORT`: `__be16`.
pub const IPVS_SVC_ATTR_PORT: u16 = 4;
/// `IPVS_SVC_ATTR_FWMARK`: u32.
pub const IPVS_SVC_ATTR_FWMARK: u16 = 5;
/// `IPVS_SVC_ATTR_SCHED_NAME`: NUL-terminated string.
pub const IPVS_SVC_ATTR_SCHED_NAME: u16 = 6;
/// `IPVS_SVC_ATTR_FLAGS`: `struct ip_vs_flags`.
pub const IPVS_SVC_ATTR_FLAGS: u16 = 7;
/// `IPVS_SVC_ATTR_TIMEOUT`: u32 persistence timeout in seconds.
pub const IPVS_SVC_ATTR_TIMEOUT: u16 = 8;
/// `IPVS_SVC_ATTR_NETMASK`: `__be32` (IPv4 mask, or IPv6 prefix length).
pub const IPVS_SVC_ATTR_NETMASK: u16 = 9;
/// `IPVS_SVC_ATTR_STATS`: nested 32-bit statistics.
pub const IPVS_SVC_ATTR_STATS: u16 = 10;
/// `IPVS_SVC_ATTR_PE_NAME`: NUL-terminated string.
pub const IPVS_SVC_ATTR_PE_NAME: u16 = 11;
/// `IPVS_SVC_ATTR_STATS64`: nested 64-bit statistics.
pub const IPVS_SVC_ATTR_STATS64: u16 = 12;

// Destination attributes (enum IPVS_DEST_ATTR_*).
/// `IPVS_DEST_ATTR_ADDR`: `union nf_inet_addr` (16 bytes).
pub const IPVS_DEST_ATTR_ADDR: u16 = 1;
/// `IPVS_DEST_ATTR_PORT`: `__be16`.
pub const IPVS_DEST_ATTR_PORT: u16 = 2;
/// `IPVS_DEST_ATTR_FWD_METHOD`: u32 (`IP_VS_CONN_F_*` forwarding bits).
pub const IPVS_DEST_ATTR_FWD_METHOD: u16 = 3;
/// `IPVS_DEST_ATTR_WEIGHT`: u32 (kernel `int`).
pub const IPVS_DEST_ATTR_WEIGHT: u16 = 4;
/// `IPVS_DEST_ATTR_U_THRESH`: u32.
pub const IPVS_DEST_ATTR_U_THRESH: u16 = 5;
/// `IPVS_DEST_ATTR_L_THRESH`: u32.
pub const IPVS_DEST_ATTR_L_THRESH: u16 = 6;
/// `IPVS_DEST_ATTR_ACTIVE_CONNS`: u32.
pub const IPVS_DEST_ATTR_ACTIVE_CONNS: u16 = 7;
/// `IPVS_DEST_ATTR_INACT_CONNS`: u32.
pub const IPVS_DEST_ATTR_INACT_CONNS: u16 = 8;
/// `IPVS_DEST_ATTR_PERSIST_CONNS`: u32.
pub const IPVS_DEST_ATTR_PERSIST_CONNS: u16 = 9;
/// `IPVS_DEST_ATTR_STATS`: nested 32-bit statistics.
pub const IPVS_DEST_ATTR_STATS: u16 = 10;
/// `IPVS_DEST_ATTR_ADDR_FAMILY`: u16 address family of the destination.
pub const IPVS_DEST_ATTR_ADDR_FAMILY: u16 = 11;
/// `IPVS_DEST_ATTR_STATS64`: nested 64-bit statistics.
pub const IPVS_DEST_ATTR_STATS64: u16 = 12;
/// `IPVS_DEST_ATTR_TUN_TYPE`: u8 tunnel type.
pub const IPVS_DEST_ATTR_TUN_TYPE: u16 = 13;
/// `IPVS_DEST_ATTR_TUN_PORT`: `__be16` tunnel (GUE) port.
pub const IPVS_DEST_ATTR_TUN_PORT: u16 = 14;
/// `IPVS_DEST_ATTR_TUN_FLAGS`: u16 tunnel encapsulation flags.
pub const IPVS_DEST_ATTR_TUN_FLAGS: u16 = 15;

// Statistics attributes (enum IPVS_STATS_ATTR_*).
/// `IPVS_STATS_ATTR_CONNS`.
pub const IPVS_STATS_ATTR_CONNS: u16 = 1;
/// `IPVS_STATS_ATTR_INPKTS`.
pub const IPVS_STATS_ATTR_INPKTS: u16 = 2;
/// `IPVS_STATS_ATTR_OUTPKTS`.
pub const IPVS_STATS_ATTR_OUTPKTS: u16 = 3;
/// `IPVS_STATS_ATTR_INBYTES`.
pub const IPVS_STATS_ATTR_INBYTES: u16 = 4;
/// `IPVS_STATS_ATTR_OUTBYTES`.
pub const IPVS_STATS_ATTR_OUTBYTES: u16 = 5;
/// `IPVS_STATS_ATTR_CPS`.
pub const IPVS_STATS_ATTR_CPS: u16 = 6;
/// `IPVS_STATS_ATTR_INPPS`.
pub const IPVS_STATS_ATTR_INPPS: u16 = 7;
/// `IPVS_STATS_ATTR_OUTPPS`.
pub const IPVS_STATS_ATTR_OUTPPS: u16 = 8;
/// `IPVS_STATS_ATTR_INBPS`.
pub const IPVS_STATS_ATTR_INBPS: u16 = 9;
/// `IPVS_STATS_ATTR_OUTBPS`.
pub const IPVS_STATS_ATTR_OUTBPS: u16 = 10;
/// `IPVS_STATS_ATTR_PAD`: alignment padding before 64-bit values.
pub const IPVS_STATS_ATTR_PAD: u16 = 11;

// Info attributes (enum IPVS_INFO_ATTR_*); first-level in GET_INFO replies.
/// `IPVS_INFO_ATTR_VERSION`: u32 `IP_VS_VERSION_CODE`.
pub const IPVS_INFO_ATTR_VERSION: u16 = 1;
/// `IPVS_INFO_ATTR_CONN_TAB_SIZE`: u32 connection hash table size.
pub const IPVS_INFO_ATTR_CONN_TAB_SIZE: u16 = 2;

// Service flags.
/// `IP_VS_SVC_F_PERSISTENT`.
pub const IP_VS_SVC_F_PERSISTENT: u32 = 0x0001;
/// `IP_VS_SVC_F_HASHED`.
pub const IP_VS_SVC_F_HASHED: u32 = 0x0002;
/// `IP_VS_SVC_F_ONEPACKET`.
pub const IP_VS_SVC_F_ONEPACKET: u32 = 0x0004;
/// `IP_VS_SVC_F_SCHED1`.
pub const IP_VS_SVC_F_SCHED1: u32 = 0x0008;
/// `IP_VS_SVC_F_SCHED2`.
pub const IP_VS_SVC_F_SCHED2: u32 = 0x0010;
/// `IP_VS_SVC_F_SCHED3`.
pub const IP_VS_SVC_F_SCHED3: u32 = 0x0020;

// Forwarding methods (IP_VS_CONN_F_*).
/// `IP_VS_CONN_F_FWD_MASK`.
pub const IP_VS_CONN_F_FWD_MASK: u32 = 0x0007;
/// `IP_VS_CONN_F_MASQ`.
pub const IP_VS_CONN_F_MASQ: u32 = 0x0000;
/// `IP_VS_CONN_F_LOCALNODE`.
pub const IP_VS_CONN_F_LOCALNODE: u32 = 0x0001;
/// `IP_VS_CONN_F_TUNNEL`.
pub const IP_VS_CONN_F_TUNNEL: u32 = 0x0002;
/// `IP_VS_CONN_F_DROUTE`.
pub const IP_VS_CONN_F_DROUTE: u32 = 0x0003;
/// `IP_VS_CONN_F_BYPASS`.
pub const IP_VS_CONN_F_BYPASS: u32 = 0x0004;

// Tunnel types and flags.
/// `IP_VS_CONN_F_TUNNEL_TYPE_IPIP`.
pub const IP_VS_CONN_F_TUNNEL_TYPE_IPIP: u8 = 0;
/// `IP_VS_CONN_F_TUNNEL_TYPE_GUE`.
pub const IP_VS_CONN_F_TUNNEL_TYPE_GUE: u8 = 1;
/// `IP_VS_CONN_F_TUNNEL_TYPE_GRE`.
pub const IP_VS_CONN_F_TUNNEL_TYPE_GRE: u8 = 2;
/// `IP_VS_TUNNEL_ENCAP_FLAG_NOCSUM`.
pub const IP_VS_TUNNEL_ENCAP_FLAG_NOCSUM: u16 = 0;
/// `IP_VS_TUNNEL_ENCAP_FLAG_CSUM`.
pub const IP_VS_TUNNEL_ENCAP_FLAG_CSUM: u16 = 1 << 0;
/// `IP_VS_TUNNEL_ENCAP_FLAG_REMCSUM`.
pub const IP_VS_TUNNEL_ENCAP_FLAG_REMCSUM: u16 = 1 << 1;
