//! GPUs as Kubernetes sees them: the observer asks a fake kubelet, a real
//! gRPC server of the PodResources v1 service generated from the same
//! upstream proto (observer-podresources, `server` feature), on a unix
//! socket in a temp dir, which pod holds each GPU of the fake NVML library
//! (`tests/csrc/fake_nvml.c`), and labels the GPU series with it.
use std::{
    fs,
    io::Write as _,
    os::unix::net::UnixListener,
    path::Path,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use observer_podresources::v1::{
    AllocatableResourcesRequest, AllocatableResourcesResponse, ContainerDevices, ContainerResources,
    GetPodResourcesRequest, GetPodResourcesResponse, ListPodResourcesRequest, ListPodResourcesResponse, PodResources,
    pod_resources_lister_server::{PodResourcesLister, PodResourcesListerServer},
};
use observer_tests::{FakeNvml, Metrics, NetNs, ObserverProcess, TempDir, promtool_check_metrics, wait_until};
use tonic::{Request, Response, Status};

const UUID_A: &str = "GPU-5e1b9c1a-7d2e-4f30-8a41-b52c63d74e85";
const UUID_B: &str = "GPU-0c9d8e7f-6a5b-4c3d-9e2f-1a0b9c8d7e6f";
/// A MIG device of GPU-B (the device plugin's mixed strategy names it by its own UUID).
const MIG_B0: &str = "MIG-4f1a2b3c-0d9e-5f60-8a7b-1c2d3e4f5a6b";
const WAIT: Duration = Duration::from_secs(20);
/// --gpu-interval, which is also the PodResources refresh.
const INTERVAL: Duration = Duration::from_millis(500);

/// The kubelet's side: the allocations List answers, changeable while it runs.
#[derive(Clone, Default)]
struct Kubelet {
    pods: Arc<Mutex<Vec<PodResources>>>,
}

#[tonic::async_trait]
impl PodResourcesLister for Kubelet {
    async fn list(&self, _: Request<ListPodResourcesRequest>) -> Result<Response<ListPodResourcesResponse>, Status> {
        Ok(Response::new(ListPodResourcesResponse { pod_resources: self.pods.lock().unwrap().clone() }))
    }

    async fn get_allocatable_resources(
        &self,
        _: Request<AllocatableResourcesRequest>,
    ) -> Result<Response<AllocatableResourcesResponse>, Status> {
        let devices = vec![gpus(&[UUID_A, UUID_B])];
        Ok(Response::new(AllocatableResourcesResponse { devices, ..Default::default() }))
    }

    async fn get(&self, _: Request<GetPodResourcesRequest>) -> Result<Response<GetPodResourcesResponse>, Status> {
        Err(Status::unimplemented("not used by the observer"))
    }
}

fn gpus(ids: &[&str]) -> ContainerDevices {
    ContainerDevices {
        resource_name: "nvidia.com/gpu".into(),
        device_ids: ids.iter().map(|s| s.to_string()).collect(),
        topology: None,
    }
}

fn pod(namespace: &str, name: &str, container: &str, devices: Vec<ContainerDevices>) -> PodResources {
    PodResources {
        name: name.into(),
        namespace: namespace.into(),
        containers: vec![ContainerResources { name: container.into(), devices, ..Default::default() }],
        ..Default::default()
    }
}

/// Serves `router` on `socket` from a thread of its own until the process ends.
fn serve(router: tonic::transport::server::Router, socket: &Path) {
    let _ = fs::remove_file(socket);
    let listener = UnixListener::bind(socket).unwrap();
    listener.set_nonblocking(true).unwrap();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async move {
            let listener = tokio::net::UnixListener::from_std(listener).unwrap();
            let incoming = tokio_stream::wrappers::UnixListenerStream::new(listener);
            router.serve_with_incoming(incoming).await.unwrap();
        })
    });
}

/// A kubelet that answers gRPC, but not with the PodResources messages: its
/// List answer's field 1 (repeated PodResources, length-delimited in the real
/// message) is a fixed64, so the answer does not decode.
#[derive(Clone)]
struct Malformed;

#[derive(Clone, PartialEq, prost::Message)]
struct NotAListAnswer {
    #[prost(fixed64, tag = "1")]
    pod_resources: u64,
}

