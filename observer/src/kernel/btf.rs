//! Facts read from the running kernel's BTF: structure field offsets for the
//! kernel programs, function prototypes and which tracepoints have BTF types.
//!
//! aya's own BTF parser keeps type lookup private, so this uses `btf-rs`.
use std::path::{Path, PathBuf};

use btf_rs::{Btf, Type};
use observer_common::KernelOffsets;

/// Where the kernel publishes its own BTF.
pub const DEFAULT_BTF_PATH: &str = "/sys/kernel/btf/vmlinux";

#[derive(Debug, thiserror::Error)]
pub enum BtfError {
    #[error(
        "cannot read kernel BTF from {path}: {source} (the kernel needs CONFIG_DEBUG_INFO_BTF=y, or give a BTF file with --btf)"
    )]
    Read {
        path: PathBuf,
        #[source]
        source: btf_rs::Error,
    },
    #[error("kernel BTF has no type `{ty}`")]
    NoType { ty: String },
    #[error("kernel BTF: `{ty}` has no field `{field}`")]
    NoField { ty: String, field: String },
    #[error("kernel BTF: `{ty}.{field}` is a bitfield; the programs can only read whole fields")]
    Bitfield { ty: String, field: String },
    #[error("kernel BTF: `{ty}.{field}` lies at {offset} bytes, beyond what the programs address")]
    TooFar { ty: String, field: String, offset: u64 },
    #[error("kernel BTF: {0}")]
    Parse(#[from] btf_rs::Error),
}

/// The running kernel's BTF.
pub struct KernelBtf {
    btf: Btf,
    path: PathBuf,
}

