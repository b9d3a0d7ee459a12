//! Which kernel hook serves each concern: a pure function of what the running
//! kernel offers and of what the user forced with `--probes`.
//!
//! Detection (I/O) lives in `detect`; this module only decides, so every branch
//! is unit-tested without a kernel.
use std::{collections::BTreeSet, fmt};

/// `--probes`: let the observer choose, or force one tier for every concern.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ProbeMode {
    /// The cheapest hook the kernel offers, per concern.
    Auto,
    /// fentry/fexit (BPF trampolines; kernel 5.5+ with BTF, x86_64/arm64).
    Fentry,
    /// kprobe/kretprobe (CONFIG_KPROBES).
    Kprobe,
    /// BTF-typed tracepoints (tp_btf).
    Tracepoint,
}

/// A family of hooks that the kernel enables or refuses as a whole.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Tier {
    Fentry,
    Kprobe,
    Tracepoint,
}

impl Tier {
    pub const ALL: [Tier; 3] = [Tier::Fentry, Tier::Kprobe, Tier::Tracepoint];

    pub fn as_str(self) -> &'static str {
        match self {
            Tier::Fentry => "fentry",
            Tier::Kprobe => "kprobe",
            Tier::Tracepoint => "tracepoint",
        }
    }

    fn forced_by(mode: ProbeMode) -> Option<Tier> {
        match mode {
            ProbeMode::Auto => None,
            ProbeMode::Fentry => Some(Tier::Fentry),
            ProbeMode::Kprobe => Some(Tier::Kprobe),
            ProbeMode::Tracepoint => Some(Tier::Tracepoint),
        }
    }
}

/// What the observer needs a hook for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Concern {
    /// TCP session birth and close (required: without it nothing is measured).
    TcpState,
    /// The owning process of sessions the kernel created on its own (accepted
    /// connections). Optional: without it those sessions have no owner.
    TcpOwner,
    /// Every send and receive call: UDP flows, live TCP throughput and active
    /// time. Optional: without it there are no UDP sessions, TCP bytes count
    /// only at close, and active-time goodput is not measured.
    SockCalls,
    /// Socket release, which ends a UDP socket's flows. Optional: without it
    /// flows end only at their idle timeout.
    UdpRelease,
    /// Packet drops with the kernel's drop reason. Optional: without it
    /// there is no `observer_drops_total`.
    Drops,
    /// TCP retransmits and resets. Optional.
    TcpErrors,
}

impl Concern {
    pub const ALL: [Concern; 6] = [
        Concern::TcpState,
        Concern::TcpOwner,
        Concern::SockCalls,
        Concern::UdpRelease,
        Concern::Drops,
        Concern::TcpErrors,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Concern::TcpState => "tcp_state",
            Concern::TcpOwner => "tcp_owner",
            Concern::SockCalls => "sock_calls",
            Concern::UdpRelease => "udp_release",
            Concern::Drops => "drops",
            Concern::TcpErrors => "tcp_errors",
        }
    }

    pub fn required(self) -> bool {
        matches!(self, Concern::TcpState)
    }

    /// The concern `observer check` names `name`.
    pub fn from_name(name: &str) -> Option<Concern> {
        Concern::ALL.into_iter().find(|c| c.as_str() == name)
    }

    /// Concerns `--disable` may switch off, comma-separated, for messages.
    pub fn optional_names() -> String {
        let names: Vec<&str> = Concern::ALL.iter().filter(|c| !c.required()).map(|c| c.as_str()).collect();
        names.join(", ")
    }

    /// Candidate hooks, cheapest first per session. tcp_state: a tracepoint costs
    /// least and sees the handshake's child sockets, which `tcp_set_state` hooks
    /// only see from ESTABLISHED on. tcp_owner: one call per accept (fexit,
    /// kretprobe) beats one call per send and receive (tracepoints).
    /// sock_calls: the tracepoint (6.3+) runs in the socket layer's own send
    /// and receive path; fexit on the inet functions below it costs a
    /// trampoline more; a kprobe and a kretprobe per call cost most (two
    /// exceptions and a table write and delete per call). udp_release:
    /// fentry and the cgroup hook cost about the same; fentry first for a
    /// consistent tier, the cgroup hook where trampolines are refused.
    pub fn candidates(self) -> &'static [Hook] {
        match self {
            Concern::TcpState => &[Hook::StateTpBtf, Hook::StateFentry, Hook::StateKprobe],
            Concern::TcpOwner => &[Hook::OwnerFexit, Hook::OwnerKretprobe, Hook::OwnerTpBtf],
            Concern::SockCalls => &[Hook::CallsTpBtf, Hook::CallsFexit, Hook::CallsKprobe],
            Concern::UdpRelease => &[Hook::ReleaseFentry, Hook::ReleaseCgroup, Hook::ReleaseKprobe],
            // Tracepoints carry the drop reason and fire only on the drop
            // path; a function hook on kfree_skb_reason would see the same
            // at a similar cost, so only the tracepoint tier exists so far.
            Concern::Drops => &[Hook::DropsTpBtf],
            Concern::TcpErrors => &[Hook::TcpErrorsTpBtf],
        }
    }
}

