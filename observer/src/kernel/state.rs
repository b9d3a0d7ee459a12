//! Kernel tables kept across restarts. The tables that give a session its
//! birth, owner and active time (`OPEN_SESSIONS`, `UDP_FLOWS`, `UDP_SOCKETS`)
//! and the two rings are pinned in bpffs under `--state-dir`, in a directory
//! of the layout version (`v<STATE_LAYOUT_VERSION>`). A new process of the same
//! layout reuses them, so sessions open across a restart keep their birth; a
//! pinned table of another layout (version, type, key or value size, or
//! capacity) is never handed to the programs: the whole state is discarded,
//! logged and counted (`observer_state_discarded_total{reason}`).
//!
//! No program runs between one process's exit and the next one's attach. The
//! socket probe (`obs_sock_probe`) lets the new process find entries whose
//! socket closed meanwhile: it reads, at each entry's kernel address, the
//! socket's family, state and `SOCK_DEAD` flag (`pipeline::Pipeline::sweep_gone`
//! reports those sessions once).
use std::{
    ffi::CString,
    fs::File,
    os::{fd::AsRawFd, unix::ffi::OsStrExt},
    path::{Path, PathBuf},
};

use aya::{
    Ebpf,
    maps::{Array, MapData, MapInfo, MapType},
    programs::RawTracePoint,
};
use observer_common::{
    AF_INET, AF_INET6, SESSIONS_RING_BYTES, SOCK_PROBE_SLOTS, STATE_LAYOUT_VERSION, SessionStart, SockProbe,
    UDP_RELEASES_RING_BYTES, UdpFlow, UdpFlowKey, UdpSocketFlows, session_mark, tcp_state,
};

use crate::error::Error;

/// Default `--state-dir`: where bpffs is mounted on every systemd host, under
/// a name of our own.
pub const DEFAULT_STATE_DIR: &str = "/sys/fs/bpf/observer";

/// The program that answers the socket probe, attached only for the sweep.
pub const SOCK_PROBE_PROGRAM: &str = "obs_sock_probe";

/// `statfs` type of bpffs (uapi `linux/magic.h`).
const BPF_FS_MAGIC: u32 = 0xcafe_4a11;

/// Why pinned state was discarded: the `reason` of
/// `observer_state_discarded_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Discard {
    /// A directory of another layout version (an older or newer observer).
    LayoutVersion,
    /// A pinned table of this version whose type, key or value size differs.
    MapLayout,
    /// A pinned table whose capacity differs from `--max-sessions` or
    /// `--max-udp-flows` (a table's size cannot change once created).
    Capacity,
}

impl Discard {
    pub const ALL: [Discard; 3] = [Discard::LayoutVersion, Discard::MapLayout, Discard::Capacity];

    pub fn as_str(self) -> &'static str {
        match self {
            Discard::LayoutVersion => "layout_version",
            Discard::MapLayout => "map_layout",
            Discard::Capacity => "capacity",
        }
    }
}

/// What a pinned table must be for this build to reuse it.
#[derive(Clone, Debug, PartialEq)]
pub struct Layout {
    pub name: &'static str,
    pub map_type: MapType,
    pub key_size: u32,
    pub value_size: u32,
    pub max_entries: u32,
}

/// The pinned tables and their layouts at these capacities.
pub fn layouts(max_sessions: u32, max_udp_flows: u32) -> Vec<Layout> {
    let size = |n: usize| n as u32;
    let hash = |name, key_size, value_size, max_entries| Layout {
        name,
        map_type: MapType::Hash,
        key_size,
        value_size,
        max_entries,
    };
    let ring =
        |name, bytes| Layout { name, map_type: MapType::RingBuf, key_size: 0, value_size: 0, max_entries: bytes };
    vec![
        hash("OPEN_SESSIONS", 8, size(size_of::<SessionStart>()), max_sessions),
        hash("UDP_FLOWS", size(size_of::<UdpFlowKey>()), size(size_of::<UdpFlow>()), max_udp_flows),
        hash("UDP_SOCKETS", 8, size(size_of::<UdpSocketFlows>()), max_udp_flows),
        ring("SESSIONS", SESSIONS_RING_BYTES),
        ring("UDP_RELEASES", UDP_RELEASES_RING_BYTES),
    ]
}

