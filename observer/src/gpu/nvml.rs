//! One NVML session through `nvml-wrapper`: load and initialise the library,
//! open every GPU, watch XID events, and read a GPU once. Errors are sorted
//! here into what they mean for the caller (value unsupported, GPU lost,
//! session broken); what to do about them is the sampler's business.
use std::{collections::HashMap, ffi::OsStr, path::Path};

use nvml_wrapper::{
    Device, EventSet, GpmSample, Nvml,
    bitmasks::event::EventTypes,
    enum_wrappers::{
        device::{EccCounter, MemoryError, PcieUtilCounter, TemperatureSensor},
        nv_link::ErrorCounter,
    },
    enums::{
        device::{SampleValue, UsedGpuMemory},
        event::XidError,
        gpm::GpmMetricId,
    },
    error::{NvmlError, nvml_sym, nvml_try},
    struct_wrappers::device::FieldValueSample,
    structs::device::FieldId,
};
use nvml_wrapper_sys::bindings::{NVML_NVLINK_MAX_LINKS, nvmlFieldValue_t};

use super::snapshot::{GPM_FIELDS, GpuValues, MIG_GPM_FIELDS, MigDevice, MigState, NVLINK_ERRORS, NvLink, Pcie};

/// Tried in order when no `--nvml-lib` is given. The driver always installs
/// the `.so.1` name (the NVIDIA container runtime mounts exactly that one);
/// the unversioned name comes with development packages only.
pub const DEFAULT_LIBS: [&str; 2] = ["libnvidia-ml.so.1", "libnvidia-ml.so"];

/// NVML field ids of the cumulative PCIe byte counters (nvml.h; outside the
/// 251..273 range that driver 580.82 renumbered).
const FI_PCIE_COUNT_TX_BYTES: u32 = 197;
const FI_PCIE_COUNT_RX_BYTES: u32 = 198;
/// NVLink data throughput counters, in KiB (nvml.h: "NVLink TX/RX Data
/// throughput in KiB"), per link with the link in `scopeId` (UINT_MAX would
/// sum all links). Cumulative: the header's own example takes the difference
/// of two reads.
const FI_NVLINK_THROUGHPUT_DATA_TX: u32 = 138;
const FI_NVLINK_THROUGHPUT_DATA_RX: u32 = 139;
/// The NVLink error counters read per link, in [`NVLINK_ERRORS`] order.
const NVLINK_ERROR_COUNTERS: [ErrorCounter; NVLINK_ERRORS.len()] =
    [ErrorCounter::DlReplay, ErrorCounter::DlRecovery, ErrorCounter::DlCrcFlit, ErrorCounter::DlCrcData];

/// The GPM metrics read, in [`super::snapshot::GpmField`] order, with the
/// factor to base units. Units are nvml.h's (the crate's docs say bytes per
/// second for the PCIe and NVLink rates; the header says MiB/s): utilisations
/// in percent, 0.0 to 100.0, and PCIe and NVLink traffic in MiB/s.
const GPM: [(GpmMetricId, f64); GPM_FIELDS] = [
    (GpmMetricId::SmUtil, PERCENT),
    (GpmMetricId::SmOccupancy, PERCENT),
    (GpmMetricId::AnyTensorUtil, PERCENT),
    (GpmMetricId::DramBwUtil, PERCENT),
    (GpmMetricId::Fp16Util, PERCENT),
    (GpmMetricId::Fp32Util, PERCENT),
    (GpmMetricId::Fp64Util, PERCENT),
    (GpmMetricId::PcieRxPerSec, MIB),
    (GpmMetricId::PcieTxPerSec, MIB),
    (GpmMetricId::NvlinkTotalRxPerSec, MIB),
    (GpmMetricId::NvlinkTotalTxPerSec, MIB),
];
const PERCENT: f64 = 0.01;
const MIB: f64 = 1_048_576.0;

