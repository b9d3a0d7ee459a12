//! Which pod holds each GPU: a client of the kubelet's PodResources v1 API
//! (`v1.PodResourcesLister`, gRPC over `--pod-resources-socket`), the source
//! dcgm-exporter uses too. An allocated but idle GPU still has its owner.
//!
//! A thread of its own refreshes the allocations every `--gpu-interval`
//! (List, and GetAllocatableResources where the kubelet has it), each
//! refresh bounded by a timeout, and publishes them whole; scrapes read the
//! latest and the NVML sampler never waits on the kubelet. A missing socket,
//! a slow kubelet or an answer that does not decode make
//! `observer_gpu_pod_resources_up 0` (logged once per distinct reason) and
//! leave the GPU series without owners; everything else goes on.
//!
//! Devices are matched by the IDs the kubelet reports for `nvidia.com/*`
//! resources: GPU UUIDs, MIG device UUIDs (`MIG-…`), and, with the device
//! plugin's time-slicing, `GPU-…::N` replicas (the suffix is dropped).
use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use prometheus::proto::{Gauge, LabelPair, Metric, MetricFamily, MetricType};

use observer_podresources::v1::{
    AllocatableResourcesRequest, ListPodResourcesRequest, pod_resources_lister_client::PodResourcesListerClient,
};

pub const DEFAULT_SOCKET: &str = "/var/lib/kubelet/pod-resources/kubelet.sock";
/// Resources whose devices are GPUs (or MIG devices).
const RESOURCE_PREFIX: &str = "nvidia.com/";
/// Kubelet answers on large nodes exceed tonic's 4 MiB default.
const MAX_ANSWER: usize = 64 << 20;

/// The pod container a device is allocated to.
#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct Owner {
    pub namespace: String,
    pub pod: String,
    pub container: String,
}

/// What the last refresh saw.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Allocations {
    /// The last refresh succeeded.
    pub up: bool,
    /// Device ID -> (resource, owner), sorted; a time-sliced GPU may have
    /// several owners.
    pub devices: BTreeMap<String, Vec<(String, Owner)>>,
    /// Resource -> allocatable device count (GetAllocatableResources); empty
    /// where the kubelet does not offer it.
    pub allocatable: BTreeMap<String, u64>,
}

impl Allocations {
    /// The owner a GPU's (or MIG device's) series carry: the first in order
    /// when the device is shared.
    pub fn owner(&self, uuid: &str) -> Option<&Owner> {
        self.devices.get(uuid).and_then(|v| v.first()).map(|(_, o)| o)
    }
}

/// The latest allocations, shared between the refresh thread and scrapes.
#[derive(Default)]
pub struct Latest(Mutex<Arc<Allocations>>);

impl Latest {
    pub fn get(&self) -> Arc<Allocations> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn set(&self, a: Allocations) {
        let old = std::mem::replace(&mut *self.0.lock().unwrap_or_else(|p| p.into_inner()), Arc::new(a));
        drop(old);
    }
}

/// The running client. Dropping it stops the refresh thread (at its next
/// wake-up; nothing waits for it).
pub struct PodResources {
    latest: Arc<Latest>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::Thread>,
}

impl PodResources {
    /// Starts refreshing from `socket` every `interval`.
    pub fn start(socket: &Path, interval: Duration) -> PodResources {
        let latest = Arc::new(Latest::default());
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (latest, stop, socket) = (latest.clone(), stop.clone(), socket.to_path_buf());
            std::thread::Builder::new()
                .name("pod-resources".into())
                .spawn(move || run(socket, interval, latest, stop))
                .map_err(
                    |e| tracing::warn!(error = %e, "cannot start the PodResources thread; GPU series carry no pods"),
                )
                .ok()
                .map(|h| h.thread().clone())
        };
        PodResources { latest, stop, thread }
    }

    pub fn latest(&self) -> Arc<Latest> {
        self.latest.clone()
    }
}

impl Drop for PodResources {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = &self.thread {
            t.unpark();
        }
    }
}

/// A refresh may take the interval, between 1 s and 10 s.
fn call_timeout(interval: Duration) -> Duration {
    interval.clamp(Duration::from_secs(1), Duration::from_secs(10))
}