/// The name of this build's directory under the state directory.
pub fn version_dir_name() -> String {
    format!("v{STATE_LAYOUT_VERSION}")
}

/// Whether `name` is a layout directory of some observer version (`v<N>`).
fn is_version_dir(name: &str) -> bool {
    name.strip_prefix('v').is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
}

/// The state directory in use: locked for this process (a second observer on
/// the same directory is refused), with what was found there.
#[derive(Debug)]
pub struct StateDir {
    /// `--state-dir`/v<N>: where the tables are pinned.
    pub dir: PathBuf,
    /// Whether pinned tables of this layout were found and will be reused.
    pub reused: bool,
    /// State discarded, with why and a line of detail.
    pub discarded: Vec<(Discard, String)>,
    /// The lock on `--state-dir`, released by the kernel at exit however the
    /// process ends (SIGKILL included).
    _lock: File,
}

/// Opens (creating it) and locks the state directory `root`, discards
/// whatever of it this build must not read, and says whether tables are left
/// to reuse. Errors are the user's to fix (exit 2): not bpffs, locked by
/// another observer, not creatable.
pub fn prepare(root: &Path, expected: &[Layout]) -> Result<StateDir, Error> {
    let lock = open_locked(root, true)?;
    let mut discarded = Vec::new();
    let own = version_dir_name();
    for entry in read_dir(root)? {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name != own && is_version_dir(&name) && entry.path().is_dir() {
            remove_version_dir(&entry.path())?;
            discarded.push((Discard::LayoutVersion, format!("{name} is another layout version than {own}")));
        }
    }
    let dir = root.join(&own);
    let mut reused = false;
    if dir.is_dir() {
        match mismatch(&dir, expected) {
            Some((why, detail)) => {
                remove_version_dir(&dir)?;
                discarded.push((why, detail));
            }
            None => reused = expected.iter().any(|l| dir.join(l.name).exists()),
        }
    }
    std::fs::create_dir_all(&dir).map_err(|e| Error::Usage(format!("cannot create {}: {e}", dir.display())))?;
    Ok(StateDir { dir, reused, discarded, _lock: lock })
}

/// The first pinned table in `dir` that this build must not reuse, and why.
/// A pin that cannot be read as a map counts as another layout.
fn mismatch(dir: &Path, expected: &[Layout]) -> Option<(Discard, String)> {
    for want in expected {
        let path = dir.join(want.name);
        if !path.exists() {
            continue;
        }
        let info = match MapInfo::from_pin(&path) {
            Ok(info) => info,
            Err(e) => return Some((Discard::MapLayout, format!("{}: not a map ({e})", path.display()))),
        };
        let map_type = info.map_type().ok();
        let found = (map_type, info.key_size(), info.value_size());
        if found != (Some(want.map_type), want.key_size, want.value_size) {
            return Some((
                Discard::MapLayout,
                format!(
                    "{}: type {map_type:?}, key {} bytes, value {} bytes; this build needs {:?}, {} and {}",
                    want.name,
                    info.key_size(),
                    info.value_size(),
                    want.map_type,
                    want.key_size,
                    want.value_size
                ),
            ));
        }
        if info.max_entries() != want.max_entries {
            return Some((
                Discard::Capacity,
                format!("{}: {} entries; this run asks for {}", want.name, info.max_entries(), want.max_entries),
            ));
        }
    }
    None
}