/// What an NVML error means for the caller.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Class {
    /// This GPU or driver does not offer the value: omit it.
    Unsupported,
    /// The GPU fell off the bus or needs a reset: the GPU is down.
    Lost,
    /// The library or driver went away (driver reloaded, version mismatch):
    /// the whole session must be re-initialised.
    Session,
    /// Anything else (no permission, a transient driver error): omit the
    /// value this cycle.
    Other,
}

pub fn classify(e: &NvmlError) -> Class {
    use NvmlError::*;
    match e {
        // A symbol an older driver lacks is a value that driver cannot give.
        NotSupported | FailedToLoadSymbol(_) | FunctionNotFound => Class::Unsupported,
        GpuLost | ResetRequired => Class::Lost,
        Uninitialized | DriverNotLoaded | LibRmVersionMismatch | LibloadingError(_) | LibraryNotFound => Class::Session,
        _ => Class::Other,
    }
}

/// A failure that stops reading a GPU this cycle.
#[derive(Debug)]
pub enum Fault {
    Lost(String),
    Session(String),
}

/// Loads and initialises NVML: `lib` if given, else [`DEFAULT_LIBS`] in order.
/// The error says what failed and what to do about it.
pub fn init(lib: Option<&Path>) -> Result<Nvml, String> {
    let candidates: Vec<&OsStr> = match lib {
        Some(p) => vec![p.as_os_str()],
        None => DEFAULT_LIBS.iter().map(OsStr::new).collect(),
    };
    let mut load_errors = Vec::new();
    for candidate in candidates {
        match Nvml::builder().lib_path(candidate).init() {
            Ok(nvml) => return guard(nvml),
            // The file could not be loaded: try the next name.
            Err(NvmlError::LibloadingError(e)) => load_errors.push(e.to_string()),
            Err(e) => return Err(init_error(candidate, &e)),
        }
    }
    Err(format!(
        "cannot load the NVML library ({}); give the path of the driver's libnvidia-ml.so.1 with --nvml-lib, or run under the NVIDIA container runtime with NVIDIA_DRIVER_CAPABILITIES including utility",
        load_errors.join("; ")
    ))
}

/// `Nvml`'s destructor calls nvmlShutdown without checking that the library
/// has it, and would panic: a library that passed nvmlInit_v2 without it is
/// not NVML. Leaking it is the only way out that does not call it.
fn guard(nvml: Nvml) -> Result<Nvml, String> {
    if nvml.lib().nvmlShutdown.is_ok() {
        return Ok(nvml);
    }
    std::mem::forget(nvml);
    Err("the NVML library has no nvmlShutdown symbol; it is not a complete NVML".into())
}

fn init_error(lib: &OsStr, e: &NvmlError) -> String {
    let lib = lib.to_string_lossy();
    let hint = match e {
        NvmlError::DriverNotLoaded => " (is the NVIDIA kernel driver loaded on this node?)",
        NvmlError::NoPermission => {
            " (the process cannot open the /dev/nvidia* devices: run privileged or under the NVIDIA container runtime)"
        }
        NvmlError::LibRmVersionMismatch => {
            " (the library and the loaded kernel driver are different versions: mount the host's own library)"
        }
        NvmlError::FailedToLoadSymbol(_) => " (not an NVML library?)",
        _ => "",
    };
    format!("NVML initialisation through {lib} failed: {e}{hint}")
}

/// Name, UUID and bus of a GPU, read once per session.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Identity {
    pub uuid: String,
    pub model: String,
    pub pci_bus_id: String,
}

/// One GPU of a session.
pub struct Slot<'n> {
    pub index: u32,
    device: Option<Device<'n>>,
    pub identity: Identity,
    /// Registered for XID events (one set per GPU, so a GPU that refuses
    /// registration costs the others nothing).
    events: Option<EventSet<'n>>,
    /// GPM support (asked once), and the previous cycle's sample: GPM
    /// values are the difference between two.
    gpm_supported: Option<bool>,
    gpm_last: Option<GpmSample<'n>>,
    /// The last GPM sample of each GPU instance (by ID) of a GPU in MIG mode.
    gpm_mig_last: HashMap<u32, GpmSample<'n>>,
    /// The NVLink links NVML knows on this GPU (asked once per session).
    nvlinks: Vec<u32>,
}

