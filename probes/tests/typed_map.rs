//! Host-kernel tests of `probes::TypedMap`'s batched operations on a real LRU hash map (the
//! type of `conns`): `delete_all` deletes every key it is given that is present, across several
//! `BPF_MAP_DELETE_BATCH` calls and past keys absent from the map (where the kernel stops a
//! batch), and says how many it deleted. Needs root.

use libbpf_rs::{MapCore, MapHandle, MapType};
use probes::typed_map::DELETE_BATCH;
use probes::{TypedMap, UpdateFlags};

fn lru_map(max_entries: u32) -> TypedMap<u64, u64> {
    let opts = libbpf_rs::libbpf_sys::bpf_map_create_opts {
        sz: size_of::<libbpf_rs::libbpf_sys::bpf_map_create_opts>() as _,
        ..Default::default()
    };
    let handle = MapHandle::create(MapType::LruHash, Some("kib_test"), 8, 8, max_entries, &opts)
        .expect("create an LRU hash map");
    assert_eq!(handle.max_entries(), max_entries);
    TypedMap::from_handle(handle).expect("typed map")
}

#[test]
fn delete_all_deletes_the_present_keys_across_batches_and_past_absent_ones() {
    let present = 2 * DELETE_BATCH as u64 + 100;
    let map = lru_map(8 * DELETE_BATCH as u32);
    for k in 0..present {
        map.update(&k, &(k * 3), UpdateFlags::NoExist)
            .expect("insert");
    }
    // Every present key but the last ten, with absent keys first, in the middle of a batch, two
    // in a row at a batch's edge, and last.
    let mut keys = vec![1_000_000];
    for k in 0..present - 10 {
        keys.push(k);
        if k == 100 {
            keys.push(1_000_001);
        }
        if k as usize == DELETE_BATCH - 3 {
            keys.extend([1_000_002, 1_000_003]);
        }
    }
    keys.push(1_000_004);
    let deleted = map.delete_all(&keys).expect("delete_all");
    assert_eq!(deleted as u64, present - 10);
    let mut left: Vec<u64> = map
        .entries()
        .expect("entries")
        .into_iter()
        .map(|(k, v)| {
            assert_eq!(v, k * 3);
            k
        })
        .collect();
    left.sort_unstable();
    assert_eq!(left, (present - 10..present).collect::<Vec<_>>());
    assert_eq!(map.delete_all(&[]).expect("nothing"), 0);
    assert_eq!(map.delete_all(&[present - 1]).expect("one"), 1);
}
