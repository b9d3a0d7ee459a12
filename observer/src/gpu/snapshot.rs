//! What one sampling cycle saw, in base units. The sampler builds a new
//! [`Snapshot`] each cycle and publishes it whole; a scrape reads the latest
//! one and never touches NVML.
//!
//! `None` means NVML could not give the value for this GPU (not supported,
//! no permission, a transient error): the series is omitted, never exported
//! as zero.
use std::time::{Duration, Instant, SystemTime};

#[derive(Clone, Debug, Default, PartialEq)]
pub struct Snapshot {
    /// NVML initialised and answered this cycle's device count.
    pub nvml_up: bool,
    pub driver_version: String,
    pub gpus: Vec<GpuState>,
    pub pods: Vec<PodMemory>,
    /// End of the last completed cycle, and how long it took.
    pub sampled_at: Option<SystemTime>,
    pub cycle: Option<Duration>,
    /// End of the last completed cycle on the monotonic clock, for its age.
    pub completed: Option<Instant>,
}

impl Snapshot {
    /// NVML down: no GPU values, only when the last cycle completed.
    pub fn down(&self) -> Snapshot {
        Snapshot { sampled_at: self.sampled_at, cycle: self.cycle, completed: self.completed, ..Snapshot::default() }
    }

    /// Whether this snapshot says NVML is up but its cycle ended longer than
    /// `max_age` before `now`: an NVML call is blocked, and its values are
    /// no longer the GPUs' state.
    pub fn stale(&self, now: Instant, max_age: Duration) -> bool {
        self.nvml_up && self.completed.is_some_and(|t| now.saturating_duration_since(t) > max_age)
    }
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct GpuState {
    pub index: u32,
    /// Empty when NVML could not name the GPU (lost before its UUID was read).
    pub uuid: String,
    pub model: String,
    pub pci_bus_id: String,
    pub mig_mode: MigState,
    /// The GPU answered this cycle. A lost GPU keeps its identity and loses
    /// its values.
    pub up: bool,
    pub values: GpuValues,
    /// XID critical errors seen through NVML events since the observer
    /// registered for them; `None` where the GPU offers no XID events.
    pub xid_errors: Option<u64>,
    /// MIG devices of a GPU in MIG mode, as NVML lists them.
    pub mig: Vec<MigDevice>,
    /// NVLink links NVML reports for the GPU (none on GPUs without NVLink).
    pub nvlinks: Vec<NvLink>,
}

/// One NVLink link of a GPU.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct NvLink {
    /// NVML's link number, 0 to `NVML_NVLINK_MAX_LINKS - 1`.
    pub link: u32,
    /// Active (nvmlDeviceGetNvLinkState); `None` where it could not be read
    /// this cycle. The counters below are read for active links only.
    pub active: Option<bool>,
    /// Cumulative data bytes (NVML fields NVLINK_THROUGHPUT_DATA_RX/TX, KiB,
    /// scoped to the link).
    pub receive_bytes: Option<u64>,
    pub transmit_bytes: Option<u64>,
    /// Error counters (nvmlDeviceGetNvLinkErrorCounter), in [`NVLINK_ERRORS`] order.
    pub errors: [Option<u64>; NVLINK_ERRORS.len()],
}

/// The NVLink error counters read, by their `type` label.
pub const NVLINK_ERRORS: [&str; 4] = ["replay", "recovery", "crc_flit", "crc_data"];

/// One MIG device (GPU instance and compute instance) of a GPU.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct MigDevice {
    /// `MIG-…`, the ID the device plugin and the kubelet use.
    pub uuid: String,
    pub memory_used_bytes: Option<u64>,
    pub memory_total_bytes: Option<u64>,
    /// GPM values of the MIG device's GPU instance over the last interval
    /// (nvmlGpmMigSampleGet; Hopper and later), the first [`MIG_GPM_FIELDS`]
    /// of [`GpmField`], in base units; all `None` where NVML gives none.
    pub gpm: [Option<f64>; MIG_GPM_FIELDS],
}

/// GPM per MIG device: the activity ratios (SM, occupancy, tensor, DRAM,
/// FP16/32/64), not the PCIe and NVLink rates, which are the GPU's.
pub const MIG_GPM_FIELDS: usize = 7;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum MigState {
    Enabled,
    Disabled,
    #[default]
    Unsupported,
}

impl MigState {
    pub fn as_str(self) -> &'static str {
        match self {
            MigState::Enabled => "enabled",
            MigState::Disabled => "disabled",
            MigState::Unsupported => "unsupported",
        }
    }
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct GpuValues {
    pub utilization_ratio: Option<f64>,
    pub memory_used_bytes: Option<u64>,
    pub memory_total_bytes: Option<u64>,
    pub power_watts: Option<f64>,
    pub energy_joules: Option<f64>,
    pub temperature_celsius: Option<f64>,
    /// Host to GPU.
    pub pcie_receive: Option<Pcie>,
    /// GPU to host.
    pub pcie_transmit: Option<Pcie>,
    pub pcie_replays: Option<u64>,
    pub ecc_corrected: Option<u64>,
    pub ecc_uncorrected: Option<u64>,
    /// The GPU offers NVML's GPM (GPU Performance Monitoring; Hopper and
    /// later); `None` where NVML could not say.
    pub gpm_supported: Option<bool>,
    /// GPM values over the last sampling interval, indexed by [`GpmField`],
    /// in base units; all `None` without GPM and in a GPU's first cycle
    /// (a value needs two samples).
    pub gpm: [Option<f64>; GPM_FIELDS],
}

/// What GPM gives per GPU, in this order in [`GpuValues::gpm`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GpmField {
    /// Ratio 0 to 1 (NVML: percent).
    SmActivity,
    SmOccupancy,
    TensorActivity,
    DramBandwidth,
    Fp16Activity,
    Fp32Activity,
    Fp64Activity,
    /// Bytes per second (NVML: MiB/s).
    PcieReceive,
    PcieTransmit,
    NvlinkReceive,
    NvlinkTransmit,
}

pub const GPM_FIELDS: usize = 11;

/// PCIe traffic in one direction, in the best form the GPU offers.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Pcie {
    /// Cumulative byte counter (NVML fields PCIE_COUNT_TX/RX_BYTES, Hopper
    /// and later).
    TotalBytes(u64),
    /// Throughput over NVML's last 20 ms window (nvmlDeviceGetPcieThroughput).
    BytesPerSecond(f64),
}

/// GPU memory of one pod's running compute processes on one GPU.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct PodMemory {
    pub uuid: String,
    pub namespace: String,
    pub pod: String,
    pub bytes: u64,
}