impl Slot<'_> {
    pub fn watches_xid(&self) -> bool {
        self.events.is_some()
    }
}

/// One reading of one GPU.
#[derive(Debug, Default)]
pub struct Reading {
    pub values: GpuValues,
    pub mig_mode: MigState,
    /// (pid, used bytes); `None` where NVML does not report a process's memory
    /// (MIG without privileges, some vGPU setups).
    pub processes: Vec<(u32, Option<u64>)>,
    /// XID codes delivered since the last reading.
    pub xids: Vec<Option<u64>>,
    /// MIG devices, in MIG mode.
    pub mig: Vec<MigDevice>,
    pub nvlinks: Vec<NvLink>,
}

/// Remembers which errors were already logged, so a GPU without ECC or an
/// unsupported field is reported once, not every cycle.
#[derive(Default)]
pub struct Notes {
    seen: HashMap<(u32, &'static str), (String, Class)>,
}

impl Notes {
    fn failed(&mut self, gpu: u32, field: &'static str, e: &NvmlError) {
        let text = e.to_string();
        if self.seen.get(&(gpu, field)).is_some_and(|(seen, _)| *seen == text) {
            return;
        }
        let class = classify(e);
        match class {
            Class::Unsupported => tracing::debug!(gpu, field, error = %text, "GPU value not available; omitted"),
            _ => tracing::warn!(gpu, field, error = %text, "cannot read GPU value; omitted until it reads again"),
        }
        self.seen.insert((gpu, field), (text, class));
    }

    fn ok(&mut self, gpu: u32, field: &'static str) {
        match self.seen.remove(&(gpu, field)) {
            Some((text, Class::Unsupported)) => {
                tracing::debug!(gpu, field, previous_error = %text, "GPU value available")
            }
            Some((text, _)) => tracing::info!(gpu, field, previous_error = %text, "GPU value readable again"),
            None => {}
        }
    }
}

pub struct Session<'n> {
    pub nvml: &'n Nvml,
    pub driver_version: String,
    pub slots: Vec<Slot<'n>>,
}

impl<'n> Session<'n> {
    /// Opens every GPU NVML reports. A GPU that is lost already is kept as a
    /// slot without a handle, retried every cycle.
    pub fn open(nvml: &'n Nvml, notes: &mut Notes) -> Result<Self, String> {
        let count = nvml.device_count().map_err(|e| format!("nvmlDeviceGetCount failed: {e}"))?;
        let driver_version = nvml.sys_driver_version().unwrap_or_default();
        let mut slots = Vec::new();
        for index in 0..count {
            let mut slot = Slot {
                index,
                device: None,
                identity: Identity::default(),
                events: None,
                gpm_supported: None,
                gpm_last: None,
                gpm_mig_last: HashMap::new(),
                nvlinks: Vec::new(),
            };
            match slot.attach(nvml, notes) {
                // Kept without a handle; reading it reports the GPU down.
                Ok(()) | Err(Fault::Lost(_)) => {}
                Err(Fault::Session(why)) => return Err(why),
            }
            slots.push(slot);
        }
        Ok(Session { nvml, driver_version, slots })
    }

    /// The device count now; a change means GPUs came or went and the
    /// session must be rebuilt.
    pub fn device_count(&self) -> Result<u32, NvmlError> {
        self.nvml.device_count()
    }
}

/// `field_of` for one reading, returning from the reading on a fault.
macro_rules! get {
    ($notes:expr, $gpu:expr, $field:literal, $call:expr) => {
        field_of($notes, $gpu, $field, $call)?
    };
}