/// Why a refresh failed. Each is logged once when it starts, however its
/// details vary (a garbled answer fails one way or another).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Reason {
    /// Nothing at the socket's path: no kubelet, or its directory not mounted.
    NoSocket,
    /// Connected, but no answer within the timeout.
    NoAnswer,
    /// Refused, cut off, not gRPC, an error status, an answer that does not decode.
    Failed,
}

#[derive(Debug, PartialEq, Eq)]
struct Failure {
    reason: Reason,
    detail: String,
}

impl Failure {
    fn failed(detail: String) -> Failure {
        Failure { reason: Reason::Failed, detail }
    }
}

fn run(socket: PathBuf, interval: Duration, latest: Arc<Latest>, stop: Arc<AtomicBool>) {
    // Like every thread of the observer, before it has work (kernel/privileges.rs).
    crate::kernel::privileges::drop_in_this_thread();
    let timeout = call_timeout(interval);
    let mut last_error: Option<Reason> = None;
    loop {
        let started = Instant::now();
        match refresh(&socket, timeout) {
            Ok(a) => {
                if last_error.take().is_some() {
                    tracing::info!(socket = %socket.display(), "the kubelet's PodResources API answers again");
                }
                latest.set(a);
            }
            Err(f) => {
                if last_error != Some(f.reason) {
                    tracing::warn!(socket = %socket.display(), error = %f.detail, "kubelet PodResources API unavailable; observer_gpu_pod_resources_up is 0 and GPU series carry no pods (mount the kubelet's pod-resources directory, see --pod-resources-socket)");
                    last_error = Some(f.reason);
                } else {
                    tracing::debug!(socket = %socket.display(), error = %f.detail, "kubelet PodResources API unavailable");
                }
                latest.set(Allocations::default());
            }
        }
        let deadline = started + interval;
        loop {
            if stop.load(Ordering::Acquire) {
                return;
            }
            let now = Instant::now();
            if now >= deadline {
                break;
            }
            std::thread::park_timeout(deadline - now);
        }
    }
}

/// One refresh: connect, List, GetAllocatableResources, within `timeout`.
/// On a runtime of its own, dropped at the end: whatever a kubelet that
/// never answers left pending (a connection, its task) goes with it.
fn refresh(socket: &Path, timeout: Duration) -> Result<Allocations, Failure> {
    if !socket.exists() {
        return Err(Failure { reason: Reason::NoSocket, detail: format!("no socket at {}", socket.display()) });
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| Failure::failed(format!("cannot start a runtime: {e}")))?;
    rt.block_on(async {
        tokio::time::timeout(timeout, ask(socket)).await.unwrap_or_else(|_| {
            Err(Failure { reason: Reason::NoAnswer, detail: format!("no answer within {timeout:?}") })
        })
    })
}

async fn ask(socket: &Path) -> Result<Allocations, Failure> {
    let path = socket.to_path_buf();
    // The URI is required by the API and ignored: the connector dials the socket.
    let channel = tonic::transport::Endpoint::from_static("http://kubelet")
        .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
            let path = path.clone();
            async move { tokio::net::UnixStream::connect(path).await.map(hyper_util::rt::TokioIo::new) }
        }))
        .await
        .map_err(|e| Failure::failed(format!("connecting: {}", chain(&e))))?;
    let mut client = PodResourcesListerClient::new(channel).max_decoding_message_size(MAX_ANSWER);
    let list = client
        .list(ListPodResourcesRequest {})
        .await
        .map_err(|s| Failure::failed(format!("List: {}", status(&s))))?
        .into_inner();
    let mut a = Allocations { up: true, ..Allocations::default() };
    for pod in list.pod_resources {
        for c in pod.containers {
            for d in c.devices.into_iter().filter(|d| d.resource_name.starts_with(RESOURCE_PREFIX)) {
                for id in d.device_ids {
                    let id = id.split_once("::").map_or(id.as_str(), |(uuid, _)| uuid).to_string();
                    let owner =
                        Owner { namespace: pod.namespace.clone(), pod: pod.name.clone(), container: c.name.clone() };
                    let owners = a.devices.entry(id).or_default();
                    let entry = (d.resource_name.clone(), owner);
                    if !owners.contains(&entry) {
                        owners.push(entry);
                        owners.sort();
                    }
                }
            }
        }
    }
    // Older kubelets (before 1.23, or with the feature gate off) answer Unimplemented.
    match client.get_allocatable_resources(AllocatableResourcesRequest {}).await {
        Ok(r) => {
            for d in r.into_inner().devices.into_iter().filter(|d| d.resource_name.starts_with(RESOURCE_PREFIX)) {
                *a.allocatable.entry(d.resource_name).or_default() += d.device_ids.len() as u64;
            }
        }
        Err(s) => tracing::debug!(code = %s.code(), error = %s.message(), "GetAllocatableResources"),
    }
    Ok(a)
}