/// Removes the pinned state under `root` (`observer cleanup`): every layout
/// directory (`v<N>`) and what is pinned in it, then `root` itself if that
/// leaves it empty. Nothing else is touched. Refused while an observer holds
/// the directory. Returns what was removed.
pub fn cleanup(root: &Path) -> Result<Vec<PathBuf>, Error> {
    if !root.exists() {
        return Ok(Vec::new());
    }
    let lock = open_locked(root, false)?;
    let mut removed = Vec::new();
    for entry in read_dir(root)? {
        let name = entry.file_name().to_string_lossy().into_owned();
        if is_version_dir(&name) && entry.path().is_dir() {
            removed.extend(remove_version_dir(&entry.path())?);
            removed.push(entry.path());
        }
    }
    drop(lock);
    if read_dir(root)?.is_empty() && std::fs::remove_dir(root).is_ok() {
        removed.push(root.to_path_buf());
    }
    Ok(removed)
}

fn read_dir(dir: &Path) -> Result<Vec<std::fs::DirEntry>, Error> {
    let entries = std::fs::read_dir(dir).map_err(|e| Error::Usage(format!("cannot read {}: {e}", dir.display())))?;
    entries.collect::<Result<_, _>>().map_err(|e| Error::Usage(format!("cannot read {}: {e}", dir.display())))
}

/// Removes a layout directory and the pins in it; returns the pins.
fn remove_version_dir(dir: &Path) -> Result<Vec<PathBuf>, Error> {
    let mut removed = Vec::new();
    for entry in read_dir(dir)? {
        let path = entry.path();
        std::fs::remove_file(&path).map_err(|e| Error::Other(format!("cannot remove {}: {e}", path.display())))?;
        removed.push(path);
    }
    std::fs::remove_dir(dir).map_err(|e| Error::Other(format!("cannot remove {}: {e}", dir.display())))?;
    Ok(removed)
}

/// Opens `root` (creating it when `create`), checks that it is on bpffs and
/// takes its lock: one observer per state directory.
fn open_locked(root: &Path, create: bool) -> Result<File, Error> {
    if create {
        std::fs::create_dir_all(root).map_err(|e| {
            Error::Usage(format!(
                "cannot create state directory {}: {e} (--state-dir must be on a mounted bpf filesystem; \
                 --state-dir '' keeps no state)",
                root.display()
            ))
        })?;
    }
    if !on_bpffs(root) {
        return Err(Error::Usage(format!(
            "state directory {} is not on a bpf filesystem (mount one with `mount -t bpf bpf /sys/fs/bpf`, \
             or run with --state-dir '' to keep no state across restarts)",
            root.display()
        )));
    }
    let dir = File::open(root).map_err(|e| Error::Usage(format!("cannot open {}: {e}", root.display())))?;
    // SAFETY: flock on a descriptor we own; no memory is passed.
    if unsafe { libc::flock(dir.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let e = std::io::Error::last_os_error();
        return Err(Error::Usage(if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
            format!("state directory {} is in use by another observer process", root.display())
        } else {
            format!("cannot lock state directory {}: {e}", root.display())
        }));
    }
    Ok(dir)
}

/// Whether `path` is on a bpf filesystem.
pub fn on_bpffs(path: &Path) -> bool {
    let Ok(c) = CString::new(path.as_os_str().as_bytes()) else { return false };
    // SAFETY: statfs writes into the struct we own; `c` is a valid C string.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    (unsafe { libc::statfs(c.as_ptr(), &mut st) } == 0) && st.f_type as u32 == BPF_FS_MAGIC
}

/// What the socket probe read at one address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SockFacts {
    pub family: u16,
    pub state: u8,
    pub dead: bool,
    pub read: bool,
    /// Local port << 16 | remote port.
    pub ports: u32,
}

impl SockFacts {
    fn is_inet(&self) -> bool {
        self.read && (self.family == AF_INET || self.family == AF_INET6)
    }

