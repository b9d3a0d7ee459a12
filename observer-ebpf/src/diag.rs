//! Diagnostics of rare events, written through aya-log into the observer's own
//! log: a kernel table full, a session whose close no hook saw, a connection
//! adopted mid-life, a call on a TCP socket in a state no session is in.
//!
//! Off unless the loader set `LOG_DIAGNOSTICS` (the observer does when its log
//! filter lets debug records of target `observer_ebpf` through). Each place
//! asks `on()` first: one load of a frozen read-only global, which the verifier
//! reads as a constant, so when off it prunes the branch and the program runs
//! none of it. The records themselves are built in the functions below, kept
//! out of line so that their stack never adds to the hook's own.
//!
//! Each kind is logged the first time only: the metrics count every one
//! (`observer_events_lost_total`), the log shows what the first looked like.
use aya_ebpf::{macros::map, maps::Array};
use aya_log_ebpf::debug;

/// Written by the loader (see the module docs); 0 is off.
// SAFETY: the only symbol named `LOG_DIAGNOSTICS`, which the loader writes by name.
#[unsafe(no_mangle)]
static LOG_DIAGNOSTICS: u32 = 0;

/// Whether the loader switched diagnostics on.
#[inline(always)]
pub fn on() -> bool {
    // SAFETY: a reference to a static is a valid, aligned pointer to an
    // initialised u32; volatile so the loader's value is read, not the zero.
    unsafe { core::ptr::read_volatile(&LOG_DIAGNOSTICS) != 0 }
}

/// The kinds of event, each logged once (`LOGGED`).
#[derive(Clone, Copy)]
enum Event {
    SessionTableFull,
    UdpFlowTableFull,
    UdpSocketTableFull,
    DropTableFull,
    SessionCloseMissed,
    Adopted,
    UnexpectedState,
}
const EVENTS: u32 = Event::UnexpectedState as u32 + 1;

/// Per `Event`: 1 once it has been logged. Touched only when diagnostics are on.
#[map(name = "DIAG_LOGGED")]
static LOGGED: Array<u32> = Array::with_max_entries(EVENTS, 0);

/// Whether this is the first `event`, marking it seen. Two CPUs racing on the
/// first one may both log it; nothing worse.
#[inline(always)]
fn first(event: Event) -> bool {
    let Some(seen) = LOGGED.get_ptr_mut(event as u32) else { return false };
    // SAFETY: the value of a successful lookup (see `maps`, "Map values").
    let seen = unsafe { &mut *seen };
    let first = *seen == 0;
    *seen = 1;
    first
}

/// aya-log-ebpf 0.2 takes a program context but does not use it (its records
/// go to its own ring map), so the functions below, called deep inside the
/// hooks, pass this instead of threading the context down.
const NO_CTX: &() = &();
/// The target of every record, which the observer's log filter selects.
const TARGET: &str = "observer_ebpf";

/// `OPEN_SESSIONS` had no room for a new session (or an adopted one).
#[inline(never)]
pub fn session_table_full(local_port: u16, remote_port: u16, state: i32) {
    if first(Event::SessionTableFull) {
        debug!(
            NO_CTX,
            target: TARGET,
            "kernel table full (first time; the rest count in observer_events_lost_total{{source=\"session_table_full\"}}): table=OPEN_SESSIONS local_port={} remote_port={} state={}",
            local_port,
            remote_port,
            state
        );
    }
}

/// `UDP_FLOWS` had no room for a new flow.
#[inline(never)]
pub fn udp_flow_table_full(local_port: u16, peer_port: u16) {
    if first(Event::UdpFlowTableFull) {
        debug!(
            NO_CTX,
            target: TARGET,
            "kernel table full (first time; the rest count in observer_events_lost_total{{source=\"udp_flow_table_full\"}}): table=UDP_FLOWS local_port={} peer_port={}",
            local_port,
            peer_port
        );
    }
}

/// `UDP_SOCKETS` had no room for a new flow's socket.
#[inline(never)]
pub fn udp_socket_table_full(local_port: u16, peer_port: u16) {
    if first(Event::UdpSocketTableFull) {
        debug!(
            NO_CTX,
            target: TARGET,
            "kernel table full (first time; the rest count in observer_events_lost_total{{source=\"udp_socket_table_full\"}}): table=UDP_SOCKETS local_port={} peer_port={}",
            local_port,
            peer_port
        );
    }
}

/// `DROPS` had no room for a new (kind, reason, interface, namespace).
#[inline(never)]
pub fn drop_table_full(kind: u32, reason: u32, ifindex: u32) {
    if first(Event::DropTableFull) {
        debug!(
            NO_CTX,
            target: TARGET,
            "kernel table full (first time; the rest count in observer_events_lost_total{{source=\"drop_table_full\"}}): table=DROPS kind={} reason={} ifindex={}",
            kind,
            reason,
            ifindex
        );
    }
}

/// A new socket found the entry of an earlier one at its address, whose close
/// no hook saw; `pid` owned that session, which moved `tx` and `rx` bytes.
#[inline(never)]
pub fn session_close_missed(pid: u32, tx: u64, rx: u64) {
    if first(Event::SessionCloseMissed) {
        debug!(
            NO_CTX,
            target: TARGET,
            "session close missed (first time; the rest count in observer_events_lost_total{{source=\"session_close_missed\"}}): no hook saw it close, its socket's address is reused: pid={} bytes_tx={} bytes_rx={}",
            pid,
            tx,
            rx
        );
    }
}

/// A send or receive on a connection the table had no entry for: open before
/// the observer started, or born while the table was full.
#[inline(never)]
pub fn adopted(local_port: u16, remote_port: u16, state: i32) {
    if first(Event::Adopted) {
        debug!(
            NO_CTX,
            target: TARGET,
            "session adopted mid-life (first time): a call on an open connection with no entry: local_port={} remote_port={} state={}",
            local_port,
            remote_port,
            state
        );
    }
}

/// A send or receive on a TCP socket with no entry, in a state in which no
/// session is born or adopted (neither open nor CLOSE).
#[inline(never)]
pub fn unexpected_state(local_port: u16, remote_port: u16, state: i32) {
    if first(Event::UnexpectedState) {
        debug!(
            NO_CTX,
            target: TARGET,
            "unexpected socket state (first time): a call on an untracked TCP socket that is neither open nor closed: local_port={} remote_port={} state={}",
            local_port,
            remote_port,
            state
        );
    }
}