impl<'n> Slot<'n> {
    /// Gets the handle, identity and XID registration of a slot that has no
    /// handle yet.
    fn attach(&mut self, nvml: &'n Nvml, notes: &mut Notes) -> Result<(), Fault> {
        if self.device.is_some() {
            return Ok(());
        }
        let device = check(nvml.device_by_index(self.index), "device handle")?;
        let i = self.index;
        self.identity = Identity {
            uuid: get!(notes, i, "uuid", device.uuid()).unwrap_or_default(),
            model: get!(notes, i, "name", device.name()).unwrap_or_default(),
            pci_bus_id: get!(notes, i, "pci_info", device.pci_info().map(|p| p.bus_id)).unwrap_or_default(),
        };
        self.events = watch_xid(nvml, &device, i, notes);
        self.gpm_supported = gpm_support(nvml, &device, i, notes)?;
        self.nvlinks = nvlinks(&device, i, notes)?;
        self.device = Some(device);
        Ok(())
    }

    /// Reads every value of the GPU. Values the GPU cannot give are `None`;
    /// a lost GPU or a broken session stops the reading.
    pub fn read(&mut self, nvml: &'n Nvml, notes: &mut Notes) -> Result<Reading, Fault> {
        self.attach(nvml, notes)?;
        let Some(d) = self.device.as_ref() else {
            return Err(Fault::Lost("no device handle".into()));
        };
        let i = self.index;
        let mut v = GpuValues {
            utilization_ratio: get!(notes, i, "utilization", d.utilization_rates().map(|u| f64::from(u.gpu) / 100.0)),
            power_watts: get!(notes, i, "power", d.power_usage().map(|mw| f64::from(mw) / 1000.0)),
            energy_joules: get!(notes, i, "energy", d.total_energy_consumption().map(|mj| mj as f64 / 1000.0)),
            temperature_celsius: get!(notes, i, "temperature", d.temperature(TemperatureSensor::Gpu).map(f64::from)),
            pcie_replays: get!(notes, i, "pcie_replays", d.pcie_replay_counter().map(u64::from)),
            ecc_corrected: get!(
                notes,
                i,
                "ecc_corrected",
                d.total_ecc_errors(MemoryError::Corrected, EccCounter::Volatile)
            ),
            ecc_uncorrected: get!(
                notes,
                i,
                "ecc_uncorrected",
                d.total_ecc_errors(MemoryError::Uncorrected, EccCounter::Volatile)
            ),
            ..GpuValues::default()
        };
        if let Some(m) = get!(notes, i, "memory", d.memory_info()) {
            (v.memory_used_bytes, v.memory_total_bytes) = (Some(m.used), Some(m.total));
        }

        // Cumulative counters where the GPU has them, else the throughput sample.
        let ids = [FieldId(FI_PCIE_COUNT_TX_BYTES), FieldId(FI_PCIE_COUNT_RX_BYTES)];
        let counters = get!(notes, i, "pcie_counters", d.field_values_for(&ids));
        let counter = |k: usize| {
            let sample = counters.as_ref()?.get(k)?.as_ref().ok()?;
            sample_u64(sample.value.as_ref().ok()?)
        };
        let throughput = |c| d.pcie_throughput(c).map(|kib| Pcie::BytesPerSecond(f64::from(kib) * 1024.0));
        v.pcie_transmit = match counter(0) {
            Some(b) => Some(Pcie::TotalBytes(b)),
            None => get!(notes, i, "pcie_throughput_tx", throughput(PcieUtilCounter::Send)),
        };
        v.pcie_receive = match counter(1) {
            Some(b) => Some(Pcie::TotalBytes(b)),
            None => get!(notes, i, "pcie_throughput_rx", throughput(PcieUtilCounter::Receive)),
        };

        let mig_mode = match get!(notes, i, "mig_mode", d.mig_mode()) {
            // NVML_DEVICE_MIG_ENABLE
            Some(m) if m.current == 1 => MigState::Enabled,
            Some(_) => MigState::Disabled,
            None => MigState::Unsupported,
        };
        let processes = get!(notes, i, "processes", d.running_compute_processes())
            .unwrap_or_default()
            .into_iter()
            .map(|p| {
                let used = match p.used_gpu_memory {
                    UsedGpuMemory::Used(b) => Some(b),
                    UsedGpuMemory::Unavailable => None,
                };
                (p.pid, used)
            })
            .collect();
        let mig = if mig_mode == MigState::Enabled { self.mig_devices(nvml, notes)? } else { Vec::new() };
        v.gpm_supported = self.gpm_supported;
        if self.gpm_supported == Some(true) {
            v.gpm = self.gpm(nvml, notes)?;
        }
        let nvlinks = self.read_nvlinks(nvml, notes)?;
        let xids = drain_xids(self, notes)?;
        Ok(Reading { values: v, mig_mode, processes, xids, mig, nvlinks })
    }