    /// Whether an `OPEN_SESSIONS` entry's socket is gone: what is at its
    /// address is no inet socket in a connection's state. A socket reaches
    /// TCP_CLOSE before it is freed, and its memory keeps saying so until
    /// another TCP socket takes it; the state program runs before the state
    /// is stored, so a close seen here was not seen by the programs now
    /// attached. A listener there is another socket.
    /// A socket there with other ports than the entry recorded at its first
    /// call (`placed`: `SessionStart::ports`) is a new socket that took the
    /// address after the session's closed: gone too.
    pub fn tcp_gone(&self, start: &SessionStart) -> bool {
        let state = i32::from(self.state);
        let placed = start.marks[session_mark::PLACED] != 0;
        !self.is_inet()
            || state == 0
            || state == tcp_state::CLOSE
            || state == tcp_state::LISTEN
            || state > 11
            || (placed && self.ports != start.ports)
    }

    /// Whether a `UDP_SOCKETS` entry's socket was released (`SOCK_DEAD`), or
    /// the socket there now has another local port than its flows
    /// (`local_port`, 0 when unknown): a new socket at the address.
    pub fn udp_gone(&self, local_port: u16) -> bool {
        !self.is_inet() || self.dead || (local_port != 0 && (self.ports >> 16) as u16 != local_port)
    }
}

/// The socket probe, attached: see the module's documentation.
pub struct SocketProbe {
    map: Array<MapData, SockProbe>,
}

impl SocketProbe {
    /// Loads and attaches `obs_sock_probe` and takes its map.
    pub fn attach(ebpf: &mut Ebpf) -> Result<Self, String> {
        let program: &mut RawTracePoint = ebpf
            .program_mut(SOCK_PROBE_PROGRAM)
            .ok_or("the kernel object has no socket probe")?
            .try_into()
            .map_err(|e| format!("{e}"))?;
        program.load().map_err(|e| format!("loading {SOCK_PROBE_PROGRAM}: {}", crate::kernel::loader::chain(&e)))?;
        program
            .attach("task_rename")
            .map_err(|e| format!("attaching {SOCK_PROBE_PROGRAM}: {}", crate::kernel::loader::chain(&e)))?;
        let map = ebpf.take_map("SOCK_PROBE").ok_or("the kernel object has no map SOCK_PROBE")?;
        let map = Array::try_from(map).map_err(|e| format!("map SOCK_PROBE: {e}"))?;
        Ok(SocketProbe { map })
    }

    /// Detaches and unloads the program.
    pub fn detach(self, ebpf: &mut Ebpf) {
        if let Some(Ok(p)) = ebpf.program_mut(SOCK_PROBE_PROGRAM).map(<&mut RawTracePoint>::try_from) {
            let _ = p.unload();
        }
    }

    /// What is at each of `sks` now, in order.
    pub fn probe(&mut self, sks: &[u64]) -> Result<Vec<SockFacts>, String> {
        let mut facts = Vec::with_capacity(sks.len());
        // SAFETY: gettid has no preconditions.
        let tid = unsafe { libc::gettid() } as u32;
        for chunk in sks.chunks(SOCK_PROBE_SLOTS) {
            let mut p = SockProbe {
                tid,
                count: chunk.len() as u32,
                sk: [0; SOCK_PROBE_SLOTS],
                family: [0; SOCK_PROBE_SLOTS],
                state: [0; SOCK_PROBE_SLOTS],
                dead: [0; SOCK_PROBE_SLOTS],
                read: [0; SOCK_PROBE_SLOTS],
                ports: [0; SOCK_PROBE_SLOTS],
            };
            p.sk[..chunk.len()].copy_from_slice(chunk);
            self.map.set(0, p, 0).map_err(|e| format!("arming the socket probe: {e}"))?;
            rename_this_thread()?;
            let p = self.map.get(&0, 0).map_err(|e| format!("reading the socket probe: {e}"))?;
            if p.tid != 0 {
                return Err("the socket probe did not run (task:task_rename did not fire)".into());
            }
            facts.extend((0..chunk.len()).map(|i| SockFacts {
                family: p.family[i],
                state: p.state[i],
                dead: p.dead[i] != 0,
                read: p.read[i] != 0,
                ports: p.ports[i],
            }));
        }
        Ok(facts)
    }
}