impl tonic::server::NamedService for Malformed {
    const NAME: &'static str = "v1.PodResourcesLister";
}

impl<B> tonic::codegen::Service<tonic::codegen::http::Request<B>> for Malformed
where
    B: tonic::codegen::Body + Send + 'static,
    B::Error: Into<tonic::codegen::StdError> + Send + 'static,
{
    type Response = tonic::codegen::http::Response<tonic::body::Body>;
    type Error = std::convert::Infallible;
    type Future = tonic::codegen::BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, _: &mut std::task::Context<'_>) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    /// Every method gets the same answer (the observer calls List first).
    fn call(&mut self, req: tonic::codegen::http::Request<B>) -> Self::Future {
        struct Answer;
        impl tonic::server::UnaryService<ListPodResourcesRequest> for Answer {
            type Response = NotAListAnswer;
            type Future = tonic::codegen::BoxFuture<Response<NotAListAnswer>, Status>;
            fn call(&mut self, _: Request<ListPodResourcesRequest>) -> Self::Future {
                Box::pin(async { Ok(Response::new(NotAListAnswer { pod_resources: 7 })) })
            }
        }
        Box::pin(
            async move { Ok(tonic::server::Grpc::new(tonic_prost::ProstCodec::default()).unary(Answer, req).await) },
        )
    }
}

impl Kubelet {
    /// Serves on `socket` from a thread of its own until the process ends.
    fn serve(&self, socket: &Path) {
        serve(tonic::transport::Server::builder().add_service(PodResourcesListerServer::new(self.clone())), socket);
    }

    fn set(&self, pods: Vec<PodResources>) {
        *self.pods.lock().unwrap() = pods;
    }
}