    /// The MIG devices of a GPU in MIG mode: every populated slot up to
    /// NVML's maximum (a free one answers NotFound), with GPM per GPU
    /// instance where the GPU has GPM.
    fn mig_devices(&mut self, nvml: &'n Nvml, notes: &mut Notes) -> Result<Vec<MigDevice>, Fault> {
        let mut out = Vec::new();
        let Some(d) = self.device.as_ref() else { return Ok(out) };
        let i = self.index;
        let max = get!(notes, i, "mig_device_count", d.mig_device_count()).unwrap_or(0);
        let mut samples = HashMap::new();
        let (mut ids, mut sampled, mut computed) =
            (Batch::new(i, "mig_gpu_instance"), Batch::new(i, "mig_gpm_sample"), Batch::new(i, "mig_gpm_metrics"));
        for k in 0..max {
            let m = match d.mig_device_by_index(k) {
                Err(NvmlError::NotFound) => continue,
                r => match get!(notes, i, "mig_device", r) {
                    Some(m) => m,
                    None => continue,
                },
            };
            let Some(uuid) = get!(notes, i, "mig_uuid", m.uuid()) else { continue };
            let memory = get!(notes, i, "mig_memory", m.memory_info());
            let mut gpm = [None; MIG_GPM_FIELDS];
            // GPM per GPU instance: a sample of the parent GPU for the MIG
            // device's instance, against the last one of that instance.
            if self.gpm_supported == Some(true)
                && let Some(gi) = ids.take(gpu_instance_id(nvml, &m))?
                && let Some(now) = sampled.take(d.gpm_mig_sample(gi))?
            {
                if let Some(last) = self.gpm_mig_last.get(&gi) {
                    gpm = computed.take(gpm_between(nvml, last, &now, &GPM[..MIG_GPM_FIELDS]))?.unwrap_or(gpm);
                }
                samples.insert(gi, now);
            }
            out.push(MigDevice {
                uuid,
                memory_used_bytes: memory.as_ref().map(|m| m.used),
                memory_total_bytes: memory.as_ref().map(|m| m.total),
                gpm,
            });
        }
        for b in [ids, sampled, computed] {
            b.finish(notes);
        }
        // Instances gone, or not sampled this cycle, start over.
        self.gpm_mig_last = samples;
        Ok(out)
    }

    /// Takes this cycle's GPM sample and computes the metrics against the
    /// last one; nothing in the first cycle or after a failed sample.
    fn gpm(&mut self, nvml: &'n Nvml, notes: &mut Notes) -> Result<[Option<f64>; GPM_FIELDS], Fault> {
        let mut out = [None; GPM_FIELDS];
        let Some(d) = self.device.as_ref() else { return Ok(out) };
        let i = self.index;
        let sample = get!(notes, i, "gpm_sample", d.gpm_sample());
        if let (Some(last), Some(now)) = (self.gpm_last.as_ref(), sample.as_ref())
            && let Some(values) = get!(notes, i, "gpm_metrics", gpm_between(nvml, last, now, &GPM))
        {
            out = values;
        }
        self.gpm_last = sample;
        Ok(out)
    }

