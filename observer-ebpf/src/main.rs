//! observer's kernel programs.
//!
//! They only count and emit; all naming and aggregation happens in userspace.
//! Each concern has one program per hook tier; the loader loads only the ones it
//! selected for the running kernel (see `observer::probes`):
//!
//! | concern     | fentry tier             | kprobe tier                 | tracepoint tier                            |
//! |-------------|-------------------------|-----------------------------|--------------------------------------------|
//! | tcp_state   | fentry `tcp_set_state`  | kprobe `tcp_set_state`      | tp_btf `sock:inet_sock_set_state`          |
//! | tcp_owner   | fexit `inet_csk_accept` | kretprobe `inet_csk_accept` | tp_btf `sock:sock_{send,recv}_length` 6.3+ |
//! | sock_calls  | fexit `inet{,6}_{send,recv}msg` | kprobe + kretprobe `inet{,6}_{send,recv}msg`, kprobe `tcp_cleanup_rbuf` | tp_btf `sock:sock_{send,recv}_length` 6.3+ |
//! | udp_release | fentry `inet_release`   | kprobe `inet_release`       | cgroup `sock_release`                      |
//! | drops       | -                       | -                           | tp_btf `skb:kfree_skb`                     |
//! | tcp_errors  | -                       | -                           | tp_btf `tcp:tcp_retransmit_skb`, `tcp:tcp_{send,receive}_reset` |
//!
//! sock_calls takes cgroup `sendmsg{4,6}`/`recvmsg{4,6}` in every tier (peers of
//! unconnected UDP sockets). `obs_sock_probe` (raw tracepoint `task_rename`) is
//! attached only for the sweep at a start that reuses pinned tables.
//!
//! Program names start with `obs_` and stay under the kernel's 16-byte name
//! limit, so a program of ours can be recognised in the kernel's program list.
#![no_std]
#![no_main]
// `core::intrinsics::atomic_xadd`: the atomic add `kernel::add_shared` needs,
// which `AtomicU64` does not offer on a target without compare-and-swap.
#![feature(core_intrinsics)]
#![expect(internal_features, reason = "core_intrinsics, for the atomic add above")]

mod diag;
mod drops;
mod kernel;
mod maps;
mod session;
mod sock_calls;
mod sock_probe;
mod tcp_owner;
mod tcp_state;
mod udp;
mod udp_peer;
mod udp_release;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // The verifier rejects any path that could reach here.
    loop {}
}

// SAFETY: the one symbol named `LICENSE`, in the section the loader reads the
// program licence from (GPL-compatible, for GPL-only helpers).
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