/// Families of the PodResources client, exported while NVML is up.
pub const FAMILIES: [(&str, &[&str], &str); 3] = [
    (
        "observer_gpu_pod_resources_up",
        &[],
        "1 when the last refresh from the kubelet's PodResources API (--pod-resources-socket) succeeded; 0 when the socket is missing, the kubelet did not answer in time or its answer did not decode (the log says why), and then GPU series carry no pod, namespace and container labels.",
    ),
    (
        "observer_gpu_allocation_info",
        &["resource", "device", "namespace", "pod", "container"],
        "A device of an nvidia.com/* resource allocated to a pod's container, as the kubelet's PodResources API reports it (value 1): device is the GPU UUID, or the MIG device UUID for MIG resources.",
    ),
    (
        "observer_gpu_allocatable_devices",
        &["resource"],
        "Devices of an nvidia.com/* resource the kubelet can allocate (PodResources GetAllocatableResources); absent where the kubelet does not offer that call.",
    ),
];

fn pair(name: &str, value: &str) -> LabelPair {
    let mut p = LabelPair::default();
    p.set_name(name.into());
    p.set_value(value.into());
    p
}

/// Adds `namespace`, `pod` and `container` to every series that names a
/// GPU (a `uuid` label and no `pod` label yet) or a MIG device (`mig_uuid`)
/// allocated to a pod, and
/// appends this client's own families. Unallocated GPUs' series keep their
/// labels: an absent label is an empty one to Prometheus.
pub fn annotate(out: &mut Vec<MetricFamily>, a: &Allocations) {
    for mf in out.iter_mut() {
        for m in mf.mut_metric().iter_mut() {
            let labels = m.get_label();
            if labels.iter().any(|l| l.name() == "pod") {
                continue;
            }
            // A MIG device's series by its own UUID, never its GPU's.
            let device =
                labels.iter().find(|l| l.name() == "mig_uuid").or_else(|| labels.iter().find(|l| l.name() == "uuid"));
            let Some(owner) = device.and_then(|l| a.owner(l.value())) else {
                continue;
            };
            let mut labels = labels.to_vec();
            labels.extend([
                pair("pod", &owner.pod),
                pair("namespace", &owner.namespace),
                pair("container", &owner.container),
            ]);
            m.set_label(labels);
        }
    }
    let gauge = |value: f64, labels: &[(&str, &str)]| {
        let mut m = Metric::from_label(labels.iter().map(|(k, v)| pair(k, v)).collect());
        let mut g = Gauge::default();
        g.set_value(value);
        m.set_gauge(g);
        m
    };
    let mut fams: Vec<MetricFamily> = FAMILIES
        .iter()
        .map(|(name, _, help)| {
            let mut mf = MetricFamily::default();
            mf.set_name(name.to_string());
            mf.set_help(help.to_string());
            mf.set_field_type(MetricType::GAUGE);
            mf
        })
        .collect();
    fams[0].mut_metric().push(gauge(if a.up { 1.0 } else { 0.0 }, &[]));
    for (device, owners) in &a.devices {
        for (resource, o) in owners {
            let labels = [
                ("resource", resource.as_str()),
                ("device", device),
                ("namespace", &o.namespace),
                ("pod", &o.pod),
                ("container", &o.container),
            ];
            fams[1].mut_metric().push(gauge(1.0, &labels));
        }
    }
    for (resource, n) in &a.allocatable {
        fams[2].mut_metric().push(gauge(*n as f64, &[("resource", resource)]));
    }
    out.extend(fams.into_iter().filter(|mf| !mf.get_metric().is_empty()));
}

/// A gRPC status as a log line: code, message, and what caused it (a
/// transport error's own cause says what the connection did).
fn status(s: &tonic::Status) -> String {
    let mut out = format!("{} ({})", s.message(), s.code());
    if let Some(source) = std::error::Error::source(s) {
        out.push_str(": ");
        out.push_str(&chain(source));
    }
    out
}

fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(e) = source {
        s.push_str(": ");
        s.push_str(&e.to_string());
        source = e.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owner_is_the_first_of_a_shared_device() {
        let o = |p: &str| Owner { namespace: "ns".into(), pod: p.into(), container: "c".into() };
        let mut a = Allocations::default();
        a.devices.insert("GPU-a".into(), vec![("nvidia.com/gpu".into(), o("a")), ("nvidia.com/gpu".into(), o("b"))]);
        assert_eq!(a.owner("GPU-a").map(|o| o.pod.as_str()), Some("a"));
        assert_eq!(a.owner("GPU-b"), None);
    }

    #[test]
    fn allocated_gpu_series_gain_owner_labels_and_others_keep_theirs() {
        use prometheus::{Encoder, TextEncoder};

        use crate::gpu::{
            metrics::families,
            snapshot::{GpuState, GpuValues, Snapshot},
        };
        let gpu = |index, uuid: &str| GpuState {
            index,
            uuid: uuid.into(),
            up: true,
            values: GpuValues { utilization_ratio: Some(0.5), ..GpuValues::default() },
            ..GpuState::default()
        };
        let s = Snapshot { nvml_up: true, gpus: vec![gpu(0, "GPU-a"), gpu(1, "GPU-b")], ..Snapshot::default() };
        let mut a = Allocations { up: true, ..Allocations::default() };
        let owner = Owner { namespace: "team-a".into(), pod: "trainer-0".into(), container: "main".into() };
        a.devices.insert("GPU-a".into(), vec![("nvidia.com/gpu".into(), owner)]);
        a.allocatable.insert("nvidia.com/gpu".into(), 2);
        let mut out = families(&s);
        annotate(&mut out, &a);
        // Through a registry, as /metrics does: mixed label sets in a family gather.
        let registry = prometheus::Registry::new();
        struct Fixed(Vec<MetricFamily>, Vec<prometheus::core::Desc>);
        impl prometheus::core::Collector for Fixed {
            fn desc(&self) -> Vec<&prometheus::core::Desc> {
                self.1.iter().collect()
            }
            fn collect(&self) -> Vec<MetricFamily> {
                self.0.clone()
            }
        }
        registry.register(Box::new(Fixed(out, vec![]))).unwrap();
        let mut buf = Vec::new();
        TextEncoder::new().encode(&registry.gather(), &mut buf).unwrap();
        let t = String::from_utf8(buf).unwrap();
        for line in [
            r#"observer_gpu_utilization_ratio{gpu="0",uuid="GPU-a",pod="trainer-0",namespace="team-a",container="main"} 0.5"#,
            r#"observer_gpu_utilization_ratio{gpu="1",uuid="GPU-b"} 0.5"#,
            r#"observer_gpu_up{gpu="0",uuid="GPU-a",pod="trainer-0",namespace="team-a",container="main"} 1"#,
            "observer_gpu_pod_resources_up 1",
            r#"observer_gpu_allocation_info{resource="nvidia.com/gpu",device="GPU-a",namespace="team-a",pod="trainer-0",container="main"} 1"#,
            r#"observer_gpu_allocatable_devices{resource="nvidia.com/gpu"} 2"#,
        ] {
            assert!(t.lines().any(|l| l == line), "missing {line}:\n{t}");
        }
    }

    #[test]
    fn timeouts_stay_between_one_and_ten_seconds() {
        assert_eq!(call_timeout(Duration::from_millis(100)), Duration::from_secs(1));
        assert_eq!(call_timeout(Duration::from_secs(5)), Duration::from_secs(5));
        assert_eq!(call_timeout(Duration::from_secs(60)), Duration::from_secs(10));
    }

    #[test]
    fn a_missing_socket_is_an_error_without_waiting() {
        let t = Instant::now();
        let e = refresh(Path::new("/nonexistent/kubelet.sock"), Duration::from_secs(5)).unwrap_err();
        assert_eq!(e.reason, Reason::NoSocket);
        assert_eq!(e.detail, "no socket at /nonexistent/kubelet.sock");
        assert!(t.elapsed() < Duration::from_secs(1));
    }
}