    /// Each NVLink link's state, and the data and error counters of the
    /// active ones. A counter the GPU does not give is `None`, alone.
    fn read_nvlinks(&self, nvml: &Nvml, notes: &mut Notes) -> Result<Vec<NvLink>, Fault> {
        let Some(d) = self.device.as_ref().filter(|_| !self.nvlinks.is_empty()) else { return Ok(Vec::new()) };
        let i = self.index;
        let mut state = Batch::new(i, "nvlink_state");
        let mut links = Vec::with_capacity(self.nvlinks.len());
        for &link in &self.nvlinks {
            let active = state.take(d.link_wrapper_for(link).is_active())?;
            links.push(NvLink { link, active, ..NvLink::default() });
        }
        state.finish(notes);
        let active: Vec<u32> = links.iter().filter(|l| l.active == Some(true)).map(|l| l.link).collect();
        if active.is_empty() {
            return Ok(links);
        }
        if let Some(counters) = get!(notes, i, "nvlink_throughput", nvlink_throughput(nvml, d, &active)) {
            for (&link, [tx, rx]) in active.iter().zip(counters) {
                if let Some(l) = links.iter_mut().find(|l| l.link == link) {
                    (l.transmit_bytes, l.receive_bytes) = (tx, rx);
                }
            }
        }
        let mut errors = Batch::new(i, "nvlink_errors");
        for l in links.iter_mut().filter(|l| l.active == Some(true)) {
            let nvlink = d.link_wrapper_for(l.link);
            for (slot, counter) in l.errors.iter_mut().zip(NVLINK_ERROR_COUNTERS) {
                *slot = errors.take(nvlink.error_counter(counter))?;
            }
        }
        errors.finish(notes);
        Ok(links)
    }
}

/// The GPM metrics `metrics` between two samples, in base units; a metric
/// the GPU lacks fails alone (`None`).
fn gpm_between<'n, const N: usize>(
    nvml: &'n Nvml,
    last: &GpmSample<'n>,
    now: &GpmSample<'n>,
    metrics: &[(GpmMetricId, f64)],
) -> Result<[Option<f64>; N], NvmlError> {
    let ids: Vec<GpmMetricId> = metrics.iter().map(|(id, _)| *id).collect();
    let mut out = [None; N];
    let results = nvml_wrapper::gpm::gpm_metrics_get(nvml, last, now, &ids)?;
    for ((slot, (_, factor)), r) in out.iter_mut().zip(metrics).zip(results) {
        *slot = r.ok().map(|m| m.value * factor).filter(|v| v.is_finite());
    }
    Ok(out)
}

/// The NVLink links of a GPU: those whose state NVML reports. A GPU without
/// NVLink answers NotSupported for every link; a link number past the GPU's
/// links, InvalidArgument.
fn nvlinks(device: &Device<'_>, gpu: u32, notes: &mut Notes) -> Result<Vec<u32>, Fault> {
    let mut links = Vec::new();
    let mut probe = Batch::new(gpu, "nvlink_state");
    for link in 0..NVML_NVLINK_MAX_LINKS {
        match device.link_wrapper_for(link).is_active() {
            Ok(_) => links.push(link),
            Err(NvmlError::InvalidArg) => {}
            Err(e) => {
                probe.take::<()>(Err(e))?;
            }
        }
    }
    probe.finish_unless_unsupported(notes);
    Ok(links)
}

/// NVLink data counters (transmit, receive) of `links`, in bytes, in one
/// nvmlDeviceGetFieldValues call. The wrapper's `field_values_for` cannot
/// set a value's `scopeId`, which these fields need for the link.
fn nvlink_throughput(nvml: &Nvml, d: &Device<'_>, links: &[u32]) -> Result<Vec<[Option<u64>; 2]>, NvmlError> {
    let sym = nvml_sym(nvml.lib().nvmlDeviceGetFieldValues.as_ref())?;
    let mut values: Vec<nvmlFieldValue_t> = links
        .iter()
        .flat_map(|&link| {
            [FI_NVLINK_THROUGHPUT_DATA_TX, FI_NVLINK_THROUGHPUT_DATA_RX].map(|field| {
                // SAFETY: a plain C struct of integers and a union of numbers,
                // for which all zeroes is a valid value.
                let mut v: nvmlFieldValue_t = unsafe { std::mem::zeroed() };
                (v.fieldId, v.scopeId) = (field, link);
                v
            })
        })
        .collect();
    let count = i32::try_from(values.len()).map_err(|_| NvmlError::InvalidArg)?;
    // SAFETY: the handle is a live device of this session's NVML, and
    // `values` holds `count` initialised entries for NVML to fill in place.
    nvml_try(unsafe { sym(d.handle(), count, values.as_mut_ptr()) })?;
    let kib = |v: nvmlFieldValue_t| {
        let sample = FieldValueSample::try_from(v).ok()?;
        sample_u64(sample.value.as_ref().ok()?).map(|k| k.saturating_mul(1024))
    };
    Ok(values.chunks_exact(2).map(|pair| [kib(pair[0]), kib(pair[1])]).collect())
}

