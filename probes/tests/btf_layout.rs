//! The Rust mirrors in `probes::maps` against the BTF of the compiled objects: for every key and
//! value struct, its size and each member's name, offset and size; and every map's key/value
//! size against the Rust type used with it; and every constant `probes::maps` mirrors (flags,
//! states, counter indices, sizes) against the enum value of the same name in the BTF (the C
//! constants are enums, anchored in BTF by `struct kib_consts`, bpf/consts.h). No kernel access
//! needed.

use std::collections::HashMap;
use std::ffi::OsStr;

use libbpf_rs::btf::types::{Array, Enum, Int, MemberAttr, Struct, Union};
use libbpf_rs::btf::{BtfKind, BtfType};
use libbpf_rs::{Btf, HasSize, ObjectBuilder};
use probes::maps::{
    self, AddrKey, AddrValue, CidrKey, Config, ConnValue, Counter, CpuScratch, DevSlot, DevValue,
    DropEvent, FlowSlot, FragKey, FragValue, NatBucket, NatClaim, NatJob, NatRecord,
    PortFilterValue, RangeKey, SnatEntry, SvcKey, SvcValue, SwitchFlow, Tuple, map_names,
};
use probes::objects::{DATAPATH_OBJECT, IPVS_PROBE_OBJECT};

