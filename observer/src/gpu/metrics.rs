//! The GPU metric families, built from the latest [`Snapshot`] at scrape time.
//!
//! A custom collector rather than long-lived gauge vectors: a series must
//! vanish when its value becomes unavailable (a lost GPU, an unsupported
//! field, a pod that ended), and rebuilding a few dozen series from an
//! immutable snapshot is cheaper and simpler than tracking removals.
use std::{
    collections::HashMap,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant, UNIX_EPOCH},
};

use prometheus::{
    core::{Collector, Desc},
    proto::{Counter, Gauge, LabelPair, Metric, MetricFamily, MetricType},
};

use super::{
    Shared, podresources,
    snapshot::{GPM_FIELDS, GpuState, MIG_GPM_FIELDS, NVLINK_ERRORS, Pcie, Snapshot},
};

const GPU: &[&str] = &["gpu", "uuid"];

struct Def {
    name: &'static str,
    help: &'static str,
    kind: MetricType,
    labels: &'static [&'static str],
}

const fn gauge(name: &'static str, labels: &'static [&'static str], help: &'static str) -> Def {
    Def { name, help, kind: MetricType::GAUGE, labels }
}

const fn counter(name: &'static str, labels: &'static [&'static str], help: &'static str) -> Def {
    Def { name, help, kind: MetricType::COUNTER, labels }
}

// Indexes into DEFS, in the order below.
const NVML_UP: usize = 0;
const INFO: usize = 1;
const UP: usize = 2;
const UTILIZATION: usize = 3;
const MEMORY_USED: usize = 4;
const MEMORY_TOTAL: usize = 5;
const POWER: usize = 6;
const ENERGY: usize = 7;
const TEMPERATURE: usize = 8;
const PCIE_RX_TOTAL: usize = 9;
const PCIE_TX_TOTAL: usize = 10;
const PCIE_RX_RATE: usize = 11;
const PCIE_TX_RATE: usize = 12;
const PCIE_REPLAYS: usize = 13;
const ECC_CORRECTED: usize = 14;
const ECC_UNCORRECTED: usize = 15;
const XID: usize = 16;
const POD_MEMORY: usize = 17;
const SAMPLE_DURATION: usize = 18;
const SAMPLE_TIME: usize = 19;
const GPM_SUPPORTED: usize = 20;
/// The GPM families, in [`GpmField`](super::snapshot::GpmField) order.
const GPM_FIRST: usize = 21;
const MIG_INFO: usize = GPM_FIRST + GPM_FIELDS;
const MIG_MEMORY_USED: usize = MIG_INFO + 1;
const MIG_MEMORY_TOTAL: usize = MIG_INFO + 2;
const MIG: &[&str] = &["gpu", "uuid", "mig_uuid"];
/// The MIG GPM families, in [`GpmField`](super::snapshot::GpmField) order.
const MIG_GPM_FIRST: usize = MIG_MEMORY_TOTAL + 1;
const NVLINK_ACTIVE: usize = MIG_GPM_FIRST + MIG_GPM_FIELDS;
const NVLINK_RX_TOTAL: usize = NVLINK_ACTIVE + 1;
const NVLINK_TX_TOTAL: usize = NVLINK_ACTIVE + 2;
const NVLINK_ERRORS_TOTAL: usize = NVLINK_ACTIVE + 3;
const LINK: &[&str] = &["gpu", "uuid", "link"];

const DEFS: [Def; NVLINK_ERRORS_TOTAL + 1] = [
    gauge(
        "observer_nvml_up",
        &[],
        "1 when NVML is loaded and initialised and answered the last GPU sampling cycle, completed within the last 3 --gpu-interval; 0 otherwise: no library, no driver, no permission, --gpu off, re-initialising after a failure, or an NVML call blocked for longer than 3 intervals, when the stale GPU series are removed until sampling recovers (the log says why).",
    ),
    gauge(
        "observer_gpu_info",
        &["gpu", "uuid", "model", "pci_bus_id", "driver_version", "mig_mode"],
        "Identity of each GPU NVML reports (value 1), to join on gpu and uuid: model name, PCI bus id, NVIDIA driver version, MIG mode (enabled, disabled, unsupported).",
    ),
    gauge(
        "observer_gpu_up",
        GPU,
        "1 when the GPU answered the last sampling cycle; 0 when NVML reports it lost (fallen off the bus) or needing a reset, in which case its other series are absent.",
    ),
    gauge(
        "observer_gpu_utilization_ratio",
        GPU,
        "Fraction of NVML's last sample period (1/6 s to 1 s, depending on the GPU) during which one or more kernels ran on the GPU, 0 to 1.",
    ),
    gauge(
        "observer_gpu_memory_used_bytes",
        GPU,
        "Device memory allocated, in bytes (NVML memory info v2 `used`, which excludes what the driver reserves).",
    ),
    gauge("observer_gpu_memory_total_bytes", GPU, "Device memory installed, in bytes."),
    gauge("observer_gpu_power_watts", GPU, "Power draw of the GPU board, in watts (NVML reports milliwatts)."),
    counter(
        "observer_gpu_energy_joules_total",
        GPU,
        "Energy the GPU consumed since the driver was loaded, in joules (NVML reports millijoules; Volta and later).",
    ),
    gauge("observer_gpu_temperature_celsius", GPU, "GPU die temperature, in degrees Celsius."),
    counter(
        "observer_gpu_pcie_receive_bytes_total",
        GPU,
        "Bytes the GPU received over PCIe (host to GPU), from the GPU's cumulative counter (NVML field PCIE_COUNT_RX_BYTES; recent GPUs). The counter may wrap, which Prometheus treats as a reset. GPUs without it export observer_gpu_pcie_receive_bytes_per_second instead.",
    ),
    counter(
        "observer_gpu_pcie_transmit_bytes_total",
        GPU,
        "Bytes the GPU sent over PCIe (GPU to host), from the GPU's cumulative counter (NVML field PCIE_COUNT_TX_BYTES; recent GPUs). The counter may wrap, which Prometheus treats as a reset. GPUs without it export observer_gpu_pcie_transmit_bytes_per_second instead.",
    ),
    gauge(
        "observer_gpu_pcie_receive_bytes_per_second",
        GPU,
        "PCIe receive throughput (host to GPU) over NVML's last 20 ms window, in bytes per second (NVML reports KiB/s), for GPUs without the cumulative counter observer_gpu_pcie_receive_bytes_total. A sample, not an average over the scrape interval.",
    ),
    gauge(
        "observer_gpu_pcie_transmit_bytes_per_second",
        GPU,
        "PCIe transmit throughput (GPU to host) over NVML's last 20 ms window, in bytes per second (NVML reports KiB/s), for GPUs without the cumulative counter observer_gpu_pcie_transmit_bytes_total. A sample, not an average over the scrape interval.",
    ),
    counter(
        "observer_gpu_pcie_replays_total",
        GPU,
        "PCIe replays (link-level retransmissions after errors) counted by the GPU.",
    ),
    counter(
        "observer_gpu_ecc_corrected_errors_total",
        GPU,
        "ECC errors corrected (single-bit) in the GPU's memories since the driver was loaded (NVML volatile count); absent when ECC is off or unsupported.",
    ),
    counter(
        "observer_gpu_ecc_uncorrected_errors_total",
        GPU,
        "ECC errors not correctable (double-bit) in the GPU's memories since the driver was loaded (NVML volatile count); absent when ECC is off or unsupported.",
    ),
    counter(
        "observer_gpu_xid_errors_total",
        GPU,
        "XID critical errors the driver reported for the GPU (NVML events) since the observer started watching; each is also logged with its XID code. Absent where the GPU offers no XID events.",
    ),
    gauge(
        "observer_gpu_pod_memory_used_bytes",
        &["uuid", "namespace", "pod"],
        "GPU memory used by a pod's running compute processes on a GPU, in bytes: NVML's per-process memory, summed per pod (process to pod through /proc/<pid>/cgroup and the kubelet's pod log directory). Processes outside pods, or whose memory NVML does not report, are not counted.",
    ),
    gauge(
        "observer_nvml_sample_duration_seconds",
        &[],
        "Time the last completed GPU sampling cycle took (all GPUs, their processes and events).",
    ),
    gauge(
        "observer_nvml_last_sample_timestamp_seconds",
        &[],
        "Unix time at which the last GPU sampling cycle completed. Much older than --gpu-interval means an NVML call is blocked; past 3 intervals observer_nvml_up is 0 and the GPU series are absent until a cycle completes.",
    ),
    gauge(
        "observer_gpu_gpm_supported",
        GPU,
        "1 when the GPU offers NVML's GPM (GPU Performance Monitoring; Hopper and later), whose GPM families it then exports from its second sampling cycle on; 0 when it does not (they are absent).",
    ),
    gauge(
        "observer_gpu_gpm_sm_activity_ratio",
        GPU,
        "Share of the SMs busy over the last sampling interval, 0 to 1 (NVML GPM SM_UTIL, reported in percent).",
    ),
    gauge(
        "observer_gpu_gpm_sm_occupancy_ratio",
        GPU,
        "Warps resident on the SMs against the theoretical maximum over the last sampling interval, 0 to 1 (NVML GPM SM_OCCUPANCY, percent).",
    ),
    gauge(
        "observer_gpu_gpm_tensor_activity_ratio",
        GPU,
        "Share of time the SMs ran any tensor-core operation over the last sampling interval, 0 to 1 (NVML GPM ANY_TENSOR_UTIL, percent).",
    ),
    gauge(
        "observer_gpu_gpm_dram_bandwidth_utilization_ratio",
        GPU,
        "DRAM bandwidth used against the theoretical maximum over the last sampling interval, 0 to 1 (NVML GPM DRAM_BW_UTIL, percent).",
    ),
    gauge(
        "observer_gpu_gpm_fp16_activity_ratio",
        GPU,
        "Share of time the SMs did non-tensor FP16 math over the last sampling interval, 0 to 1 (NVML GPM FP16_UTIL, percent).",
    ),
    gauge(
        "observer_gpu_gpm_fp32_activity_ratio",
        GPU,
        "Share of time the SMs did non-tensor FP32 math over the last sampling interval, 0 to 1 (NVML GPM FP32_UTIL, percent).",
    ),
    gauge(
        "observer_gpu_gpm_fp64_activity_ratio",
        GPU,
        "Share of time the SMs did non-tensor FP64 math over the last sampling interval, 0 to 1 (NVML GPM FP64_UTIL, percent).",
    ),
    gauge(
        "observer_gpu_gpm_pcie_receive_bytes_per_second",
        GPU,
        "PCIe traffic to the GPU over the last sampling interval, in bytes per second (NVML GPM PCIE_RX_PER_SEC, reported in MiB/s).",
    ),
    gauge(
        "observer_gpu_gpm_pcie_transmit_bytes_per_second",
        GPU,
        "PCIe traffic from the GPU over the last sampling interval, in bytes per second (NVML GPM PCIE_TX_PER_SEC, MiB/s).",
    ),
    gauge(
        "observer_gpu_gpm_nvlink_receive_bytes_per_second",
        GPU,
        "NVLink traffic received over all links of the GPU over the last sampling interval, in bytes per second (NVML GPM NVLINK_TOTAL_RX_PER_SEC, MiB/s).",
    ),
    gauge(
        "observer_gpu_gpm_nvlink_transmit_bytes_per_second",
        GPU,
        "NVLink traffic sent over all links of the GPU over the last sampling interval, in bytes per second (NVML GPM NVLINK_TOTAL_TX_PER_SEC, MiB/s).",
    ),
    gauge(
        "observer_gpu_mig_info",
        MIG,
        "A MIG device of a GPU in MIG mode (value 1): mig_uuid is the ID the NVIDIA device plugin and the kubelet give it, gpu and uuid its GPU's.",
    ),
    gauge(
        "observer_gpu_mig_memory_used_bytes",
        MIG,
        "Device memory allocated in a MIG device, in bytes (NVML memory info v2 `used`).",
    ),
    gauge("observer_gpu_mig_memory_total_bytes", MIG, "Device memory of a MIG device, in bytes."),
    gauge(
        "observer_gpu_mig_gpm_sm_activity_ratio",
        MIG,
        "Share of the MIG device's SMs busy over the last sampling interval, 0 to 1 (NVML GPM SM_UTIL of its GPU instance, percent; Hopper and later). NVML gives no other utilisation of a MIG device.",
    ),
    gauge(
        "observer_gpu_mig_gpm_sm_occupancy_ratio",
        MIG,
        "Warps resident on the MIG device's SMs against the theoretical maximum over the last sampling interval, 0 to 1 (NVML GPM SM_OCCUPANCY of its GPU instance).",
    ),
    gauge(
        "observer_gpu_mig_gpm_tensor_activity_ratio",
        MIG,
        "Share of time the MIG device's SMs ran any tensor-core operation over the last sampling interval, 0 to 1 (NVML GPM ANY_TENSOR_UTIL of its GPU instance).",
    ),
    gauge(
        "observer_gpu_mig_gpm_dram_bandwidth_utilization_ratio",
        MIG,
        "DRAM bandwidth the MIG device used against the theoretical maximum over the last sampling interval, 0 to 1 (NVML GPM DRAM_BW_UTIL of its GPU instance).",
    ),
    gauge(
        "observer_gpu_mig_gpm_fp16_activity_ratio",
        MIG,
        "Share of time the MIG device's SMs did non-tensor FP16 math over the last sampling interval, 0 to 1 (NVML GPM FP16_UTIL of its GPU instance).",
    ),
    gauge(
        "observer_gpu_mig_gpm_fp32_activity_ratio",
        MIG,
        "Share of time the MIG device's SMs did non-tensor FP32 math over the last sampling interval, 0 to 1 (NVML GPM FP32_UTIL of its GPU instance).",
    ),
    gauge(
        "observer_gpu_mig_gpm_fp64_activity_ratio",
        MIG,
        "Share of time the MIG device's SMs did non-tensor FP64 math over the last sampling interval, 0 to 1 (NVML GPM FP64_UTIL of its GPU instance).",
    ),
    gauge(
        "observer_gpu_nvlink_active",
        LINK,
        "1 when the GPU's NVLink link is active, 0 when it is not (nvmlDeviceGetNvLinkState; Pascal and later). GPUs without NVLink have no series.",
    ),
    counter(
        "observer_gpu_nvlink_receive_bytes_total",
        LINK,
        "Data bytes the GPU received over an active NVLink link, protocol overhead excluded (NVML field NVLINK_THROUGHPUT_DATA_RX for the link, reported in KiB).",
    ),
    counter(
        "observer_gpu_nvlink_transmit_bytes_total",
        LINK,
        "Data bytes the GPU sent over an active NVLink link, protocol overhead excluded (NVML field NVLINK_THROUGHPUT_DATA_TX for the link, reported in KiB).",
    ),
    counter(
        "observer_gpu_nvlink_errors_total",
        &["gpu", "uuid", "link", "type"],
        "Errors the data link layer of an active NVLink link counted (nvmlDeviceGetNvLinkErrorCounter): type replay (transmit replays), recovery (link recoveries), crc_flit (flow-control CRC errors received), crc_data (data CRC errors received).",
    ),
];

/// A snapshot older than this many `--gpu-interval`s is stale: its values
/// are withdrawn and `observer_nvml_up` is 0 until a cycle completes.
pub const STALE_AFTER_INTERVALS: u32 = 3;

/// Serves the sampler's latest snapshot as Prometheus families.
pub struct GpuCollector {
    shared: Arc<Shared>,
    descs: Vec<Desc>,
    /// [`STALE_AFTER_INTERVALS`] sampling intervals.
    stale_after: Duration,
    /// Whether the last scrape found the snapshot stale, to log the changes once.
    was_stale: AtomicBool,
    /// Pod owners of GPUs (`--pod-resources-socket`), when that client runs.
    pods: Option<Arc<podresources::Latest>>,
}

impl GpuCollector {
    pub(super) fn new(shared: Arc<Shared>, interval: Duration) -> prometheus::Result<Self> {
        let descs = DEFS
            .iter()
            .map(|d| {
                Desc::new(
                    d.name.into(),
                    d.help.into(),
                    d.labels.iter().map(|l| l.to_string()).collect(),
                    HashMap::new(),
                )
            })
            .collect::<Result<_, _>>()?;
        Ok(GpuCollector {
            shared,
            descs,
            stale_after: interval * STALE_AFTER_INTERVALS,
            was_stale: AtomicBool::new(false),
            pods: None,
        })
    }

    /// The latest snapshot, or what is left of it once stale: a blocked NVML
    /// call must not keep the last values served as if current.
    fn current(&self) -> Snapshot {
        let latest = self.shared.latest();
        let stale = latest.stale(Instant::now(), self.stale_after);
        if stale != self.was_stale.swap(stale, Ordering::Relaxed) {
            if stale {
                tracing::warn!(
                    max_age = ?self.stale_after,
                    "no GPU sampling cycle completed for 3 intervals (an NVML call is blocked?); observer_nvml_up is 0 and the GPU series are withdrawn until one does"
                );
            } else {
                tracing::info!("GPU sampling completes again; GPU series are back");
            }
        }
        if stale { latest.down() } else { (*latest).clone() }
    }

    /// Labels GPU series with the pods `pods` says hold them, and exports the
    /// PodResources client's families (see [`podresources::annotate`]).
    pub fn with_pod_resources(mut self, pods: Arc<podresources::Latest>) -> prometheus::Result<Self> {
        for (name, labels, help) in podresources::FAMILIES {
            let labels = labels.iter().map(|l| l.to_string()).collect();
            self.descs.push(Desc::new(name.into(), help.into(), labels, HashMap::new())?);
        }
        self.pods = Some(pods);
        Ok(self)
    }
}

impl Collector for GpuCollector {
    fn desc(&self) -> Vec<&Desc> {
        self.descs.iter().collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let s = self.current();
        let mut out = families(&s);
        // Like every GPU family, only while NVML is up.
        if let Some(pods) = self.pods.as_ref().filter(|_| s.nvml_up) {
            podresources::annotate(&mut out, &pods.get());
        }
        out
    }
}

/// The families for one snapshot; empty ones are left out (the registry would
/// drop them anyway).
pub fn families(s: &Snapshot) -> Vec<MetricFamily> {
    let mut out: Vec<MetricFamily> = DEFS
        .iter()
        .map(|d| {
            let mut mf = MetricFamily::default();
            mf.set_name(d.name.into());
            mf.set_help(d.help.into());
            mf.set_field_type(d.kind);
            mf
        })
        .collect();
    let mut put = |i: usize, labels: &[&str], value: f64| {
        let def = &DEFS[i];
        let pairs = def
            .labels
            .iter()
            .zip(labels)
            .map(|(k, v)| {
                let mut p = LabelPair::default();
                p.set_name(k.to_string());
                p.set_value(v.to_string());
                p
            })
            .collect();
        let mut m = Metric::from_label(pairs);
        match def.kind {
            MetricType::COUNTER => {
                let mut c = Counter::default();
                c.set_value(value);
                m.set_counter(c);
            }
            _ => {
                let mut g = Gauge::default();
                g.set_value(value);
                m.set_gauge(g);
            }
        }
        out[i].mut_metric().push(m);
    };

    put(NVML_UP, &[], if s.nvml_up { 1.0 } else { 0.0 });
    if let Some(d) = s.cycle {
        put(SAMPLE_DURATION, &[], d.as_secs_f64());
    }
    if let Some(t) = s.sampled_at.and_then(|t| t.duration_since(UNIX_EPOCH).ok()) {
        put(SAMPLE_TIME, &[], t.as_secs_f64());
    }
    for g in &s.gpus {
        let index = g.index.to_string();
        let id = [index.as_str(), g.uuid.as_str()];
        put(INFO, &[&index, &g.uuid, &g.model, &g.pci_bus_id, &s.driver_version, g.mig_mode.as_str()], 1.0);
        put(UP, &id, if g.up { 1.0 } else { 0.0 });
        if !g.up {
            continue;
        }
        gpu_values(g, &id, &mut put);
    }
    for p in &s.pods {
        put(POD_MEMORY, &[&p.uuid, &p.namespace, &p.pod], p.bytes as f64);
    }
    out.retain(|mf| !mf.get_metric().is_empty());
    out
}

fn gpu_values(g: &GpuState, id: &[&str], put: &mut impl FnMut(usize, &[&str], f64)) {
    let v = &g.values;
    let mut opt = |i: usize, value: Option<f64>| {
        if let Some(x) = value {
            put(i, id, x);
        }
    };
    opt(UTILIZATION, v.utilization_ratio);
    opt(MEMORY_USED, v.memory_used_bytes.map(|b| b as f64));
    opt(MEMORY_TOTAL, v.memory_total_bytes.map(|b| b as f64));
    opt(POWER, v.power_watts);
    opt(ENERGY, v.energy_joules);
    opt(TEMPERATURE, v.temperature_celsius);
    for (pcie, total, rate) in
        [(v.pcie_receive, PCIE_RX_TOTAL, PCIE_RX_RATE), (v.pcie_transmit, PCIE_TX_TOTAL, PCIE_TX_RATE)]
    {
        match pcie {
            Some(Pcie::TotalBytes(b)) => opt(total, Some(b as f64)),
            Some(Pcie::BytesPerSecond(r)) => opt(rate, Some(r)),
            None => {}
        }
    }
    opt(PCIE_REPLAYS, v.pcie_replays.map(|n| n as f64));
    opt(ECC_CORRECTED, v.ecc_corrected.map(|n| n as f64));
    opt(ECC_UNCORRECTED, v.ecc_uncorrected.map(|n| n as f64));
    opt(XID, g.xid_errors.map(|n| n as f64));
    opt(GPM_SUPPORTED, v.gpm_supported.map(|b| if b { 1.0 } else { 0.0 }));
    for (k, value) in v.gpm.iter().enumerate() {
        opt(GPM_FIRST + k, *value);
    }
    for m in &g.mig {
        let labels = [id[0], id[1], m.uuid.as_str()];
        put(MIG_INFO, &labels, 1.0);
        let values = [
            (MIG_MEMORY_USED, m.memory_used_bytes.map(|b| b as f64)),
            (MIG_MEMORY_TOTAL, m.memory_total_bytes.map(|b| b as f64)),
        ];
        let gpm = m.gpm.iter().enumerate().map(|(k, v)| (MIG_GPM_FIRST + k, *v));
        for (i, value) in values.into_iter().chain(gpm) {
            if let Some(x) = value {
                put(i, &labels, x);
            }
        }
    }
    for l in &g.nvlinks {
        let link = l.link.to_string();
        let labels = [id[0], id[1], link.as_str()];
        if let Some(active) = l.active {
            put(NVLINK_ACTIVE, &labels, if active { 1.0 } else { 0.0 });
        }
        for (i, bytes) in [(NVLINK_RX_TOTAL, l.receive_bytes), (NVLINK_TX_TOTAL, l.transmit_bytes)] {
            if let Some(b) = bytes {
                put(i, &labels, b as f64);
            }
        }
        for (kind, n) in NVLINK_ERRORS.iter().zip(l.errors) {
            if let Some(n) = n {
                put(NVLINK_ERRORS_TOTAL, &[id[0], id[1], &link, kind], n as f64);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use prometheus::{Encoder, TextEncoder};

    use super::*;
    use crate::gpu::snapshot::{GpuValues, MigState, PodMemory};

    fn text(s: &Snapshot) -> String {
        let mut buf = Vec::new();
        TextEncoder::new().encode(&families(s), &mut buf).unwrap();
        String::from_utf8(buf).unwrap()
    }

    #[test]
    fn down_nvml_exports_only_nvml_up() {
        let t = text(&Snapshot::default());
        let samples: Vec<&str> = t.lines().filter(|l| !l.starts_with('#')).collect();
        assert_eq!(samples, ["observer_nvml_up 0"], "{t}");
        assert!(t.contains("# HELP observer_nvml_up 1 when NVML"), "{t}");
    }

    #[test]
    fn values_units_omissions_and_lost_gpus() {
        let s = Snapshot {
            nvml_up: true,
            driver_version: "550.54.15".into(),
            gpus: vec![
                GpuState {
                    index: 0,
                    uuid: "GPU-a".into(),
                    model: "NVIDIA H100".into(),
                    pci_bus_id: "00000000:17:00.0".into(),
                    mig_mode: MigState::Disabled,
                    up: true,
                    values: GpuValues {
                        utilization_ratio: Some(0.37),
                        memory_total_bytes: Some(80 << 30),
                        power_watts: Some(123.456),
                        pcie_receive: Some(Pcie::TotalBytes(5)),
                        pcie_transmit: Some(Pcie::BytesPerSecond(2048.0)),
                        ..GpuValues::default()
                    },
                    xid_errors: Some(0),
                    mig: Vec::new(),
                    nvlinks: Vec::new(),
                },
                GpuState {
                    index: 1,
                    uuid: "GPU-b".into(),
                    up: false,
                    values: GpuValues { power_watts: Some(1.0), ..GpuValues::default() },
                    ..GpuState::default()
                },
            ],
            pods: vec![PodMemory { uuid: "GPU-a".into(), namespace: "ns".into(), pod: "p".into(), bytes: 1 << 20 }],
            sampled_at: Some(UNIX_EPOCH + Duration::from_secs(1_700_000_000)),
            cycle: Some(Duration::from_millis(3)),
            completed: None,
        };
        let t = text(&s);
        for line in [
            "observer_nvml_up 1",
            r#"observer_gpu_info{gpu="0",uuid="GPU-a",model="NVIDIA H100",pci_bus_id="00000000:17:00.0",driver_version="550.54.15",mig_mode="disabled"} 1"#,
            r#"observer_gpu_up{gpu="0",uuid="GPU-a"} 1"#,
            r#"observer_gpu_up{gpu="1",uuid="GPU-b"} 0"#,
            r#"observer_gpu_utilization_ratio{gpu="0",uuid="GPU-a"} 0.37"#,
            r#"observer_gpu_memory_total_bytes{gpu="0",uuid="GPU-a"} 85899345920"#,
            r#"observer_gpu_power_watts{gpu="0",uuid="GPU-a"} 123.456"#,
            r#"observer_gpu_pcie_receive_bytes_total{gpu="0",uuid="GPU-a"} 5"#,
            r#"observer_gpu_pcie_transmit_bytes_per_second{gpu="0",uuid="GPU-a"} 2048"#,
            r#"observer_gpu_xid_errors_total{gpu="0",uuid="GPU-a"} 0"#,
            r#"observer_gpu_pod_memory_used_bytes{uuid="GPU-a",namespace="ns",pod="p"} 1048576"#,
            "observer_nvml_sample_duration_seconds 0.003",
            "observer_nvml_last_sample_timestamp_seconds 1700000000",
            "# TYPE observer_gpu_pcie_receive_bytes_total counter",
        ] {
            assert!(t.lines().any(|l| l == line), "missing {line}:\n{t}");
        }
        // Unsupported values and everything of a lost GPU are absent, not zero.
        let samples: Vec<&str> = t.lines().filter(|l| !l.starts_with('#')).collect();
        for absent in [
            "observer_gpu_memory_used_bytes",
            "observer_gpu_energy_joules_total",
            "observer_gpu_pcie_receive_bytes_per_second",
            "observer_gpu_pcie_transmit_bytes_total",
            r#"observer_gpu_power_watts{gpu="1""#,
        ] {
            assert!(!samples.iter().any(|l| l.starts_with(absent)), "{absent} should be absent:\n{t}");
        }
        // Every exported family has HELP and TYPE.
        for mf in families(&s) {
            assert!(!mf.help().is_empty() && t.contains(&format!("# TYPE {} ", mf.name())), "{}", mf.name());
        }
    }

    #[test]
    fn every_family_registers() {
        let shared = Arc::new(Shared::new(Snapshot::default()));
        let registry = prometheus::Registry::new();
        registry.register(Box::new(GpuCollector::new(shared, Duration::from_secs(5)).unwrap())).unwrap();
        assert_eq!(registry.gather().len(), 1, "only observer_nvml_up without NVML");
    }

    #[test]
    fn a_snapshot_older_than_3_intervals_is_withdrawn_and_returns_when_fresh() {
        let fresh = Snapshot {
            nvml_up: true,
            driver_version: "550.54.15".into(),
            gpus: vec![GpuState { index: 0, uuid: "GPU-a".into(), up: true, ..GpuState::default() }],
            pods: vec![PodMemory { uuid: "GPU-a".into(), namespace: "ns".into(), pod: "p".into(), bytes: 1 }],
            sampled_at: Some(UNIX_EPOCH + Duration::from_secs(1_700_000_000)),
            cycle: Some(Duration::from_millis(3)),
            completed: Some(Instant::now()),
        };
        let shared = Arc::new(Shared::new(fresh.clone()));
        let interval = Duration::from_millis(20);
        let collector = GpuCollector::new(shared.clone(), interval).unwrap();
        let samples = |c: &GpuCollector| {
            let mut buf = Vec::new();
            TextEncoder::new().encode(&families(&c.current()), &mut buf).unwrap();
            String::from_utf8(buf)
                .unwrap()
                .lines()
                .filter(|l| !l.starts_with('#'))
                .map(String::from)
                .collect::<Vec<_>>()
        };
        assert!(samples(&collector).contains(&"observer_nvml_up 1".to_string()));
        assert!(samples(&collector).iter().any(|l| l.starts_with("observer_gpu_up")));
        std::thread::sleep(interval * STALE_AFTER_INTERVALS + Duration::from_millis(10));
        assert_eq!(
            samples(&collector),
            [
                "observer_nvml_up 0",
                "observer_nvml_sample_duration_seconds 0.003",
                "observer_nvml_last_sample_timestamp_seconds 1700000000"
            ],
            "stale: only when the last cycle completed"
        );
        shared.publish(Snapshot { completed: Some(Instant::now()), ..fresh });
        assert!(samples(&collector).contains(&"observer_nvml_up 1".to_string()), "a new cycle: fresh again");
        assert!(!Snapshot::default().stale(Instant::now() + Duration::from_secs(60), interval), "down is not stale");
    }

    #[test]
    fn gpm_values_go_to_their_families_in_field_order() {
        use crate::gpu::snapshot::GpmField;
        let mut values = GpuValues { gpm_supported: Some(true), ..GpuValues::default() };
        values.gpm[GpmField::SmOccupancy as usize] = Some(0.4);
        values.gpm[GpmField::NvlinkTransmit as usize] = Some(1e9);
        let gpu =
            |index, values| GpuState { index, uuid: format!("GPU-{index}"), up: true, values, ..GpuState::default() };
        let without = GpuValues { gpm_supported: Some(false), ..GpuValues::default() };
        let t = text(&Snapshot { nvml_up: true, gpus: vec![gpu(0, values), gpu(1, without)], ..Snapshot::default() });
        for line in [
            r#"observer_gpu_gpm_supported{gpu="0",uuid="GPU-0"} 1"#,
            r#"observer_gpu_gpm_supported{gpu="1",uuid="GPU-1"} 0"#,
            r#"observer_gpu_gpm_sm_occupancy_ratio{gpu="0",uuid="GPU-0"} 0.4"#,
            r#"observer_gpu_gpm_nvlink_transmit_bytes_per_second{gpu="0",uuid="GPU-0"} 1000000000"#,
        ] {
            assert!(t.lines().any(|l| l == line), "missing {line}:\n{t}");
        }
        // Nothing else: no GPM value on GPU 1, none but the two set on GPU 0.
        assert_eq!(t.lines().filter(|l| !l.starts_with('#') && l.contains("_gpm_")).count(), 4, "{t}");
    }

    #[test]
    fn nvlinks_and_mig_gpm_carry_their_link_and_mig_uuid() {
        use crate::gpu::snapshot::{GpmField, MigDevice, NvLink};
        let mut gpm = [None; MIG_GPM_FIELDS];
        gpm[GpmField::TensorActivity as usize] = Some(0.25);
        let mig = MigDevice { uuid: "MIG-a".into(), memory_total_bytes: Some(1 << 30), gpm, ..MigDevice::default() };
        let up = NvLink {
            link: 2,
            active: Some(true),
            receive_bytes: Some(4096),
            transmit_bytes: None,
            errors: [Some(1), None, Some(0), None],
        };
        let down = NvLink { link: 5, active: Some(false), ..NvLink::default() };
        let gpu =
            GpuState { uuid: "GPU-0".into(), up: true, mig: vec![mig], nvlinks: vec![up, down], ..GpuState::default() };
        let t = text(&Snapshot { nvml_up: true, gpus: vec![gpu], ..Snapshot::default() });
        let expected = [
            r#"observer_gpu_mig_memory_total_bytes{gpu="0",uuid="GPU-0",mig_uuid="MIG-a"} 1073741824"#,
            r#"observer_gpu_mig_gpm_tensor_activity_ratio{gpu="0",uuid="GPU-0",mig_uuid="MIG-a"} 0.25"#,
            r#"observer_gpu_nvlink_active{gpu="0",uuid="GPU-0",link="2"} 1"#,
            r#"observer_gpu_nvlink_active{gpu="0",uuid="GPU-0",link="5"} 0"#,
            r#"observer_gpu_nvlink_receive_bytes_total{gpu="0",uuid="GPU-0",link="2"} 4096"#,
            r#"observer_gpu_nvlink_errors_total{gpu="0",uuid="GPU-0",link="2",type="replay"} 1"#,
            r#"observer_gpu_nvlink_errors_total{gpu="0",uuid="GPU-0",link="2",type="crc_flit"} 0"#,
            "# TYPE observer_gpu_nvlink_receive_bytes_total counter",
            "# TYPE observer_gpu_nvlink_errors_total counter",
        ];
        for line in expected {
            assert!(t.lines().any(|l| l == line), "missing {line}:\n{t}");
        }
        // Nothing the snapshot does not hold: no transmit counter, no
        // counters of the inactive link, one MIG GPM value.
        let samples = t.lines().filter(|l| !l.starts_with('#'));
        let mig_or_link = samples.filter(|l| l.contains("_nvlink_") || l.contains("_mig_")).count();
        // MIG: info, memory total, tensor; links: active x2, receive, errors x2.
        assert_eq!(mig_or_link, 8, "{t}");
    }
}