/// How a program attaches.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Attach {
    /// tp_btf on the named tracepoint.
    BtfTracepoint(&'static str),
    FEntry(&'static str),
    FExit(&'static str),
    KProbe(&'static str),
    KRetProbe(&'static str),
    /// A cgroup v2 sock_addr program on the root cgroup.
    CgroupSockAddr,
    /// A cgroup v2 sock program (sock_release) on the root cgroup.
    CgroupSock,
}

impl Attach {
    /// The kernel object it needs: a tracepoint (`sock:name`) or a function.
    pub fn target(self) -> Target {
        match self {
            Attach::BtfTracepoint(tp) => Target::Tracepoint(tp),
            Attach::FEntry(f) | Attach::FExit(f) | Attach::KProbe(f) | Attach::KRetProbe(f) => Target::Function(f),
            Attach::CgroupSockAddr | Attach::CgroupSock => Target::Cgroup2,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Target {
    Tracepoint(&'static str),
    Function(&'static str),
    /// A mounted cgroup v2 hierarchy to attach cgroup programs to.
    Cgroup2,
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Target::Tracepoint(tp) => {
                // The tracepoint's system, for a message the user can look up.
                let system = match *tp {
                    "kfree_skb" => "skb",
                    t if t.starts_with("tcp_") => "tcp",
                    _ => "sock",
                };
                write!(f, "tracepoint {system}:{tp}")
            }
            Target::Function(func) => write!(f, "function {func}"),
            Target::Cgroup2 => write!(f, "cgroup v2 hierarchy mounted"),
        }
    }
}

const SOCK_CALL_TRACEPOINTS: [(&str, Attach); 2] =
    [("obs_send", Attach::BtfTracepoint("sock_send_length")), ("obs_recv", Attach::BtfTracepoint("sock_recv_length"))];

/// The end of the `sock_calls` hooks' labels ([`Hook::describe`]) naming the
/// UDP peer hooks, left out where UDP flows are not measured.
const UDP_PEER_LABEL: &str = "+cgroup/sendmsg+recvmsg";

/// The peers of unconnected UDP sockets, for `sock_calls` in every tier.
const UDP_PEER_HOOKS: [(&str, Attach); 4] = [
    ("obs_sendmsg4", Attach::CgroupSockAddr),
    ("obs_sendmsg6", Attach::CgroupSockAddr),
    ("obs_recvmsg4", Attach::CgroupSockAddr),
    ("obs_recvmsg6", Attach::CgroupSockAddr),
];

/// One way to serve a concern: a set of programs of one tier.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hook {
    StateTpBtf,
    StateFentry,
    StateKprobe,
    OwnerFexit,
    OwnerKretprobe,
    OwnerTpBtf,
    CallsTpBtf,
    CallsFexit,
    CallsKprobe,
    ReleaseFentry,
    ReleaseCgroup,
    ReleaseKprobe,
    DropsTpBtf,
    TcpErrorsTpBtf,
}

impl Hook {
    pub fn tier(self) -> Tier {
        match self {
            // cgroup programs are a stable ABI like tracepoints: same tier.
            Hook::StateTpBtf
            | Hook::OwnerTpBtf
            | Hook::CallsTpBtf
            | Hook::ReleaseCgroup
            | Hook::DropsTpBtf
            | Hook::TcpErrorsTpBtf => Tier::Tracepoint,
            Hook::StateFentry | Hook::OwnerFexit | Hook::CallsFexit | Hook::ReleaseFentry => Tier::Fentry,
            Hook::StateKprobe | Hook::OwnerKretprobe | Hook::CallsKprobe | Hook::ReleaseKprobe => Tier::Kprobe,
        }
    }

    /// The programs (name in the object, how to attach) this hook loads. A
    /// kprobe program may be listed more than once, attached to each function.
    pub fn programs(self) -> &'static [(&'static str, Attach)] {
        match self {
            // Each state hook comes with a backstop at socket destruction for
            // the closes it misses (`observer-ebpf` `on_destroy`). The kprobe
            // tier has none: the kernel skips every kprobe program on a CPU
            // while one runs there, so a second one would miss the same events.
            Hook::StateTpBtf => &[
                ("obs_state_btf", Attach::BtfTracepoint("inet_sock_set_state")),
                ("obs_destroy_btf", Attach::BtfTracepoint("tcp_destroy_sock")),
            ],
            Hook::StateFentry => &[
                ("obs_state_fe", Attach::FEntry("tcp_set_state")),
                ("obs_destroy_fe", Attach::FEntry("tcp_v4_destroy_sock")),
            ],
            Hook::StateKprobe => &[("obs_state_kp", Attach::KProbe("tcp_set_state"))],
            Hook::OwnerFexit => &[("obs_owner_fexit", Attach::FExit("inet_csk_accept"))],
            Hook::OwnerKretprobe => &[("obs_owner_kret", Attach::KRetProbe("inet_csk_accept"))],
            // The per-call programs also capture owners: tcp_owner and
            // sock_calls share them when both use the tracepoint tier.
            Hook::OwnerTpBtf => &SOCK_CALL_TRACEPOINTS,
            Hook::CallsTpBtf => &[
                SOCK_CALL_TRACEPOINTS[0],
                SOCK_CALL_TRACEPOINTS[1],
                UDP_PEER_HOOKS[0],
                UDP_PEER_HOOKS[1],
                UDP_PEER_HOOKS[2],
                UDP_PEER_HOOKS[3],
            ],
            // The functions `sock_sendmsg`/`sock_recvmsg` call through an
            // inet socket's ops (docs/kernels.md, "sock_calls").
            Hook::CallsFexit => &[
                ("obs_send_fx4", Attach::FExit("inet_sendmsg")),
                ("obs_send_fx6", Attach::FExit("inet6_sendmsg")),
                ("obs_recv_fx4", Attach::FExit("inet_recvmsg")),
                ("obs_recv_fx6", Attach::FExit("inet6_recvmsg")),
                UDP_PEER_HOOKS[0],
                UDP_PEER_HOOKS[1],
                UDP_PEER_HOOKS[2],
                UDP_PEER_HOOKS[3],
            ],
            Hook::CallsKprobe => &[
                ("obs_call_kp", Attach::KProbe("inet_sendmsg")),
                ("obs_call_kp", Attach::KProbe("inet6_sendmsg")),
                ("obs_call_kp", Attach::KProbe("inet_recvmsg")),
                ("obs_call_kp", Attach::KProbe("inet6_recvmsg")),
                ("obs_send_kret", Attach::KRetProbe("inet_sendmsg")),
                ("obs_send_kret", Attach::KRetProbe("inet6_sendmsg")),
                ("obs_recv_kret", Attach::KRetProbe("inet_recvmsg")),
                ("obs_recv_kret", Attach::KRetProbe("inet6_recvmsg")),
                ("obs_rbuf_kp", Attach::KProbe("tcp_cleanup_rbuf")),
                UDP_PEER_HOOKS[0],
                UDP_PEER_HOOKS[1],
                UDP_PEER_HOOKS[2],
                UDP_PEER_HOOKS[3],
            ],
            Hook::ReleaseFentry => &[("obs_release_fe", Attach::FEntry("inet_release"))],
            Hook::ReleaseCgroup => &[("obs_release_cg", Attach::CgroupSock)],
            Hook::ReleaseKprobe => &[("obs_release_kp", Attach::KProbe("inet_release"))],
            Hook::DropsTpBtf => &[("obs_kfree_skb", Attach::BtfTracepoint("kfree_skb"))],
            Hook::TcpErrorsTpBtf => &[
                ("obs_tcp_retrans", Attach::BtfTracepoint("tcp_retransmit_skb")),
                ("obs_tcp_rst_tx", Attach::BtfTracepoint("tcp_send_reset")),
                ("obs_tcp_rst_rx", Attach::BtfTracepoint("tcp_receive_reset")),
            ],
        }
    }

    /// Label value for `observer_probe_info{hook}` and `observer check`.
    pub fn describe(self) -> &'static str {
        match self {
            Hook::StateTpBtf => "tp_btf/inet_sock_set_state+tcp_destroy_sock",
            Hook::StateFentry => "fentry/tcp_set_state+tcp_v4_destroy_sock",
            Hook::StateKprobe => "kprobe/tcp_set_state",
            Hook::OwnerFexit => "fexit/inet_csk_accept",
            Hook::OwnerKretprobe => "kretprobe/inet_csk_accept",
            Hook::OwnerTpBtf => "tp_btf/sock_send_length+sock_recv_length",
            Hook::CallsTpBtf => "tp_btf/sock_send_length+sock_recv_length+cgroup/sendmsg+recvmsg",
            Hook::CallsFexit => "fexit/inet_sendmsg+inet6_sendmsg+inet_recvmsg+inet6_recvmsg+cgroup/sendmsg+recvmsg",
            Hook::CallsKprobe => {
                "kprobe+kretprobe/inet_sendmsg+inet6_sendmsg+inet_recvmsg+inet6_recvmsg+kprobe/tcp_cleanup_rbuf+cgroup/sendmsg+recvmsg"
            }
            Hook::ReleaseFentry => "fentry/inet_release",
            Hook::ReleaseCgroup => "cgroup/sock_release",
            Hook::ReleaseKprobe => "kprobe/inet_release",
            Hook::DropsTpBtf => "tp_btf/kfree_skb",
            Hook::TcpErrorsTpBtf => "tp_btf/tcp_retransmit_skb+tcp_send_reset+tcp_receive_reset",
        }
    }
}

/// The optional concerns switched off with `--disable`, and what follows from
/// them: `udp_release` only ends the UDP flows `sock_calls` measures, so it
/// is off with `sock_calls`; without `udp_release` nothing would end a
/// connected flow or free its socket's entry, so `sock_calls` then measures
/// no UDP (TCP calls only, without the UDP peer hooks, with the kernel
/// programs told to skip UDP sockets); `tcp_owner` cannot use the per-call
/// tracepoints when `sock_calls` is off, as they are `sock_calls`' programs.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Disabled {
    /// As the user named them (never `tcp_state`: the flag refuses it).
    asked: BTreeSet<Concern>,
}

impl Disabled {
    pub fn new(asked: &[Concern]) -> Self {
        Self { asked: asked.iter().copied().filter(|c| !c.required()).collect() }
    }

    /// Why `concern` is off, or `None` if it is not.
    pub fn why(&self, concern: Concern) -> Option<String> {
        if self.asked.contains(&concern) {
            return Some("switched off with --disable".into());
        }
        (concern == Concern::UdpRelease && self.asked.contains(&Concern::SockCalls))
            .then(|| "switched off with sock_calls (--disable): it only ends the UDP flows sock_calls measures".into())
    }

    /// Every concern that is off, asked for or following, in `Concern::ALL` order.
    pub fn concerns(&self) -> Vec<Concern> {
        Concern::ALL.into_iter().filter(|&c| self.why(c).is_some()).collect()
    }

    /// Whether UDP flows are measured: `sock_calls` and `udp_release` both on.
    pub fn measures_udp(&self) -> bool {
        self.why(Concern::UdpRelease).is_none()
    }

    /// The programs `hook` loads: [`Hook::programs`] without the UDP peer
    /// hooks when UDP flows are not measured.
    pub fn programs(&self, hook: Hook) -> impl Iterator<Item = (&'static str, Attach)> + '_ {
        hook.programs().iter().copied().filter(move |p| self.measures_udp() || !UDP_PEER_HOOKS.contains(p))
    }

    /// The label of `hook` for `observer_probe_info{hook}` and `observer
    /// check`: [`Hook::describe`], without the UDP peer hooks when they are
    /// not attached.
    pub fn label(&self, hook: Hook) -> &'static str {
        let full = hook.describe();
        if self.measures_udp() { full } else { full.strip_suffix(UDP_PEER_LABEL).unwrap_or(full) }
    }

    /// Why `hook` (of another concern) cannot be used: it runs the
    /// programs of `sock_calls`, which is off.
    fn shares_switched_off(&self, hook: Hook) -> Option<String> {
        if !self.asked.contains(&Concern::SockCalls) {
            return None;
        }
        let calls = Concern::SockCalls.candidates().iter().flat_map(|h| h.programs());
        let shared = calls.map(|(name, _)| name).any(|name| hook.programs().iter().any(|(n, _)| n == name));
        shared.then(|| format!("{}: these are sock_calls' programs, switched off with --disable", hook.describe()))
    }
}

/// What the running kernel offers, as found by `detect`.
#[derive(Clone, Debug, Default)]
pub struct KernelFacts {
    /// Per tier: `Err(reason)` when the kernel cannot run that tier at all.
    pub tiers: Vec<(Tier, Result<(), String>)>,
    /// Tracepoints and functions that exist in this kernel.
    pub targets: BTreeSet<Target>,
}

impl KernelFacts {
    fn tier(&self, tier: Tier) -> Result<(), String> {
        self.tiers.iter().find(|(t, _)| *t == tier).map(|(_, r)| r.clone()).unwrap_or_else(|| Err("not probed".into()))
    }

    /// Why `hook`, loading `disabled.programs(hook)`, cannot be used here,
    /// or `Ok` if it can.
    fn usable(&self, hook: Hook, disabled: &Disabled) -> Result<(), String> {
        self.tier(hook.tier()).map_err(|why| format!("{} unavailable: {why}", hook.tier().as_str()))?;
        for (_, attach) in disabled.programs(hook) {
            let target = attach.target();
            if !self.targets.contains(&target) {
                return Err(format!("kernel has no {target}"));
            }
        }
        Ok(())
    }
}

/// The decision for one concern.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Choice {
    pub concern: Concern,
    /// The chosen hook, or why each candidate was refused, or why the
    /// concern is switched off (then `disabled`).
    pub hook: Result<Hook, String>,
    /// Switched off with `--disable` (or following one that is, see
    /// [`Disabled`]): no hook was looked for.
    pub disabled: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Plan {
    pub choices: Vec<Choice>,
    pub disabled: Disabled,
}

impl Plan {
    pub fn hooks(&self) -> impl Iterator<Item = Hook> + '_ {
        self.choices.iter().filter_map(|c| c.hook.as_ref().ok().copied())
    }

    /// Whether `concern` has a hook.
    pub fn serves(&self, concern: Concern) -> bool {
        self.choices.iter().any(|c| c.concern == concern && c.hook.is_ok())
    }

    /// Required concerns left without a hook, with the reasons.
    pub fn missing_required(&self) -> Vec<&Choice> {
        self.choices.iter().filter(|c| c.concern.required() && c.hook.is_err()).collect()
    }
}

/// Picks a hook for every concern not `disabled`: the first usable
/// candidate in preference order, restricted to one tier when `mode` forces it.
pub fn select(facts: &KernelFacts, mode: ProbeMode, disabled: &Disabled) -> Plan {
    let forced = Tier::forced_by(mode);
    let choices = Concern::ALL
        .iter()
        .map(|&concern| {
            if let Some(why) = disabled.why(concern) {
                return Choice { concern, hook: Err(why), disabled: true };
            }
            let mut refused = Vec::new();
            let mut chosen = None;
            for &hook in concern.candidates() {
                if forced.is_some_and(|t| t != hook.tier()) {
                    continue;
                }
                if let Some(why) = disabled.shares_switched_off(hook) {
                    refused.push(why);
                    continue;
                }
                match facts.usable(hook, disabled) {
                    Ok(()) => {
                        chosen = Some(hook);
                        break;
                    }
                    Err(why) => refused.push(format!("{}: {why}", hook.describe())),
                }
            }
            let hook = chosen.ok_or_else(|| match forced {
                Some(t) if refused.is_empty() => format!("no {} hook exists for this", t.as_str()),
                _ => refused.join("; "),
            });
            Choice { concern, hook, disabled: false }
        })
        .collect();
    Plan { choices, disabled: disabled.clone() }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL_TARGETS: [Target; 18] = [
        Target::Tracepoint("kfree_skb"),
        Target::Tracepoint("tcp_retransmit_skb"),
        Target::Tracepoint("tcp_send_reset"),
        Target::Tracepoint("tcp_receive_reset"),
        Target::Tracepoint("inet_sock_set_state"),
        Target::Tracepoint("tcp_destroy_sock"),
        Target::Tracepoint("sock_send_length"),
        Target::Tracepoint("sock_recv_length"),
        Target::Function("tcp_set_state"),
        Target::Function("tcp_v4_destroy_sock"),
        Target::Function("inet_csk_accept"),
        Target::Function("inet_release"),
        Target::Function("inet_sendmsg"),
        Target::Function("inet6_sendmsg"),
        Target::Function("inet_recvmsg"),
        Target::Function("inet6_recvmsg"),
        Target::Function("tcp_cleanup_rbuf"),
        Target::Cgroup2,
    ];

    fn facts(fentry: bool, kprobe: bool, tracepoint: bool, targets: &[Target]) -> KernelFacts {
        let avail = |ok: bool, why: &str| if ok { Ok(()) } else { Err(why.to_string()) };
        KernelFacts {
            tiers: vec![
                (Tier::Fentry, avail(fentry, "EPERM")),
                (Tier::Kprobe, avail(kprobe, "no kprobes")),
                (Tier::Tracepoint, avail(tracepoint, "no BTF")),
            ],
            targets: targets.iter().copied().collect(),
        }
    }

    /// Every concern on, as without `--disable`.
    fn select_all(facts: &KernelFacts, mode: ProbeMode) -> Plan {
        select(facts, mode, &Disabled::default())
    }

    fn chosen(plan: &Plan, concern: Concern) -> Result<Hook, String> {
        plan.choices.iter().find(|c| c.concern == concern).unwrap().hook.clone()
    }

    #[test]
    fn auto_on_a_full_kernel_prefers_tracepoint_for_state_and_fexit_for_owner() {
        let plan = select_all(&facts(true, true, true, &ALL_TARGETS), ProbeMode::Auto);
        assert_eq!(chosen(&plan, Concern::TcpState), Ok(Hook::StateTpBtf));
        assert_eq!(chosen(&plan, Concern::TcpOwner), Ok(Hook::OwnerFexit));
        assert!(plan.missing_required().is_empty());
    }

    #[test]
    fn auto_on_this_machine_tracepoints_only() {
        // 6.18 VM: fentry refused, no kprobes, tp_btf works.
        let plan = select_all(&facts(false, false, true, &ALL_TARGETS), ProbeMode::Auto);
        assert_eq!(chosen(&plan, Concern::TcpState), Ok(Hook::StateTpBtf));
        assert_eq!(chosen(&plan, Concern::TcpOwner), Ok(Hook::OwnerTpBtf));
        assert_eq!(chosen(&plan, Concern::SockCalls), Ok(Hook::CallsTpBtf));
        assert_eq!(chosen(&plan, Concern::UdpRelease), Ok(Hook::ReleaseCgroup));
        assert_eq!(chosen(&plan, Concern::Drops), Ok(Hook::DropsTpBtf));
        assert_eq!(chosen(&plan, Concern::TcpErrors), Ok(Hook::TcpErrorsTpBtf));
        assert!(plan.serves(Concern::TcpErrors));
        let forced = select_all(&facts(false, false, true, &ALL_TARGETS), ProbeMode::Kprobe);
        assert!(!forced.serves(Concern::TcpErrors) && !forced.serves(Concern::TcpState));
    }

    #[test]
    fn drops_need_the_kfree_skb_tracepoint_and_are_optional() {
        let targets: Vec<Target> =
            ALL_TARGETS.iter().copied().filter(|t| *t != Target::Tracepoint("kfree_skb")).collect();
        let plan = select_all(&facts(false, false, true, &targets), ProbeMode::Auto);
        let why = chosen(&plan, Concern::Drops).unwrap_err();
        assert!(why.contains("tp_btf/kfree_skb: kernel has no tracepoint"), "{why}");
        assert!(plan.missing_required().is_empty());
        // Forcing a function tier leaves drops without a hook, not the run.
        let plan = select_all(&facts(true, true, true, &ALL_TARGETS), ProbeMode::Fentry);
        assert_eq!(chosen(&plan, Concern::Drops), Err("no fentry hook exists for this".into()));
        assert!(plan.missing_required().is_empty());
        // Without BTF tracepoints, neither drops nor TCP errors are measured.
        let plan = select_all(&facts(true, true, false, &ALL_TARGETS), ProbeMode::Auto);
        assert!(chosen(&plan, Concern::Drops).unwrap_err().contains("tracepoint unavailable: no BTF"));
        assert!(chosen(&plan, Concern::TcpErrors).is_err());
    }

    #[test]
    fn per_call_hooks_exist_in_every_tier() {
        let full = facts(true, true, true, &ALL_TARGETS);
        for (mode, calls, release) in [
            (ProbeMode::Fentry, Hook::CallsFexit, Hook::ReleaseFentry),
            (ProbeMode::Kprobe, Hook::CallsKprobe, Hook::ReleaseKprobe),
            (ProbeMode::Tracepoint, Hook::CallsTpBtf, Hook::ReleaseCgroup),
        ] {
            let plan = select_all(&full, mode);
            assert_eq!(chosen(&plan, Concern::SockCalls), Ok(calls), "{mode:?}");
            assert_eq!(chosen(&plan, Concern::UdpRelease), Ok(release), "{mode:?}");
            assert_eq!(calls.tier(), release.tier());
        }
    }

    #[test]
    fn per_call_hooks_before_6_3_take_fexit_then_kprobes() {
        // 5.10 to 6.2: no sock_send_length tracepoint.
        let old: Vec<Target> = ALL_TARGETS
            .iter()
            .copied()
            .filter(|t| !matches!(t, Target::Tracepoint("sock_send_length" | "sock_recv_length")))
            .collect();
        let plan = select_all(&facts(true, true, true, &old), ProbeMode::Auto);
        assert_eq!(chosen(&plan, Concern::SockCalls), Ok(Hook::CallsFexit));
        let plan = select_all(&facts(false, true, true, &old), ProbeMode::Auto);
        assert_eq!(chosen(&plan, Concern::SockCalls), Ok(Hook::CallsKprobe));
        // Forced tracepoints there: the reason names the missing tracepoint.
        let plan = select_all(&facts(true, true, true, &old), ProbeMode::Tracepoint);
        let why = chosen(&plan, Concern::SockCalls).unwrap_err();
        assert!(why.contains("kernel has no tracepoint sock:sock_send_length"), "{why}");
        // A kernel without IPv6 in its image (a module) has no inet6_* in vmlinux's BTF.
        let no_v6: Vec<Target> = old.iter().copied().filter(|t| *t != Target::Function("inet6_recvmsg")).collect();
        let plan = select_all(&facts(true, true, true, &no_v6), ProbeMode::Auto);
        let why = chosen(&plan, Concern::SockCalls).unwrap_err();
        assert!(why.contains("fexit/inet_sendmsg+") && why.contains("kprobe+kretprobe/inet_sendmsg+"), "{why}");
        assert!(why.contains("kernel has no function inet6_recvmsg"), "{why}");
        // Every tier needs the cgroup hooks for unconnected UDP peers.
        let no_cg: Vec<Target> = old.iter().copied().filter(|t| *t != Target::Cgroup2).collect();
        let plan = select_all(&facts(true, true, true, &no_cg), ProbeMode::Auto);
        assert!(chosen(&plan, Concern::SockCalls).unwrap_err().contains("no cgroup v2 hierarchy mounted"));
        // Optional concerns never block a run.
        assert!(plan.missing_required().is_empty());
    }

    #[test]
    fn a_kprobe_program_attached_to_several_functions_is_one_program() {
        let programs = Hook::CallsKprobe.programs();
        let entry: Vec<&Attach> = programs.iter().filter(|(n, _)| *n == "obs_call_kp").map(|(_, a)| a).collect();
        assert_eq!(entry.len(), 4);
        for (name, how) in programs {
            if let Attach::KRetProbe(f) = how {
                assert!(entry.contains(&&Attach::KProbe(f)), "{name}: a return probe without its entry probe on {f}");
            }
        }
    }

    #[test]
    fn release_without_cgroup2_falls_back_to_kprobe() {
        let targets: Vec<Target> = ALL_TARGETS.iter().copied().filter(|t| *t != Target::Cgroup2).collect();
        let plan = select_all(&facts(false, true, true, &targets), ProbeMode::Auto);
        assert_eq!(chosen(&plan, Concern::UdpRelease), Ok(Hook::ReleaseKprobe));
        let plan = select_all(&facts(false, false, true, &targets), ProbeMode::Auto);
        let why = chosen(&plan, Concern::UdpRelease).unwrap_err();
        assert!(why.contains("cgroup/sock_release: kernel has no cgroup v2 hierarchy mounted"), "{why}");
    }

    #[test]
    fn auto_without_fentry_takes_kretprobe_for_owner() {
        let plan = select_all(&facts(false, true, true, &ALL_TARGETS), ProbeMode::Auto);
        assert_eq!(chosen(&plan, Concern::TcpOwner), Ok(Hook::OwnerKretprobe));
    }

    #[test]
    fn auto_before_6_3_without_send_length_tracepoints_falls_back_for_owner() {
        let old = [
            Target::Tracepoint("inet_sock_set_state"),
            Target::Tracepoint("tcp_destroy_sock"),
            Target::Function("tcp_set_state"),
        ];
        let plan = select_all(&facts(false, false, true, &old), ProbeMode::Auto);
        assert_eq!(chosen(&plan, Concern::TcpState), Ok(Hook::StateTpBtf));
        let why = chosen(&plan, Concern::TcpOwner).unwrap_err();
        assert!(why.contains("fentry unavailable: EPERM"), "{why}");
        assert!(why.contains("kernel has no tracepoint sock:sock_send_length"), "{why}");
        // The owner is optional: run still works.
        assert!(plan.missing_required().is_empty());
    }

    #[test]
    fn auto_without_tp_btf_uses_function_hooks() {
        let plan = select_all(&facts(true, true, false, &ALL_TARGETS), ProbeMode::Auto);
        assert_eq!(chosen(&plan, Concern::TcpState), Ok(Hook::StateFentry));
        let plan = select_all(&facts(false, true, false, &ALL_TARGETS), ProbeMode::Auto);
        assert_eq!(chosen(&plan, Concern::TcpState), Ok(Hook::StateKprobe));
    }

    #[test]
    fn forcing_a_tier_uses_only_that_tier() {
        let full = facts(true, true, true, &ALL_TARGETS);
        for (mode, state, owner) in [
            (ProbeMode::Fentry, Hook::StateFentry, Hook::OwnerFexit),
            (ProbeMode::Kprobe, Hook::StateKprobe, Hook::OwnerKretprobe),
            (ProbeMode::Tracepoint, Hook::StateTpBtf, Hook::OwnerTpBtf),
        ] {
            let plan = select_all(&full, mode);
            assert_eq!(chosen(&plan, Concern::TcpState), Ok(state), "{mode:?}");
            assert_eq!(chosen(&plan, Concern::TcpOwner), Ok(owner), "{mode:?}");
        }
    }

    #[test]
    fn forcing_an_unavailable_tier_names_the_reason() {
        let plan = select_all(&facts(false, false, true, &ALL_TARGETS), ProbeMode::Fentry);
        let missing = plan.missing_required();
        assert_eq!(missing.len(), 1);
        let why = missing[0].hook.clone().unwrap_err();
        assert_eq!(why, "fentry/tcp_set_state+tcp_v4_destroy_sock: fentry unavailable: EPERM");
        let plan = select_all(&facts(false, false, true, &ALL_TARGETS), ProbeMode::Kprobe);
        assert!(chosen(&plan, Concern::TcpState).unwrap_err().contains("no kprobes"));
    }

    #[test]
    fn missing_function_refuses_the_hook_even_when_the_tier_works() {
        let targets = [Target::Function("inet_csk_accept")];
        let plan = select_all(&facts(true, true, false, &targets), ProbeMode::Auto);
        let why = chosen(&plan, Concern::TcpState).unwrap_err();
        assert!(why.contains("kernel has no function tcp_set_state"), "{why}");
        assert_eq!(plan.missing_required().len(), 1);
    }

    #[test]
    fn nothing_available_reports_every_candidate() {
        let plan = select_all(&facts(false, false, false, &[]), ProbeMode::Auto);
        let why = chosen(&plan, Concern::TcpState).unwrap_err();
        for part in ["tp_btf/inet_sock_set_state", "fentry/tcp_set_state", "kprobe/tcp_set_state"] {
            assert!(why.contains(part), "{why}");
        }
    }

    #[test]
    fn disabled_concerns_get_no_hook_and_say_why() {
        let full = facts(true, true, true, &ALL_TARGETS);
        let plan = select(&full, ProbeMode::Auto, &Disabled::new(&[Concern::Drops, Concern::TcpErrors]));
        for concern in [Concern::Drops, Concern::TcpErrors] {
            let choice = plan.choices.iter().find(|c| c.concern == concern).unwrap();
            assert!(choice.disabled, "{concern:?}");
            assert_eq!(choice.hook, Err("switched off with --disable".into()));
            assert!(!plan.serves(concern));
        }
        assert!(plan.choices.iter().filter(|c| c.disabled).count() == 2);
        assert!(plan.missing_required().is_empty());
        assert_eq!(chosen(&plan, Concern::SockCalls), Ok(Hook::CallsTpBtf));
        assert!(plan.disabled.measures_udp());
        assert_eq!(plan.disabled.label(Hook::CallsTpBtf), Hook::CallsTpBtf.describe());
        // tcp_state is never switched off, whatever the caller asks.
        assert_eq!(Disabled::new(&[Concern::TcpState]), Disabled::default());
    }

    #[test]
    fn sock_calls_off_takes_udp_release_and_the_shared_owner_tracepoints() {
        let disabled = Disabled::new(&[Concern::SockCalls]);
        assert_eq!(disabled.concerns(), [Concern::SockCalls, Concern::UdpRelease]);
        assert!(disabled.why(Concern::UdpRelease).unwrap().contains("only ends the UDP flows sock_calls measures"));
        assert!(!disabled.measures_udp());
        // This machine: fentry refused, no kprobes. The owner's only hook
        // would be sock_calls' own programs: none, with the reason.
        let plan = select(&facts(false, false, true, &ALL_TARGETS), ProbeMode::Auto, &disabled);
        let why = chosen(&plan, Concern::TcpOwner).unwrap_err();
        assert!(why.contains("tp_btf/sock_send_length+sock_recv_length: these are sock_calls' programs"), "{why}");
        assert!(!plan.choices.iter().find(|c| c.concern == Concern::TcpOwner).unwrap().disabled);
        assert!(plan.hooks().all(|h| disabled.programs(h).all(|(n, _)| !n.starts_with("obs_send"))));
        // With trampolines the owner keeps its own hook.
        let plan = select(&facts(true, true, true, &ALL_TARGETS), ProbeMode::Auto, &disabled);
        assert_eq!(chosen(&plan, Concern::TcpOwner), Ok(Hook::OwnerFexit));
    }

    #[test]
    fn udp_release_off_leaves_sock_calls_tcp_only() {
        let disabled = Disabled::new(&[Concern::UdpRelease]);
        assert_eq!(disabled.concerns(), [Concern::UdpRelease]);
        assert!(!disabled.measures_udp());
        for hook in [Hook::CallsTpBtf, Hook::CallsFexit, Hook::CallsKprobe] {
            assert!(hook.describe().ends_with(UDP_PEER_LABEL), "{hook:?}");
            let label = disabled.label(hook);
            assert!(!label.contains("cgroup") && hook.describe().starts_with(label), "{label}");
            let programs: Vec<_> = disabled.programs(hook).collect();
            assert_eq!(programs.len(), hook.programs().len() - UDP_PEER_HOOKS.len(), "{hook:?}");
            assert!(programs.iter().all(|p| !UDP_PEER_HOOKS.contains(p)), "{hook:?}");
        }
        // Without the peer hooks, sock_calls needs no cgroup v2 hierarchy.
        let no_cg: Vec<Target> = ALL_TARGETS.iter().copied().filter(|t| *t != Target::Cgroup2).collect();
        let plan = select(&facts(false, false, true, &no_cg), ProbeMode::Auto, &disabled);
        assert_eq!(chosen(&plan, Concern::SockCalls), Ok(Hook::CallsTpBtf));
        assert_eq!(chosen(&plan, Concern::TcpOwner), Ok(Hook::OwnerTpBtf));
        let all = select_all(&facts(false, false, true, &no_cg), ProbeMode::Auto);
        assert!(chosen(&all, Concern::SockCalls).is_err());
    }

    #[test]
    fn concern_names_round_trip() {
        for concern in Concern::ALL {
            assert_eq!(Concern::from_name(concern.as_str()), Some(concern));
        }
        assert_eq!(Concern::from_name("drop"), None);
        assert_eq!(Concern::optional_names(), "tcp_owner, sock_calls, udp_release, drops, tcp_errors");
    }
}
