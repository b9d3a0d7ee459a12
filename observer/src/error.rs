//! One error type for the whole program, and the exit code each kind maps to.
use crate::kernel::btf::BtfError;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Bad input or an environment the user must change (privileges, a taken
    /// port, an unknown interface): exit code 2.
    #[error("{0}")]
    Usage(String),
    #[error(transparent)]
    Btf(#[from] BtfError),
    #[error(
        "this observer binary was built with AYA_BUILD_SKIP=1 and carries no kernel programs; rebuild it without that variable"
    )]
    NoKernelObject,
    #[error("loading the kernel programs")]
    Load(#[source] aya::EbpfError),
    #[error("attaching kernel program {program}")]
    Program {
        program: &'static str,
        #[source]
        source: aya::programs::ProgramError,
    },
    #[error("no usable kernel hook for {concern}: {why}")]
    NoHook { concern: &'static str, why: String, forced: bool },
    #[error("reading closed sessions from the kernel")]
    Ring(#[source] std::io::Error),
    #[error("serving metrics")]
    Server(#[source] std::io::Error),
    #[error("{0}")]
    Other(String),
}

impl Error {
    pub fn exit_code(&self) -> u8 {
        match self {
            Error::Usage(_) => 2,
            // A tier the user forced is bad input on this kernel.
            Error::NoHook { forced: true, .. } => 2,
            _ => 1,
        }
    }
}
