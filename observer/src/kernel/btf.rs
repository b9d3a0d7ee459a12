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
    #[error(
        "kernel BTF: `{ty}.{field}` is {found} in this kernel, where the programs read {want}: reading it would give wrong numbers"
    )]
    Mismatch { ty: String, field: String, want: Field, found: String },
    #[error("kernel BTF: `{ty}.{field}` lies at {offset} bytes, beyond what the programs address")]
    TooFar { ty: String, field: String, offset: u64 },
    #[error("kernel BTF: {0}")]
    Parse(#[from] btf_rs::Error),
}

/// What the programs read at a field, checked against the kernel's type of
/// it: a field that changed size or kind (a counter widened, an address
/// turned into something else) is refused, not read wrong.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Field {
    /// An integer of this many bytes.
    Int(usize),
    /// A pointer, or a struct that holds only one (`possible_net_t`).
    Ptr,
    /// A struct or union of this many bytes, read whole (`struct in6_addr`).
    Bytes(usize),
    /// An array of `.1` integers of `.0` bytes each.
    Array(usize, usize),
}

impl std::fmt::Display for Field {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Field::Int(n) => write!(f, "a {n}-byte integer"),
            Field::Ptr => write!(f, "a pointer"),
            Field::Bytes(n) => write!(f, "a {n}-byte struct"),
            Field::Array(size, n) => write!(f, "an array of {n} {size}-byte integers"),
        }
    }
}

/// The running kernel's BTF.
pub struct KernelBtf {
    btf: Btf,
    path: PathBuf,
}