struct RustLayout {
    size: usize,
    members: Vec<(&'static str, usize, usize)>,
}

fn field_size<T, F>(_: fn(&T) -> &F) -> usize {
    size_of::<F>()
}

macro_rules! rust_layout {
    ($t:ty { $($field:ident),* $(,)? }) => {
        RustLayout {
            size: size_of::<$t>(),
            members: vec![$((
                stringify!($field),
                std::mem::offset_of!($t, $field),
                field_size(|s: &$t| &s.$field),
            )),*],
        }
    };
}

/// The datapath object's own structs (not in the probe object).
fn datapath_only_layouts() -> Vec<(&'static str, RustLayout)> {
    vec![
        (
            "flow_slot",
            rust_layout!(FlowSlot {
                saddr,
                daddr,
                sport,
                dport,
                proto,
                dir,
                family,
                state,
                addr,
                port,
                pad,
                filled_jiffies,
                record,
                pad2
            }),
        ),
        (
            "cpu_scratch",
            rust_layout!(CpuScratch {
                job,
                rng,
                rec_cursor,
                port_counter,
                clock_jiffies,
                clock_ns,
                rev_key,
                rev_value,
                rev_claim,
                fwd_claim
            }),
        ),
        (
            "nat_claim",
            rust_layout!(NatClaim {
                home,
                bucket,
                way,
                tag
            }),
        ),
        (
            "nat_bucket",
            rust_layout!(NatBucket {
                tag,
                overflow,
                pad,
                rec
            }),
        ),
        (
            "nat_record",
            rust_layout!(NatRecord {
                state,
                pad,
                fwd_key,
                rev_key,
                fwd,
                rev
            }),
        ),
        (
            "snat_entry",
            rust_layout!(SnatEntry {
                addr,
                port,
                state,
                flags,
                svc_id,
                created_ns,
                last_seen_ns
            }),
        ),
        (
            "nat_job",
            rust_layout!(NatJob {
                addr,
                port,
                dir,
                family,
                proto,
                has_l4,
                l3_off,
                l4_off,
                pad
            }),
        ),
        (
            "switch_flow",
            rust_layout!(SwitchFlow {
                ct_id,
                pad,
                seen_ns
            }),
        ),
        (
            "port_filter",
            rust_layout!(PortFilterValue {
                backend,
                service,
                snat
            }),
        ),
    ]
}

fn rust_layouts() -> Vec<(&'static str, RustLayout)> {
    vec![
        (
            "svc_key",
            rust_layout!(SvcKey {
                addr,
                port,
                proto,
                pad
            }),
        ),
        ("svc_value", rust_layout!(SvcValue { flags, svc_id })),
        ("addr_key", rust_layout!(AddrKey { addr })),
        ("addr_value", rust_layout!(AddrValue { flags, pad })),
        (
            "range_key",
            rust_layout!(RangeKey {
                prefixlen,
                svc_id,
                addr
            }),
        ),
        ("cidr_key", rust_layout!(CidrKey { prefixlen, addr })),
        (
            "dev_value",
            rust_layout!(DevValue {
                addr4,
                addr6,
                flags,
                pad
            }),
        ),
        (
            "tuple",
            rust_layout!(Tuple {
                saddr,
                daddr,
                sport,
                dport,
                proto,
                pad
            }),
        ),
        (
            "conn_value",
            rust_layout!(ConnValue {
                vaddr,
                vport,
                conn_id_hi,
                conn_id_lo,
                created_ns
            }),
        ),
        (
            "frag_key",
            rust_layout!(FragKey {
                saddr,
                daddr,
                id,
                proto,
                pad
            }),
        ),
        ("frag_value", rust_layout!(FragValue { sport, dport })),
        (
            "config",
            rust_layout!(Config {
                mark_svc,
                mark_masq,
                snat_port_min,
                snat_port_max,
                local_port_min,
                local_port_max,
                flags,
                nat_seed,
                nat_buckets,
                nat_records
            }),
        ),
        (
            "dev_slot",
            rust_layout!(DevSlot {
                ifindex,
                pad,
                value
            }),
        ),
        ("drop_event", rust_layout!(DropEvent { time_ns, key })),
    ]
}

/// Size in bytes of a BTF type (through typedefs and modifiers).
fn btf_size(ty: BtfType<'_>) -> usize {
    let ty = ty.skip_mods_and_typedefs();
    match ty.kind() {
        BtfKind::Int => Int::try_from(ty).expect("int").size(),
        BtfKind::Enum => Enum::try_from(ty).expect("enum").size(),
        BtfKind::Struct => Struct::try_from(ty).expect("struct").size(),
        BtfKind::Union => Union::try_from(ty).expect("union").size(),
        BtfKind::Array => {
            let array = Array::try_from(ty).expect("array");
            array.capacity() * btf_size(array.contained_type())
        }
        kind => panic!("unexpected BTF kind {kind:?} in a map struct"),
    }
}

fn check_object(object_name: &str, bytes: &[u8], layouts: Vec<(&'static str, RustLayout)>) {
    let btf = Btf::from_raw(object_name, bytes)
        .expect("parse BTF")
        .expect("object has BTF");
    for (name, rust) in layouts {
        // By kind: maps named like their value struct (`config`) are BTF variables too.
        let ty: Struct<'_> = btf
            .type_by_kind::<Struct<'_>>()
            .find(|s| s.name() == Some(OsStr::new(name)))
            .unwrap_or_else(|| panic!("{object_name}: struct {name} not in BTF"));
        assert_eq!(ty.size(), rust.size, "{object_name}: sizeof(struct {name})");
        assert_eq!(
            ty.len(),
            rust.members.len(),
            "{object_name}: member count of struct {name}"
        );
        for (member, (rust_name, rust_offset, rust_size)) in ty.iter().zip(&rust.members) {
            assert_eq!(
                member.name,
                Some(OsStr::new(rust_name)),
                "{object_name}: struct {name} member order"
            );
            let MemberAttr::Normal { offset } = member.attr else {
                panic!("{object_name}: {name}.{rust_name} is a bitfield");
            };
            assert_eq!(
                offset as usize,
                rust_offset * 8,
                "{object_name}: offset of {name}.{rust_name}"
            );
            let member_ty: BtfType<'_> = btf.type_by_id(member.ty).expect("member type");
            assert_eq!(
                btf_size(member_ty),
                *rust_size,
                "{object_name}: size of {name}.{rust_name}"
            );
        }
    }
}

#[test]
fn datapath_object_structs_match_rust_mirrors() {
    let mut layouts = rust_layouts();
    layouts.extend(datapath_only_layouts());
    check_object("datapath", DATAPATH_OBJECT, layouts);
}

#[test]
fn ipvs_probe_object_structs_match_rust_mirrors() {
    check_object("ipvs_probe", IPVS_PROBE_OBJECT, rust_layouts());
}

/// Every map of both objects has the key/value sizes of its Rust types.
#[test]
fn map_key_and_value_sizes_match_rust_types() {
    let expected = |name: &str| -> (usize, usize) {
        match name {
            map_names::SVC_PORTS => (size_of::<SvcKey>(), size_of::<SvcValue>()),
            map_names::SVC_ADDRS => (size_of::<AddrKey>(), size_of::<AddrValue>()),
            map_names::SRC_RANGES => (size_of::<RangeKey>(), 1),
            map_names::CLUSTER_CIDRS => (size_of::<CidrKey>(), 1),
            map_names::DEVICES => (4, size_of::<DevValue>()),
            map_names::CONFIG => (4, size_of::<Config>()),
            map_names::DEVICE_SLOTS => (4, size_of::<DevSlot>()),
            map_names::SNAT_RECORDS => (4, size_of::<NatRecord>()),
            map_names::SNAT_FWD | map_names::SNAT_REV => (4, size_of::<NatBucket>()),
            map_names::SNAT_LOCKS => (4, 4),
            map_names::CONNS => (size_of::<Tuple>(), size_of::<ConnValue>()),
            map_names::FRAGS => (size_of::<FragKey>(), size_of::<FragValue>()),
            map_names::STATS => (4, 8),
            map_names::DROP_LAST => (4, size_of::<DropEvent>()),
            map_names::SWITCH_FLOWS => (size_of::<Tuple>(), size_of::<SwitchFlow>()),
            map_names::PORT_FILTER => (4, size_of::<PortFilterValue>()),
            map_names::FLOW_CACHE => (4, size_of::<FlowSlot>()),
            map_names::CPU_SCRATCH => (4, size_of::<CpuScratch>()),
            map_names::FLOW_GEN => (4, 4),
            map_names::NAT_WRITERS_EGRESS | map_names::NAT_WRITERS_INGRESS => (4, 4),
            other => panic!("unexpected map {other}"),
        }
    };
    for (object_name, bytes) in [
        ("datapath", DATAPATH_OBJECT),
        ("ipvs_probe", IPVS_PROBE_OBJECT),
    ] {
        let open = ObjectBuilder::default()
            .open_memory(bytes)
            .expect("open object");
        let mut seen = Vec::new();
        for map in open.maps() {
            let name = map.name().to_string_lossy().into_owned();
            let (key, value) = expected(&name);
            assert_eq!(
                map.key_size() as usize,
                key,
                "{object_name}: {name} key size"
            );
            assert_eq!(
                map.value_size() as usize,
                value,
                "{object_name}: {name} value size"
            );
            if name == map_names::STATS || name == map_names::DROP_LAST {
                assert_eq!(
                    map.max_entries() as usize,
                    Counter::COUNT,
                    "{object_name}: STAT_MAX matches the Rust counters"
                );
            }
            seen.push(name);
        }
        seen.sort();
        let own: &[&str] = if object_name == "datapath" {
            &map_names::PER_OBJECT
        } else {
            &[]
        };
        // The probe object leaves out the SNAT table, which it never uses (it writes
        // switch_flows while a drain starts).
        let mut all: Vec<String> = map_names::ALL
            .iter()
            .filter(|name| object_name == "datapath" || !name.starts_with("snat_"))
            .chain(own)
            .map(|s| s.to_string())
            .collect();
        all.sort();
        assert_eq!(
            seen, all,
            "{object_name}: declares every shared map (and the datapath its own)"
        );
    }
}

/// Every enumerator of every enum in an object's BTF, by name.
fn btf_enum_values(object_name: &str, bytes: &[u8]) -> HashMap<String, i64> {
    let btf = Btf::from_raw(object_name, bytes)
        .expect("parse BTF")
        .expect("object has BTF");
    let mut values = HashMap::new();
    for ty in btf.type_by_kind::<Enum<'_>>() {
        for member in ty.iter() {
            if let Some(name) = member.name {
                values.insert(name.to_string_lossy().into_owned(), member.value);
            }
        }
    }
    values
}

/// The constants of `probes::maps` that mirror a C constant of bpf/consts.h, by the C name.
fn mirrored_constants() -> Vec<(String, i64)> {
    macro_rules! constants {
        ($($name:ident),* $(,)?) => {
            vec![$((stringify!($name).to_owned(), maps::$name as i64)),*]
        };
    }
    let mut constants = constants![
        SVC_F_MASQ,
        SVC_F_MASQ_OFFCLUSTER,
        SVC_F_SRC_RANGES,
        ADDR_F_SERVICE,
        ADDR_F_NODE,
        CFG_F_MASQ_ALL,
        CFG_F_CLUSTER_CIDRS,
        CFG_F_DIRECT_WRITES,
        CFG_F_SWITCH,
        CFG_F_PORT_FILTER,
        PORT_FILTER_WORDS,
        CFG_REPLY_MARK_SHIFT,
        CFG_REPLY_MARK_MASK,
        SWITCH_FLOWS_SIZE,
        STATE_SYN,
        STATE_FIN,
        STATE_RST,
        STATE_REPLY,
        SNAT_F_PORT_KEPT,
        SNAT_F_PROBE_HIT,
        SNAT_F_MASQ,
        SNAT_F_HAIRPIN,
        SNAT_F_OFFCLUSTER,
        SNAT_F_HOST,
        SNAT_F_RESOLVED,
        IP_VS_CONN_F_TEMPLATE,
        CONN_ID_SET_HI,
        DEFAULT_SVC_PORTS_SIZE,
        DEFAULT_SVC_ADDRS_SIZE,
        DEFAULT_SRC_RANGES_SIZE,
        DEFAULT_CLUSTER_CIDRS_SIZE,
        DEFAULT_DEVICES_SIZE,
        DEFAULT_SNAT_SIZE,
        DEFAULT_CONNS_SIZE,
        DEFAULT_FRAGS_SIZE,
        DEVICE_SLOTS,
        NAT_WAYS,
        NAT_PROBE_BUCKETS,
        NAT_LOCK_STRIPES,
        TAG_FREE,
        TAG_BUSY,
        TAG_VALID,
        REC_FREE,
        REC_BUSY,
        REC_USED,
        REC_DEAD,
        FLOW_CACHE_SLOTS,
        FLOW_CACHE_TTL_JIFFIES,
    ];
    // The stats indices: STAT_<counter name> is the Counter's value, STAT_MAX their number.
    for counter in Counter::ALL {
        let name = format!("STAT_{}", counter.name().to_uppercase());
        constants.push((name, *counter as i64));
    }
    constants.push(("STAT_MAX".to_owned(), Counter::COUNT as i64));
    constants
}

fn check_constants(object_name: &str, bytes: &[u8]) {
    let values = btf_enum_values(object_name, bytes);
    let mut checked = 0;
    for (name, rust) in mirrored_constants() {
        let c = values
            .get(&name)
            .unwrap_or_else(|| panic!("{object_name}: enum constant {name} not in BTF"));
        assert_eq!(*c, rust, "{object_name}: {name} (C) vs probes::maps (Rust)");
        checked += 1;
    }
    assert!(checked > 0, "{object_name}: no constant checked");
}

#[test]
fn datapath_object_constants_match_rust_mirrors() {
    check_constants("datapath", DATAPATH_OBJECT);
}

#[test]
fn ipvs_probe_object_constants_match_rust_mirrors() {
    // Same header, same enums: the probe object carries them as well.
    check_constants("ipvs_probe", IPVS_PROBE_OBJECT);
}