/// Sets this thread's name to what it is: the kernel fires
/// `task:task_rename` all the same.
fn rename_this_thread() -> Result<(), String> {
    let mut name = [0u8; 16];
    // SAFETY: PR_GET_NAME writes at most 16 bytes into `name`; PR_SET_NAME
    // reads a NUL-terminated string of at most 16 bytes from it.
    let ok = unsafe {
        libc::prctl(libc::PR_GET_NAME, name.as_mut_ptr()) == 0 && libc::prctl(libc::PR_SET_NAME, name.as_ptr()) == 0
    };
    if ok { Ok(()) } else { Err(format!("prctl(PR_SET_NAME): {}", std::io::Error::last_os_error())) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_directories_are_recognised() {
        assert_eq!(version_dir_name(), format!("v{STATE_LAYOUT_VERSION}"));
        for name in ["v0", "v1", "v12"] {
            assert!(is_version_dir(name), "{name}");
        }
        for name in ["v", "va", "v1x", "OPEN_SESSIONS", "x1", ""] {
            assert!(!is_version_dir(name), "{name}");
        }
    }

    #[test]
    fn gone_sockets_are_told_from_live_ones() {
        let f = |family, state, dead, read| SockFacts { family, state, dead, read, ports: 0x1234_0050 };
        let mut start = SessionStart { birth_ns: 1, ..SessionStart::EMPTY };
        let s = &start;
        for state in [1, 2, 3, 4, 5, 6, 8, 9, 11] {
            assert!(!f(AF_INET, state, false, true).tcp_gone(s), "state {state}");
            assert!(!f(AF_INET6, state, true, true).tcp_gone(s), "an orphan closing is alive: {state}");
        }
        assert!(f(AF_INET, 7, false, true).tcp_gone(s), "closed");
        assert!(f(AF_INET, 10, false, true).tcp_gone(s), "a listener is another socket");
        assert!(f(AF_INET, 0, false, true).tcp_gone(s) && f(AF_INET, 12, false, true).tcp_gone(s));
        assert!(f(0, 1, false, true).tcp_gone(s), "not an inet socket any more");
        assert!(f(AF_INET, 1, false, false).tcp_gone(s), "unreadable");
        // Placed: the ports must be the session's.
        start.marks[session_mark::PLACED] = 1;
        start.ports = 0x1234_0050;
        assert!(!f(AF_INET, 1, false, true).tcp_gone(&start), "the same socket");
        start.ports = 0x1235_0050;
        assert!(f(AF_INET, 1, false, true).tcp_gone(&start), "a new socket at the address");
        assert!(!f(AF_INET, 7, false, true).udp_gone(0x1234), "an unconnected UDP socket is in CLOSE");
        assert!(!f(AF_INET, 1, false, true).udp_gone(0), "local port unknown");
        assert!(f(AF_INET, 1, false, true).udp_gone(0x1235), "another socket at the address");
        assert!(f(AF_INET, 1, true, true).udp_gone(0x1234), "released");
        assert!(f(AF_INET6, 1, false, false).udp_gone(0x1234));
    }

    #[test]
    fn layouts_follow_the_shared_structs_and_the_capacities() {
        let l = layouts(100, 200);
        let names: Vec<&str> = l.iter().map(|l| l.name).collect();
        assert_eq!(names, ["OPEN_SESSIONS", "UDP_FLOWS", "UDP_SOCKETS", "SESSIONS", "UDP_RELEASES"]);
        assert_eq!((l[0].value_size, l[0].max_entries), (120, 100));
        assert_eq!((l[1].key_size, l[1].value_size, l[1].max_entries), (32, 96, 200));
        assert_eq!(l[2].max_entries, 200);
        assert_eq!((l[3].map_type, l[3].max_entries), (MapType::RingBuf, 4 << 20));
    }
}