impl KernelBtf {
    pub fn open(path: &Path) -> Result<Self, BtfError> {
        // Read whole, then parse from memory: btf-rs' file reader asks the
        // kernel for its position once per type (about 130,000 lseek calls
        // for a vmlinux), which costs seconds per start under emulation.
        let read = |source: btf_rs::Error| BtfError::Read { path: path.to_owned(), source };
        let bytes = std::fs::read(path).map_err(|e| read(e.into()))?;
        let btf = Btf::from_bytes(&bytes).map_err(read)?;
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

    /// Byte offset of `path` inside `struct ty` (see `member_offset`), once
    /// the field's type is found to be `want`.
    pub fn field(&self, ty: &str, path: &str, want: Field) -> Result<u32, BtfError> {
        let (offset, found) = self.member(ty, path)?;
        let found = self.describe(&found)?;
        if found.0 != Some(want) {
            return Err(BtfError::Mismatch { ty: ty.to_owned(), field: path.to_owned(), want, found: found.1 });
        }
        Ok(offset)
    }

    /// `ty` as a `Field` if it is one of those, and in words.
    fn describe(&self, ty: &Type) -> Result<(Option<Field>, String), BtfError> {
        Ok(match ty {
            Type::Int(int) => (Some(Field::Int(int.size())), format!("a {}-byte integer", int.size())),
            Type::Ptr(_) => (Some(Field::Ptr), "a pointer".into()),
            Type::Struct(s) | Type::Union(s) => {
                let one_pointer = s.members.len() == 1
                    && matches!(self.strip(self.btf.resolve_chained_type(&s.members[0])?)?, Type::Ptr(_));
                let field = if one_pointer { Field::Ptr } else { Field::Bytes(s.size()) };
                (Some(field), format!("a {}-byte {}", s.size(), ty.name()))
            }
            Type::Array(a) => match self.strip(self.btf.resolve_chained_type(a)?)? {
                Type::Int(int) => (
                    Some(Field::Array(int.size(), a.len())),
                    format!("an array of {} {}-byte integers", a.len(), int.size()),
                ),
                other => (None, format!("an array of {} {}", a.len(), other.name())),
            },
            Type::Enum(e) => (None, format!("a {}-byte enum", e.size())),
            other => (None, format!("a {}", other.name())),
        })
    }

    /// Byte offset of `path` (dot-separated member names, e.g.
    /// `__sk_common.skc_family`) inside `struct ty`, looking through anonymous
    /// structs and unions the way C does. The field's size is not checked:
    /// for what the programs read, `field` is the lookup that does.
    pub fn member_offset(&self, ty: &str, path: &str) -> Result<u32, BtfError> {
        self.member(ty, path).map(|(offset, _)| offset)
    }

    /// Byte offset and (stripped) type of `path` inside `struct ty`.
    fn member(&self, ty: &str, path: &str) -> Result<(u32, Type), BtfError> {
        let mut current = self.named_struct(ty)?;
        let mut bits: u64 = 0;
        for name in path.split('.') {
            let (offset, bitfield, member_ty) = self
                .find_member(&current, name)?
                .ok_or_else(|| BtfError::NoField { ty: ty.to_owned(), field: path.to_owned() })?;
            if bitfield.is_some() {
                return Err(BtfError::Bitfield { ty: ty.to_owned(), field: path.to_owned() });
            }
            bits += offset;
            current = self.strip(member_ty)?;
        }
        let bytes = bits / 8;
        let offset = u32::try_from(bytes).map_err(|_| BtfError::TooFar {
            ty: ty.to_owned(),
            field: path.to_owned(),
            offset: bytes,
        })?;
        Ok((offset, current))
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

    /// Every offset the kernel programs need, each field's type checked
    /// against what they read there (`Field`). A missing or changed field is
    /// an error that names it: reading a guessed offset, or a field at its
    /// offset with another width, would give wrong numbers.
    pub fn kernel_offsets(&self) -> Result<KernelOffsets, BtfError> {
        use Field::{Array, Bytes, Int, Ptr};
        let sock = |field: &str, want| self.field("sock", field, want);
        let common = |field: &str, want| sock(&format!("__sk_common.{field}"), want);
        let tcp = |field: &str, want| self.field("tcp_sock", field, want);
        // The receive interface moved from inet_sock to sock in 5.18.
        let rx_dst_ifindex =
            sock("sk_rx_dst_ifindex", Int(4)).or_else(|_| self.field("inet_sock", "rx_dst_ifindex", Int(4)))?;
        // sk_protocol was a bitfield before 5.6. The per-call programs read
        // it, and they need 6.3; so do the fentry/kprobe release hooks, to
        // skip sockets that cannot have UDP flows, and flows exist only where
        // the per-call programs run: 0 there is never read where it matters.
        let sk_protocol = match sock("sk_protocol", Int(2)) {
            Ok(off) => off,
            Err(BtfError::Bitfield { .. }) => 0,
            Err(e) => return Err(e),
        };
        let chrono_type = self.bitfield_position("tcp_sock", "chrono_type")?;
        Ok(KernelOffsets {
            tcp_bytes_acked: tcp("bytes_acked", Int(8))?,
            tcp_bytes_received: tcp("bytes_received", Int(8))?,
            skc_family: common("skc_family", Int(2))?,
            skc_state: common("skc_state", Int(1))?,
            inet_sport: self.field("inet_sock", "inet_sport", Int(2))?,
            skc_dport: common("skc_dport", Int(2))?,
            skc_rcv_saddr: common("skc_rcv_saddr", Int(4))?,
            skc_daddr: common("skc_daddr", Int(4))?,
            skc_v6_rcv_saddr: common("skc_v6_rcv_saddr", Bytes(16))?,
            skc_v6_daddr: common("skc_v6_daddr", Bytes(16))?,
            skc_net: common("skc_net", Ptr)?,
            net_ns_inum: self.field("net", "ns.inum", Int(4))?,
            rx_dst_ifindex,
            sk_protocol,
            // sk_flags moved into sock_common (as skc_flags) in 6.16.
            sk_flags: sock("sk_flags", Int(8)).or_else(|_| common("skc_flags", Int(8)))?,
            sock_done_bit: self.enum_value("sock_flags", "SOCK_DONE")?,
            sock_dead_bit: self.enum_value("sock_flags", "SOCK_DEAD")?,
            tcp_snd_una: tcp("snd_una", Int(4))?,
            tcp_write_seq: tcp("write_seq", Int(4))?,
            sk_dst_cache: sock("sk_dst_cache", Ptr)?,
            dst_dev: self.field("dst_entry", "dev", Ptr)?,
            netdev_ifindex: self.field("net_device", "ifindex", Int(4))?,
            socket_sk: self.field("socket", "sk", Ptr)?,
            tcp_chrono_start: tcp("chrono_start", Int(4))?,
            tcp_chrono_stat: tcp("chrono_stat", Array(4, 3))?,
            tcp_chrono_type_byte: chrono_type.0,
            tcp_chrono_type_shift: chrono_type.1,
            skb_dev: self.field("sk_buff", "dev", Ptr)?,
            skb_refdst: self.field("sk_buff", "_skb_refdst", Int(8))?,
            netdev_net: self.field("net_device", "nd_net.net", Ptr)?,
            tcp_total_retrans: tcp("total_retrans", Int(4))?,
            tcp_clock_cache: tcp("tcp_clock_cache", Int(8))?,
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
    fn a_field_of_another_size_or_kind_is_refused() {
        let Some(btf) = kernel() else { return };
        use Field::*;
        assert!(btf.field("tcp_sock", "bytes_acked", Int(8)).is_ok());
        // As if the kernel had narrowed (or the programs widened) a counter.
        let err = btf.field("tcp_sock", "bytes_acked", Int(4)).unwrap_err();
        assert!(matches!(err, BtfError::Mismatch { .. }), "{err}");
        assert_eq!(
            err.to_string(),
            "kernel BTF: `tcp_sock.bytes_acked` is a 8-byte integer in this kernel, where the programs read a 4-byte \
             integer: reading it would give wrong numbers"
        );
        // A pointer is not an integer of the same width, nor the reverse.
        assert!(btf.field("sock", "sk_dst_cache", Int(8)).is_err());
        assert!(btf.field("sk_buff", "_skb_refdst", Ptr).is_err());
        // possible_net_t (a struct holding one pointer) reads as a pointer.
        assert!(btf.field("sock", "__sk_common.skc_net", Ptr).is_ok());
        assert!(btf.field("sock", "__sk_common.skc_v6_daddr", Bytes(16)).is_ok());
        assert!(btf.field("tcp_sock", "chrono_stat", Array(4, 3)).is_ok());
        assert!(btf.field("tcp_sock", "chrono_stat", Array(4, 4)).is_err());
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