/// nvmlDeviceGetGpuInstanceId of a MIG device (the wrapper has no call for it).
fn gpu_instance_id(nvml: &Nvml, mig: &Device<'_>) -> Result<u32, NvmlError> {
    let sym = nvml_sym(nvml.lib().nvmlDeviceGetGpuInstanceId.as_ref())?;
    let mut id = 0;
    // SAFETY: a MIG device handle from this session's NVML, and a place for
    // one unsigned int.
    nvml_try(unsafe { sym(mig.handle(), &mut id) })?;
    Ok(id)
}

/// [`field_of`] for one call made for several links or MIG devices of a
/// GPU: what failed is noted once per GPU and field, not once per link (one
/// failing link must not log again each time another one reads).
struct Batch {
    gpu: u32,
    field: &'static str,
    failed: Option<NvmlError>,
}

impl Batch {
    fn new(gpu: u32, field: &'static str) -> Self {
        Batch { gpu, field, failed: None }
    }

    fn take<T>(&mut self, r: Result<T, NvmlError>) -> Result<Option<T>, Fault> {
        match r {
            Ok(v) => Ok(Some(v)),
            Err(e) => match classify(&e) {
                Class::Lost => Err(Fault::Lost(e.to_string())),
                Class::Session => Err(Fault::Session(format!("{}: {e}", self.field))),
                Class::Unsupported | Class::Other => {
                    self.failed.get_or_insert(e);
                    Ok(None)
                }
            },
        }
    }

    fn finish(self, notes: &mut Notes) {
        match &self.failed {
            Some(e) => notes.failed(self.gpu, self.field, e),
            None => notes.ok(self.gpu, self.field),
        }
    }

    /// [`Self::finish`] where "not supported" means only that there is
    /// nothing to read (a GPU without NVLink), not worth a line.
    fn finish_unless_unsupported(self, notes: &mut Notes) {
        if self.failed.as_ref().is_none_or(|e| classify(e) != Class::Unsupported) {
            self.finish(notes);
        }
    }
}

/// Whether the GPU offers GPM. `Some(false)` also where the driver lacks the
/// functions, or the library lacks nvmlGpmSampleFree, which GpmSample's
/// destructor calls unchecked (a panic if absent).
fn gpm_support(nvml: &Nvml, device: &Device<'_>, gpu: u32, notes: &mut Notes) -> Result<Option<bool>, Fault> {
    if nvml.lib().nvmlGpmSampleFree.is_err() {
        return Ok(Some(false));
    }
    match device.gpm_support() {
        Ok(b) => Ok(Some(b)),
        Err(e) if classify(&e) == Class::Unsupported => Ok(Some(false)),
        Err(e) => field_of(notes, gpu, "gpm_support", Err(e)),
    }
}

