//! Copies of the kernel's hash tables (open TCP sessions, UDP flows) for the
//! scrape and the UDP tasks. The kernel hands them over in batches of
//! thousands of entries per system call (`BPF_MAP_LOOKUP_BATCH`, Linux 5.6,
//! older than the ring buffers the observer needs); should a kernel refuse it,
//! they are walked a key at a time, two system calls per entry: over a second
//! for 200,000 open sessions. Also the one entry taken out of a table in one
//! call (`take`), which aya's API does not offer for hash tables.
use std::{
    collections::HashSet,
    hash::Hash,
    io,
    mem::size_of,
    os::fd::{AsFd, AsRawFd},
    sync::atomic::{AtomicBool, Ordering},
};

use aya::{
    Pod,
    maps::{HashMap as BpfHashMap, IterableMap, MapData},
};

/// A copy of a kernel hash table's entries.
pub fn copy<K: Pod + Eq + Hash, V: Pod>(map: &BpfHashMap<MapData, K, V>) -> Vec<(K, V)> {
    copy_as(map, |k, v| Some((k, v)))
}

/// A copy of a kernel hash table's entries, each made into what the caller
/// keeps of it as it arrives (`None`: nothing): a scrape keeps 40 of an open
/// session's 120 bytes, and the whole copy of 200,000 sessions never exists
/// at once.
pub fn copy_as<K: Pod + Eq + Hash, V: Pod, T>(
    map: &BpfHashMap<MapData, K, V>,
    mut keep: impl FnMut(K, V) -> Option<T>,
) -> Vec<T> {
    match copy_in_batches(map, &mut keep) {
        Ok(entries) => entries,
        Err(_) => copy_by_key(map, &mut keep),
    }
}

/// Entries each batch call may return. A hash table's batch stops at a bucket
/// boundary, and a bucket holds a handful of entries, so this only bounds the
/// buffers (at 120-byte values, 0.5 MiB).
const BATCH: usize = 4096;

/// `BPF_MAP_LOOKUP_BATCH`, from uapi `linux/bpf.h`.
const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;

/// The `batch` member of uapi `union bpf_attr`.
#[repr(C)]
#[derive(Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

/// The table in batches: the kernel walks its buckets in order from a cursor
/// it hands back, so an entry present for the whole copy is in it exactly
/// once, whatever is inserted or deleted meanwhile. On an error the caller
/// walks by key instead.
fn copy_in_batches<K: Pod, V: Pod, T>(
    map: &BpfHashMap<MapData, K, V>,
    keep: &mut impl FnMut(K, V) -> Option<T>,
) -> io::Result<Vec<T>> {
    let capacity = map_capacity(map);
    let mut keys = vec![0u8; BATCH * size_of::<K>()];
    let mut values = vec![0u8; BATCH * size_of::<V>()];
    // The cursor is the kernel's (a bucket index for hash tables); room for
    // any key size it may use.
    let (mut cursor_in, mut cursor_out) = ([0u8; 64], [0u8; 64]);
    let mut out = Vec::new();
    let mut first = true;
    loop {
        let mut attr = BatchAttr {
            in_batch: if first { 0 } else { cursor_in.as_ptr() as u64 },
            out_batch: cursor_out.as_mut_ptr() as u64,
            keys: keys.as_mut_ptr() as u64,
            values: values.as_mut_ptr() as u64,
            count: BATCH as u32,
            map_fd: map.map().fd().as_fd().as_raw_fd() as u32,
            ..BatchAttr::default()
        };
        // SAFETY: the attribute points at buffers of `count` keys and values
        // and at two cursors, all ours and alive for the call.
        let rc = unsafe {
            libc::syscall(libc::SYS_bpf, BPF_MAP_LOOKUP_BATCH, &mut attr as *mut BatchAttr, size_of::<BatchAttr>())
        };
        let error = (rc < 0).then(io::Error::last_os_error);
        // ENOENT: the last batch, `count` entries (maybe none) in it.
        let done = matches!(&error, Some(e) if e.raw_os_error() == Some(libc::ENOENT));
        if let Some(e) = error
            && !done
        {
            return Err(e);
        }
        for i in 0..(attr.count as usize).min(BATCH) {
            // SAFETY: the kernel wrote `count` packed keys and values; K and V
            // are plain old data and the reads are unaligned.
            let (k, v) = unsafe {
                (
                    std::ptr::read_unaligned(keys.as_ptr().add(i * size_of::<K>()).cast::<K>()),
                    std::ptr::read_unaligned(values.as_ptr().add(i * size_of::<V>()).cast::<V>()),
                )
            };
            out.extend(keep(k, v));
        }
        // Bounded like the walk by key, should a kernel keep answering.
        if done || out.len() > 2 * capacity {
            return Ok(out);
        }
        cursor_in = cursor_out;
        first = false;
    }
}

/// The table a key at a time. Keys deleted while we walk make the kernel
/// restart the walk, so keys are de-duplicated and the walk is bounded by the
/// table's capacity.
fn copy_by_key<K: Pod + Eq + Hash, V: Pod, T>(
    map: &BpfHashMap<MapData, K, V>,
    keep: &mut impl FnMut(K, V) -> Option<T>,
) -> Vec<T> {
    let cap = map_capacity(map);
    let mut seen = HashSet::new();
    let mut out = Vec::new();
    for key in map.keys().take(2 * cap) {
        let Ok(key) = key else { break };
        if seen.insert(key)
            && let Ok(value) = map.get(&key, 0)
        {
            out.extend(keep(key, value));
        }
    }
    out
}