/// The fake NVML library with two GPUs, and `observer run` on it; the fake
/// (its directory) lives as long as the observer.
fn start(ns: &NetNs, socket: &Path) -> (FakeNvml, ObserverProcess) {
    let conf = format!(
        "count=2
gpu0.uuid={UUID_A}
gpu0.util=37
gpu0.mem_total=1000
gpu0.mem_used=100
gpu1.uuid={UUID_B}
gpu1.util=5
gpu1.mem_total=2000
gpu1.mem_used=0
gpu1.mig=1
gpu1.mig_devices={MIG_B0}:10:500
"
    );
    let fake = FakeNvml::new("gpu-pods-nvml", &conf);
    let interval = format!("{}ms", INTERVAL.as_millis());
    let mut args = vec!["--iface".to_string(), "lo".into()];
    args.extend(fake.args(&interval));
    args.extend(["--pod-resources-socket".into(), socket.to_str().unwrap().into()]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let obs = ObserverProcess::start(ns, &args).unwrap();
    (fake, obs)
}

fn wait_metrics(obs: &mut ObserverProcess, what: &str, cond: impl Fn(&Metrics) -> bool) -> Metrics {
    let mut last = None;
    let r = wait_until(what, WAIT, Duration::from_millis(20), || {
        let m = obs.metrics()?;
        let ok = cond(&m);
        last = Some(m.clone());
        Ok(ok.then_some(m))
    });
    r.unwrap_or_else(|e| panic!("{e:#}\nlast scrape:\n{last:?}\nlog:\n{}", obs.log()))
}

fn owner(namespace: &str, pod: &str, container: &str) -> [(&'static str, String); 3] {
    [("namespace", namespace.into()), ("pod", pod.into()), ("container", container.into())]
}

/// The utilisation series of `uuid` carries exactly `owner` (or no owner labels).
fn owned_by(m: &Metrics, gpu: &str, uuid: &str, owner: Option<[(&str, String); 3]>) -> bool {
    let mut labels = vec![("gpu", gpu.to_string()), ("uuid", uuid.to_string())];
    labels.extend(owner.into_iter().flatten());
    let labels: Vec<(&str, &str)> = labels.iter().map(|(k, v)| (*k, v.as_str())).collect();
    m.value_exact("observer_gpu_utilization_ratio", &labels).is_some()
        && m.value_exact("observer_gpu_memory_total_bytes", &labels).is_some()
}

fn up(m: &Metrics) -> Option<f64> {
    m.value_exact("observer_gpu_pod_resources_up", &[])
}

#[test]
fn gpu_series_carry_the_pod_the_kubelet_allocated_them_to() {
    let dir = TempDir::new("gpu-pods").unwrap();
    let socket = dir.path().join("kubelet.sock");
    let kubelet = Kubelet::default();
    let mig = ContainerDevices {
        resource_name: "nvidia.com/mig-1g.10gb".into(),
        device_ids: vec![MIG_B0.into()],
        topology: None,
    };
    kubelet.set(vec![
        pod("team-a", "trainer-0", "main", vec![gpus(&[UUID_A])]),
        pod("team-c", "notebook-0", "lab", vec![mig]),
    ]);
    kubelet.serve(&socket);
    let ns = NetNs::new("gpu-pods").unwrap();
    let (_fake, mut obs) = start(&ns, &socket);

    let m = wait_metrics(&mut obs, "GPU-A owned by team-a/trainer-0/main", |m| {
        up(m) == Some(1.0) && owned_by(m, "0", UUID_A, Some(owner("team-a", "trainer-0", "main")))
    });
    // GPU-B is allocated to nobody: its series have no (empty) owner labels.
    assert!(owned_by(&m, "1", UUID_B, None), "{m:?}");
    assert!(m.matching("observer_gpu_utilization_ratio", &[("uuid", UUID_B), ("pod", "trainer-0")]).is_empty());
    let info = [
        ("resource", "nvidia.com/gpu"),
        ("device", UUID_A),
        ("namespace", "team-a"),
        ("pod", "trainer-0"),
        ("container", "main"),
    ];
    assert_eq!(m.value_exact("observer_gpu_allocation_info", &info), Some(1.0), "{m:?}");
    assert_eq!(m.value_exact("observer_gpu_allocatable_devices", &[("resource", "nvidia.com/gpu")]), Some(2.0));
    // GPU-B's MIG device is allocated by its own UUID: its series carry its
    // owner, GPU-B's own series none (checked above).
    let mig_labels = [("gpu", "1"), ("uuid", UUID_B), ("mig_uuid", MIG_B0)];
    let mut owned_mig: Vec<(&str, &str)> = mig_labels.to_vec();
    owned_mig.extend([("namespace", "team-c"), ("pod", "notebook-0"), ("container", "lab")]);
    assert_eq!(m.value_exact("observer_gpu_mig_info", &owned_mig), Some(1.0), "{m:?}");
    assert_eq!(m.value_exact("observer_gpu_mig_memory_total_bytes", &owned_mig), Some(500.0), "{m:?}");
    let info = [
        ("resource", "nvidia.com/mig-1g.10gb"),
        ("device", MIG_B0),
        ("namespace", "team-c"),
        ("pod", "notebook-0"),
        ("container", "lab"),
    ];
    assert_eq!(m.value_exact("observer_gpu_allocation_info", &info), Some(1.0), "{m:?}");
    // Series of one family with and without owner labels: still a clean exposition.
    promtool_check_metrics(m.raw()).unwrap();

    // A new allocation is on the series within one refresh (plus the
    // scrape's own polling and a loaded machine's slack).
    kubelet.set(vec![pod("team-b", "infer-1", "server", vec![gpus(&[&format!("{UUID_B}::1")])])]);
    let changed = Instant::now();
    let m = wait_metrics(&mut obs, "GPU-B owned by team-b/infer-1/server, GPU-A by nobody", |m| {
        owned_by(m, "1", UUID_B, Some(owner("team-b", "infer-1", "server"))) && owned_by(m, "0", UUID_A, None)
    });
    let took = changed.elapsed();
    assert!(took < INTERVAL * 2, "the change took {took:?}, more than one refresh ({INTERVAL:?})\n{m:?}");
    // The MIG device was freed: its series carry no owner, not its GPU's.
    assert_eq!(m.value_exact("observer_gpu_mig_info", &mig_labels), Some(1.0), "{m:?}");
}

/// Errors of the kubelet's side: none stalls the NVML sampler or a scrape,
/// each makes `observer_gpu_pod_resources_up 0` and leaves the GPU series
/// without owners, and each is logged once.
#[test]
fn kubelet_missing_slow_or_garbled_leaves_gpu_series_alone() {
    let dir = TempDir::new("gpu-pods-err").unwrap();
    let socket = dir.path().join("kubelet.sock");
    let ns = NetNs::new("gpu-pods-err").unwrap();
    let (_fake, mut obs) = start(&ns, &socket);
    let sampled = |m: &Metrics| m.value_exact("observer_nvml_last_sample_timestamp_seconds", &[]).unwrap_or(0.0);
    // The sampler keeps its pace and scrapes answer at once while the kubelet misbehaves.
    let sampler_runs = |obs: &mut ObserverProcess, what: &str| {
        let t = sampled(&wait_metrics(obs, what, |m| up(m) == Some(0.0) && owned_by(m, "0", UUID_A, None)));
        std::thread::sleep(INTERVAL * 4);
        let started = Instant::now();
        let m = obs.metrics().unwrap();
        assert!(started.elapsed() < Duration::from_millis(500), "{what}: the scrape waited");
        assert!(sampled(&m) > t, "{what}: the sampler stalled\n{m:?}");
        assert_eq!(up(&m), Some(0.0), "{what}");
        assert!(owned_by(&m, "1", UUID_B, None), "{what}\n{m:?}");
    };

    // 1. No socket.
    sampler_runs(&mut obs, "no socket");
    let warned = |obs: &ObserverProcess, needle: &str| obs.log().lines().filter(|l| l.contains(needle)).count();
    assert_eq!(warned(&obs, "no socket at"), 1, "a missing socket is logged once:\n{}", obs.log());

    // 2. A kubelet that accepts and never answers.
    let silent = UnixListener::bind(&socket).unwrap();
    let held: Arc<Mutex<Vec<std::os::unix::net::UnixStream>>> = Arc::default();
    {
        let (silent, held) = (silent.try_clone().unwrap(), held.clone());
        std::thread::spawn(move || {
            for c in silent.incoming().flatten() {
                held.lock().unwrap().push(c);
            }
        });
    }
    sampler_runs(&mut obs, "a silent kubelet");
    assert!(warned(&obs, "no answer within") >= 1, "{}", obs.log());
    // Each refresh that timed out left nothing open behind it (its connection, a task).
    let fds = |obs: &mut ObserverProcess| obs.metrics().unwrap().value_exact("process_open_fds", &[]).unwrap();
    let before = fds(&mut obs);
    std::thread::sleep(Duration::from_secs(4));
    let after = fds(&mut obs);
    assert!(after <= before + 1.0, "open files grew from {before} to {after} over 4 refreshes of a silent kubelet");
    drop(silent);

    // 3. A kubelet that answers gRPC whose message does not decode.
    serve(tonic::transport::Server::builder().add_service(Malformed), &socket);
    sampler_runs(&mut obs, "a kubelet whose answer does not decode");
    assert!(warned(&obs, "failed to decode") >= 1, "{}", obs.log());

    // 4. A kubelet that answers garbage, not HTTP/2: a failure like the one
    // before, so not logged again.
    fs::remove_file(&socket).unwrap();
    let garbled = UnixListener::bind(&socket).unwrap();
    std::thread::spawn(move || {
        for mut c in garbled.incoming().flatten() {
            let _ = c.write_all(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n\x00\x01\x02garbage");
        }
    });
    std::thread::sleep(INTERVAL * 2);
    sampler_runs(&mut obs, "a garbled kubelet");
    let reasons = warned(&obs, "PodResources API unavailable");
    assert_eq!(reasons, 3, "missing, silent, malformed or garbled: each reason logged once\n{}", obs.log());

    // 5. The kubelet is back: owners return.
    let kubelet = Kubelet::default();
    kubelet.set(vec![pod("team-a", "trainer-0", "main", vec![gpus(&[UUID_A])])]);
    kubelet.serve(&socket);
    wait_metrics(&mut obs, "the kubelet answers again", |m| {
        up(m) == Some(1.0) && owned_by(m, "0", UUID_A, Some(owner("team-a", "trainer-0", "main")))
    });
    assert!(obs.log().contains("PodResources API answers again"), "{}", obs.log());
    held.lock().unwrap().clear();
}