fn watch_xid<'n>(nvml: &'n Nvml, device: &Device<'n>, gpu: u32, notes: &mut Notes) -> Option<EventSet<'n>> {
    // EventSet's destructor calls nvmlEventSetFree unchecked (a panic if the
    // library lacks it).
    if nvml.lib().nvmlEventSetFree.is_err() {
        return None;
    }
    let supported = field_of(notes, gpu, "event_types", device.supported_event_types()).ok()??;
    if !supported.contains(EventTypes::CRITICAL_XID_ERROR) {
        tracing::debug!(gpu, "GPU offers no XID events; observer_gpu_xid_errors_total omitted");
        return None;
    }
    let set = field_of(notes, gpu, "event_set", nvml.create_event_set()).ok()??;
    match device.register_events(EventTypes::CRITICAL_XID_ERROR, set) {
        Ok(set) => Some(set),
        Err(e) => {
            notes.failed(gpu, "xid_events", &e.error);
            None
        }
    }
}

/// Takes the XID events waiting in the slot's set without blocking.
fn drain_xids(slot: &Slot<'_>, notes: &mut Notes) -> Result<Vec<Option<u64>>, Fault> {
    let mut xids = Vec::new();
    let Some(set) = &slot.events else { return Ok(xids) };
    // Bounded, so a storm of events cannot hold the cycle forever.
    for _ in 0..1024 {
        match set.wait(0) {
            Ok(e) if e.event_type.contains(EventTypes::CRITICAL_XID_ERROR) => xids.push(match e.event_data {
                Some(XidError::Value(code)) => Some(code),
                _ => None,
            }),
            Ok(_) => {}
            Err(NvmlError::Timeout) => break,
            Err(e) => {
                field_of::<()>(notes, slot.index, "xid_events", Err(e))?;
                break;
            }
        }
    }
    Ok(xids)
}

/// Sorts one call's result: the value, `None` (noted in the log once), or a
/// fault that ends the GPU's reading.
fn field_of<T>(notes: &mut Notes, gpu: u32, field: &'static str, r: Result<T, NvmlError>) -> Result<Option<T>, Fault> {
    let mut one = Batch::new(gpu, field);
    let v = one.take(r)?;
    one.finish(notes);
    Ok(v)
}

fn check<T>(r: Result<T, NvmlError>, what: &str) -> Result<T, Fault> {
    r.map_err(|e| match classify(&e) {
        Class::Session => Fault::Session(format!("{what}: {e}")),
        _ => Fault::Lost(format!("{what}: {e}")),
    })
}

fn sample_u64(v: &SampleValue) -> Option<u64> {
    match *v {
        SampleValue::U64(x) => Some(x),
        SampleValue::U32(x) => Some(u64::from(x)),
        SampleValue::I64(x) => u64::try_from(x).ok(),
        SampleValue::F64(x) if x.is_finite() && x >= 0.0 => Some(x as u64),
        SampleValue::F64(_) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_classes() {
        assert_eq!(classify(&NvmlError::NotSupported), Class::Unsupported);
        assert_eq!(classify(&NvmlError::FailedToLoadSymbol("x".into())), Class::Unsupported);
        assert_eq!(classify(&NvmlError::GpuLost), Class::Lost);
        assert_eq!(classify(&NvmlError::ResetRequired), Class::Lost);
        assert_eq!(classify(&NvmlError::Uninitialized), Class::Session);
        assert_eq!(classify(&NvmlError::DriverNotLoaded), Class::Session);
        assert_eq!(classify(&NvmlError::NoPermission), Class::Other);
        assert_eq!(classify(&NvmlError::Unknown), Class::Other);
    }

    #[test]
    fn missing_library_names_the_flag() {
        let e = init(Some(Path::new("/nonexistent/libnvidia-ml.so.1"))).err().unwrap();
        assert!(
            e.contains("cannot load the NVML library")
                && e.contains("/nonexistent/libnvidia-ml.so.1")
                && e.contains("--nvml-lib"),
            "{e}"
        );
    }

    #[test]
    fn field_samples_as_counters() {
        assert_eq!(sample_u64(&SampleValue::U64(7)), Some(7));
        assert_eq!(sample_u64(&SampleValue::U32(7)), Some(7));
        assert_eq!(sample_u64(&SampleValue::I64(-1)), None);
        assert_eq!(sample_u64(&SampleValue::F64(f64::NAN)), None);
    }
}