/// Commands on one element, from uapi `linux/bpf.h`.
const BPF_MAP_LOOKUP_ELEM: libc::c_long = 1;
const BPF_MAP_DELETE_ELEM: libc::c_long = 3;
const BPF_MAP_LOOKUP_AND_DELETE_ELEM: libc::c_long = 21;
/// The kernel's own "not supported" (`ENOTSUPP`, not a libc errno): what
/// `BPF_MAP_LOOKUP_AND_DELETE_ELEM` on a hash table returns before 5.14.
const ENOTSUPP: i32 = 524;

/// The `elem` member of uapi `union bpf_attr`.
#[repr(C)]
#[derive(Default)]
struct ElemAttr {
    map_fd: u32,
    _pad0: u32,
    key: u64,
    value: u64,
    flags: u64,
}

/// Whether this kernel refused `BPF_MAP_LOOKUP_AND_DELETE_ELEM` on a hash
/// table once: then `take` reads and deletes in two calls from the start.
static NO_LOOKUP_AND_DELETE: AtomicBool = AtomicBool::new(false);

/// `cmd` on `key`'s element, with `value` (a buffer of the map's value size,
/// or null); `Ok(false)`: no such entry.
fn elem<K: Pod, V: Pod>(
    cmd: libc::c_long,
    map: &BpfHashMap<MapData, K, V>,
    key: &K,
    value: *mut V,
) -> io::Result<bool> {
    let mut attr = ElemAttr {
        map_fd: map.map().fd().as_fd().as_raw_fd() as u32,
        key: (key as *const K) as u64,
        value: value as u64,
        ..ElemAttr::default()
    };
    // SAFETY: the attribute points at a key and (if any) a value buffer of
    // the map's sizes (K and V are the map's types), alive for the call.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, cmd, &mut attr as *mut ElemAttr, size_of::<ElemAttr>()) };
    if rc < 0 {
        let e = io::Error::last_os_error();
        return if e.raw_os_error() == Some(libc::ENOENT) { Ok(false) } else { Err(e) };
    }
    Ok(true)
}

/// Removes `key`'s entry and returns its value as it was when removed, in one
/// system call: nothing the kernel adds between a read and a delete is lost,
/// and an ended UDP flow costs one call instead of two. `None`: no such entry.
/// Hash tables support that since Linux 5.14; before, the entry is read and
/// then deleted, and a datagram the kernel counts in between (on a flow that
/// has been idle for the whole timeout, or whose socket is being released)
/// is lost. Only the delete that succeeds returns the value, so a flow
/// another path took out meanwhile is never reported twice.
pub fn take<K: Pod, V: Pod>(map: &BpfHashMap<MapData, K, V>, key: &K) -> io::Result<Option<V>> {
    let mut value = std::mem::MaybeUninit::<V>::uninit();
    if !NO_LOOKUP_AND_DELETE.load(Ordering::Relaxed) {
        match elem(BPF_MAP_LOOKUP_AND_DELETE_ELEM, map, key, value.as_mut_ptr()) {
            Err(e) if e.raw_os_error() == Some(ENOTSUPP) => NO_LOOKUP_AND_DELETE.store(true, Ordering::Relaxed),
            Err(e) => return Err(e),
            Ok(false) => return Ok(None),
            // SAFETY: the kernel wrote the whole value; V is plain old data.
            Ok(true) => return Ok(Some(unsafe { value.assume_init() })),
        }
    }
    if !elem(BPF_MAP_LOOKUP_ELEM, map, key, value.as_mut_ptr())? {
        return Ok(None);
    }
    if !elem(BPF_MAP_DELETE_ELEM, map, key, std::ptr::null_mut())? {
        return Ok(None);
    }
    // SAFETY: the lookup wrote the whole value; V is plain old data.
    Ok(Some(unsafe { value.assume_init() }))
}

pub fn map_capacity<K: Pod, V: Pod>(map: &BpfHashMap<MapData, K, V>) -> usize {
    // The kernel's own answer; the declared default if it cannot say.
    map.map().info().map_or(65_536, |info| info.max_entries() as usize)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A real kernel table (creating one needs root, as CI and
    /// `cargo xtask test` run): both ways of copying it give every entry
    /// once, with its value.
    #[test]
    fn batches_and_keys_copy_the_same_entries() {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("skipped: creating a BPF map needs root");
            return;
        }
        let mut map = BpfHashMap::<MapData, u64, [u64; 14]>::create(20_000, 0).expect("creating a BPF hash map");
        // More than one batch, and room left in the table.
        for k in 0..9_000u64 {
            map.insert(k * 7919, [k; 14], 0).unwrap();
        }
        let mut batches = copy_in_batches(&map, &mut |k, v: [u64; 14]| Some((k, v[13]))).expect("BPF_MAP_LOOKUP_BATCH");
        let mut keys = copy_by_key(&map, &mut |k, v: [u64; 14]| Some((k, v[13])));
        batches.sort_unstable();
        keys.sort_unstable();
        let expected: Vec<_> = (0..9_000u64).map(|k| (k * 7919, k)).collect();
        assert_eq!(batches, expected);
        assert_eq!(keys, expected);
        assert_eq!(map_capacity(&map), 20_000);
        assert_eq!(copy(&map).len(), 9_000);
        // One entry out, with its value; then it is gone.
        assert_eq!(take(&map, &(5 * 7919)).unwrap(), Some([5; 14]));
        assert_eq!(take(&map, &(5 * 7919)).unwrap(), None);
        assert!(map.get(&(5 * 7919), 0).is_err());
        assert_eq!(copy(&map).len(), 8_999);
        // The caller keeps what it wants of each entry: the odd ones but 5.
        assert_eq!(copy_as(&map, |k, v| (v[0] % 2 == 1).then_some(k)).len(), 4_499);
    }
}