impl KernelBtf {
    pub fn open(path: &Path) -> Result<Self, BtfError> {
        let btf = Btf::from_file(path).map_err(|source| BtfError::Read { path: path.to_owned(), source })?;
        Ok(Self { btf, path: path.to_owned() })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// True when the kernel has a BTF-typed tracepoint `name` (the
    /// `btf_trace_<name>` typedef that tp_btf programs attach through).
    pub fn has_btf_tracepoint(&self, name: &str) -> bool {
        self.btf.resolve_ids_by_name(&format!("btf_trace_{name}")).is_ok_and(|ids| !ids.is_empty())
    }

    /// True when the kernel's BTF defines a type (of any kind) named `name`.
    pub fn has_type(&self, name: &str) -> bool {
        self.btf.resolve_ids_by_name(name).is_ok_and(|ids| !ids.is_empty())
    }

    /// True when the kernel has a function `name` in its BTF (fentry/fexit targets).
    pub fn has_function(&self, name: &str) -> bool {
        self.function_params(name).is_ok()
    }

    /// Number of parameters of kernel function `name`.
    pub fn function_params(&self, name: &str) -> Result<usize, BtfError> {
        for ty in self.btf.resolve_types_by_name(name).unwrap_or_default() {
            if let Type::Func(func) = ty
                && let Type::FuncProto(proto) = self.btf.resolve_chained_type(&func)?
            {
                return Ok(proto.parameters.len());
            }
        }
        Err(BtfError::NoType { ty: format!("function {name}") })
    }

    /// Byte offset of `path` (dot-separated member names, e.g.
    /// `__sk_common.skc_family`) inside `struct ty`, looking through anonymous
    /// structs and unions the way C does.
    pub fn member_offset(&self, ty: &str, path: &str) -> Result<u32, BtfError> {
        let mut current = self.named_struct(ty)?;
        let mut bits: u64 = 0;
        let mut parts = path.split('.').peekable();
        while let Some(name) = parts.next() {
            let (offset, bitfield, member_ty) = self
                .find_member(&current, name)?
                .ok_or_else(|| BtfError::NoField { ty: ty.to_owned(), field: path.to_owned() })?;
            if bitfield.is_some() {
                return Err(BtfError::Bitfield { ty: ty.to_owned(), field: path.to_owned() });
            }
            bits += offset;
            if parts.peek().is_some() {
                current = self.strip(member_ty)?;
            }
        }
        let bytes = bits / 8;
        u32::try_from(bytes).map_err(|_| BtfError::TooFar { ty: ty.to_owned(), field: path.to_owned(), offset: bytes })
    }

    /// Byte and bit shift (within that byte) of a field of at most 8 bits: a
    /// bitfield that does not straddle a byte (little-endian bit order) or a
    /// whole byte.
    pub fn bitfield_position(&self, ty: &str, field: &str) -> Result<(u32, u32), BtfError> {
        let current = self.named_struct(ty)?;
        let (bits, bitfield, member_ty) = self
            .find_member(&current, field)?
            .ok_or_else(|| BtfError::NoField { ty: ty.to_owned(), field: field.to_owned() })?;
        // Some kernels declare the field as a whole byte: then it starts at
        // bit 0 of that byte. Anything wider is not what the caller expects.
        let size = match (bitfield, &member_ty) {
            (Some(bits), _) => bits,
            (None, Type::Int(int)) if int.size() == 1 => 8,
            (None, _) => u32::MAX,
        };
        if size > 8 || (bits % 8) + u64::from(size) > 8 {
            return Err(BtfError::Bitfield { ty: ty.to_owned(), field: field.to_owned() });
        }
        Ok(((bits / 8) as u32, (bits % 8) as u32))
    }

    fn named_struct(&self, name: &str) -> Result<Type, BtfError> {
        self.btf
            .resolve_types_by_name(name)
            .unwrap_or_default()
            .into_iter()
            .find(|t| matches!(t, Type::Struct(s) if !s.members.is_empty()))
            .ok_or_else(|| BtfError::NoType { ty: format!("struct {name}") })
    }

    /// Follows typedefs and qualifiers to the underlying type.
    fn strip(&self, mut ty: Type) -> Result<Type, BtfError> {
        loop {
            ty = match &ty {
                Type::Typedef(t) => self.btf.resolve_chained_type(t)?,
                Type::Const(t) | Type::Volatile(t) | Type::Restrict(t) => self.btf.resolve_chained_type(t)?,
                Type::TypeTag(t) => self.btf.resolve_chained_type(t)?,
                _ => return Ok(ty),
            };
        }
    }

    /// Finds member `name` of a struct or union: (bit offset, bitfield size if
    /// it is one, type).
    fn find_member(&self, ty: &Type, name: &str) -> Result<Option<(u64, Option<u32>, Type)>, BtfError> {
        let members = match ty {
            Type::Struct(s) | Type::Union(s) => &s.members,
            _ => return Ok(None),
        };
        for m in members {
            let member_name = self.btf.resolve_name(m).unwrap_or_default();
            let member_ty = self.strip(self.btf.resolve_chained_type(m)?)?;
            if member_name == name {
                return Ok(Some((u64::from(m.bit_offset()), m.bitfield_size().filter(|&s| s != 0), member_ty)));
            }
            if member_name.is_empty()
                && let Some((inner, bitfield, t)) = self.find_member(&member_ty, name)?
            {
                return Ok(Some((u64::from(m.bit_offset()) + inner, bitfield, t)));
            }
        }
        Ok(None)
    }

    /// Every offset the kernel programs need. A missing field is an error that
    /// names it: reading a guessed offset would give wrong numbers.
    pub fn kernel_offsets(&self) -> Result<KernelOffsets, BtfError> {
        let sock = |field: &str| self.member_offset("sock", field);
        let common = |field: &str| sock(&format!("__sk_common.{field}"));
        // The receive interface moved from inet_sock to sock in 5.18.
        let rx_dst_ifindex =
            sock("sk_rx_dst_ifindex").or_else(|_| self.member_offset("inet_sock", "rx_dst_ifindex"))?;
        // sk_protocol was a bitfield before 5.6. The per-call programs read
        // it, and they need 6.3; so do the fentry/kprobe release hooks, to
        // skip sockets that cannot have UDP flows, and flows exist only where
        // the per-call programs run: 0 there is never read where it matters.
        let sk_protocol = match sock("sk_protocol") {
            Ok(off) => off,
            Err(BtfError::Bitfield { .. }) => 0,
            Err(e) => return Err(e),
        };
        let chrono_type = self.bitfield_position("tcp_sock", "chrono_type")?;
        Ok(KernelOffsets {
            tcp_bytes_acked: self.member_offset("tcp_sock", "bytes_acked")?,
            tcp_bytes_received: self.member_offset("tcp_sock", "bytes_received")?,
            skc_family: common("skc_family")?,
            skc_state: common("skc_state")?,
            inet_sport: self.member_offset("inet_sock", "inet_sport")?,
            skc_dport: common("skc_dport")?,
            skc_rcv_saddr: common("skc_rcv_saddr")?,
            skc_daddr: common("skc_daddr")?,
            skc_v6_rcv_saddr: common("skc_v6_rcv_saddr")?,
            skc_v6_daddr: common("skc_v6_daddr")?,
            skc_net: common("skc_net")?,
            net_ns_inum: self.member_offset("net", "ns.inum")?,
            rx_dst_ifindex,
            sk_protocol,
            // sk_flags moved into sock_common (as skc_flags) in 6.16.
            sk_flags: sock("sk_flags").or_else(|_| common("skc_flags"))?,
            sock_done_bit: self.enum_value("sock_flags", "SOCK_DONE")?,
            tcp_snd_una: self.member_offset("tcp_sock", "snd_una")?,
            tcp_write_seq: self.member_offset("tcp_sock", "write_seq")?,
            sk_dst_cache: sock("sk_dst_cache")?,
            dst_dev: self.member_offset("dst_entry", "dev")?,
            netdev_ifindex: self.member_offset("net_device", "ifindex")?,
            socket_sk: self.member_offset("socket", "sk")?,
            tcp_chrono_start: self.member_offset("tcp_sock", "chrono_start")?,
            tcp_chrono_stat: self.member_offset("tcp_sock", "chrono_stat")?,
            tcp_chrono_type_byte: chrono_type.0,
            tcp_chrono_type_shift: chrono_type.1,
            skb_dev: self.member_offset("sk_buff", "dev")?,
            skb_refdst: self.member_offset("sk_buff", "_skb_refdst")?,
            netdev_net: self.member_offset("net_device", "nd_net.net")?,
            tcp_total_retrans: self.member_offset("tcp_sock", "total_retrans")?,
            tcp_clock_cache: self.member_offset("tcp_sock", "tcp_clock_cache")?,
        })
    }

    /// Number of parameters of BTF tracepoint `name` (its `btf_trace_<name>`
    /// typedef is a pointer to a prototype whose first parameter is the
    /// tracepoint's private data, not counted here).
    pub fn tracepoint_params(&self, name: &str) -> Result<usize, BtfError> {
        let typedef = format!("btf_trace_{name}");
        for ty in self.btf.resolve_types_by_name(&typedef).unwrap_or_default() {
            if let Type::Typedef(t) = ty
                && let Type::Ptr(p) = self.btf.resolve_chained_type(&t)?
                && let Type::FuncProto(proto) = self.btf.resolve_chained_type(&p)?
            {
                return Ok(proto.parameters.len().saturating_sub(1));
            }
        }
        Err(BtfError::NoType { ty: typedef })
    }

    /// Every enumerator of `enum ty` as (value, name), in declaration order.
    pub fn enum_members(&self, ty: &str) -> Result<Vec<(u32, String)>, BtfError> {
        for t in self.btf.resolve_types_by_name(ty).unwrap_or_default() {
            if let Type::Enum(e) = t {
                return Ok(e.members.iter().map(|m| (m.val(), self.btf.resolve_name(m).unwrap_or_default())).collect());
            }
        }
        Err(BtfError::NoType { ty: format!("enum {ty}") })
    }

    /// Value of enumerator `name` of `enum ty`.
    pub fn enum_value(&self, ty: &str, name: &str) -> Result<u32, BtfError> {
        for t in self.btf.resolve_types_by_name(ty).unwrap_or_default() {
            if let Type::Enum(e) = t {
                for m in &e.members {
                    if self.btf.resolve_name(m).is_ok_and(|n| n == name) {
                        return Ok(m.val());
                    }
                }
                return Err(BtfError::NoField { ty: format!("enum {ty}"), field: name.to_owned() });
            }
        }
        Err(BtfError::NoType { ty: format!("enum {ty}") })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// These run against this machine's own kernel BTF: the point is to check
    /// the lookup on real, nested kernel structures, which no fixture matches.
    fn kernel() -> Option<KernelBtf> {
        match KernelBtf::open(Path::new(DEFAULT_BTF_PATH)) {
            Ok(btf) => Some(btf),
            Err(e) => {
                eprintln!("skipped: {e}");
                None
            }
        }
    }

    #[test]
    fn resolves_nested_and_anonymous_members() {
        let Some(btf) = kernel() else { return };
        // __sk_common is the first member of struct sock, so its fields have the
        // same offset from either struct.
        let via_sock = btf.member_offset("sock", "__sk_common.skc_dport").unwrap();
        let direct = btf.member_offset("sock_common", "skc_dport").unwrap();
        assert_eq!(via_sock, direct);
        // skc_daddr lives in an anonymous union inside an anonymous struct.
        let daddr = btf.member_offset("sock_common", "skc_daddr").unwrap();
        let rcv = btf.member_offset("sock_common", "skc_rcv_saddr").unwrap();
        assert_eq!(rcv, daddr + 4, "skc_daddr and skc_rcv_saddr are adjacent __be32s");
    }

    #[test]
    fn tcp_byte_counters_are_distinct_and_inside_tcp_sock() {
        let Some(btf) = kernel() else { return };
        let off = btf.kernel_offsets().unwrap();
        assert_ne!(off.tcp_bytes_acked, off.tcp_bytes_received);
        // tcp_sock embeds inet_connection_sock which embeds sock: the counters
        // must lie past the whole struct sock.
        let sock_end = btf.member_offset("sock", "sk_rx_dst_ifindex").unwrap_or(0);
        assert!(off.tcp_bytes_acked > sock_end);
        assert_eq!(off.tcp_bytes_acked % 8, 0, "u64 fields are 8-byte aligned");
    }

    #[test]
    fn missing_field_is_named_in_the_error() {
        let Some(btf) = kernel() else { return };
        let err = btf.member_offset("tcp_sock", "no_such_field").unwrap_err();
        assert_eq!(err.to_string(), "kernel BTF: `tcp_sock` has no field `no_such_field`");
        let err = btf.member_offset("no_such_struct", "x").unwrap_err();
        assert!(err.to_string().contains("struct no_such_struct"), "{err}");
    }

    #[test]
    fn enum_values_come_from_the_kernel() {
        let Some(btf) = kernel() else { return };
        // SOCK_DEAD is the first sock flag and SOCK_DONE the second on every
        // kernel so far; the point is that the lookup walks real enums.
        assert_eq!(btf.enum_value("sock_flags", "SOCK_DEAD").unwrap(), 0);
        assert_eq!(btf.enum_value("sock_flags", "SOCK_DONE").unwrap(), 1);
        assert!(btf.enum_value("sock_flags", "SOCK_NO_SUCH").is_err());
        assert!(btf.enum_value("no_such_enum", "X").is_err());
    }

    #[test]
    fn small_bitfields_are_located_by_byte_and_shift() {
        let Some(btf) = kernel() else { return };
        // chrono_type is a 2-bit field on older kernels and a whole byte on
        // newer ones (6.18): either way its byte and shift are found.
        let (byte, shift) = btf.bitfield_position("tcp_sock", "chrono_type").unwrap();
        match btf.member_offset("tcp_sock", "chrono_type") {
            Ok(whole) => assert_eq!((byte, shift), (whole, 0)),
            Err(e) => assert!(matches!(e, BtfError::Bitfield { .. }) && shift < 8, "{e}"),
        }
        // A 1-bit field is found inside its byte.
        let (_, shift) = btf.bitfield_position("tcp_sock", "repair").unwrap();
        assert!(shift < 8);
        assert!(btf.bitfield_position("tcp_sock", "bytes_acked").is_err(), "wider than a byte");
    }

    #[test]
    fn bitfields_are_refused() {
        let Some(btf) = kernel() else { return };
        // tcp_sock.repair is a 1-bit field on every kernel with BTF.
        let err = btf.member_offset("tcp_sock", "repair").unwrap_err();
        assert!(matches!(err, BtfError::Bitfield { .. }), "{err}");
    }

    #[test]
    fn function_prototypes_and_tracepoints() {
        let Some(btf) = kernel() else { return };
        assert!(btf.function_params("tcp_set_state").unwrap() == 2);
        assert!(btf.has_btf_tracepoint("inet_sock_set_state"));
        assert!(!btf.has_btf_tracepoint("no_such_tracepoint"));
        assert!(btf.function_params("no_such_function_xyz").is_err());
    }

    #[test]
    fn drop_reasons_and_tracepoint_prototypes() {
        let Some(btf) = kernel() else { return };
        let reasons = btf.enum_members("skb_drop_reason").unwrap();
        let value = |n: &str| reasons.iter().find(|(_, name)| name == n).map(|(v, _)| *v);
        assert_eq!(value("SKB_NOT_DROPPED_YET"), Some(0));
        assert!(value("SKB_DROP_REASON_NETFILTER_DROP").is_some(), "{reasons:?}");
        // 6.18: skb, location, reason, rx_sk.
        assert!(btf.tracepoint_params("kfree_skb").unwrap() >= 3);
        assert!(btf.tracepoint_params("tcp_receive_reset").unwrap() == 1);
        assert!(btf.tracepoint_params("no_such_tracepoint").is_err());
        assert!(btf.enum_members("no_such_enum").is_err());
    }

    #[test]
    fn unreadable_file_says_what_to_do() {
        let err = KernelBtf::open(Path::new("/nonexistent/vmlinux")).err().unwrap();
        let msg = err.to_string();
        assert!(msg.contains("/nonexistent/vmlinux") && msg.contains("--btf"), "{msg}");
    }
}
