//! GPU statistics through NVML, end to end, against a fake NVML library
//! (`tests/csrc/fake_nvml.c`; there is no GPU on CI). Each test copies the
//! fake into its own directory next to its `fake-nvml.conf`, points the real
//! observer at it with `--nvml-lib`, and rewrites the configuration while the
//! observer runs (a GPU falls off the bus, the driver goes away, NVML blocks).
//! The real NVML path is the same code with the real library.
use std::{
    fs,
    net::{Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use observer_tests::{
    FakeNvml, Metrics, NetNs, ObserverProcess, TcpServer, promtool_check_metrics, run_observer_cli, transfer,
    wait_until,
};

const UUID0: &str = "GPU-5e1b9c1a-7d2e-4f30-8a41-b52c63d74e85";
const UUID1: &str = "GPU-0c9d8e7f-6a5b-4c3d-9e2f-1a0b9c8d7e6f";
/// Long enough for backoff (1 s, 2 s, 4 s) and a few 100 ms cycles.
const WAIT: Duration = Duration::from_secs(20);

/// Two GPUs: an H100 with every value and cumulative PCIe counters, an A100
/// in MIG mode with PCIe throughput samples only.
fn two_gpus() -> String {
    format!(
        "count=2
driver_version=550.54.15
gpu0.uuid={UUID0}
gpu0.name=NVIDIA H100 80GB HBM3
gpu0.pci_bus_id=00000000:17:00.0
gpu0.util=37
gpu0.mem_total=85520809984
gpu0.mem_used=2147483648
gpu0.power_mw=123456
gpu0.energy_mj=987654321
gpu0.temp=61
gpu0.pcie_tx_bytes=111111111111
gpu0.pcie_rx_bytes=222222222222
# Also present, and not to be used: the counters win.
gpu0.pcie_tx_kib=1
gpu0.pcie_rx_kib=1
gpu0.replays=3
gpu0.ecc_corrected=4
gpu0.ecc_uncorrected=5
# Lifetime counts: the observer reports the volatile ones.
gpu0.ecc_corrected_aggregate=400
gpu0.ecc_uncorrected_aggregate=500
gpu0.mig=0
gpu0.xid=0
gpu1.uuid={UUID1}
gpu1.name=NVIDIA A100-SXM4-40GB
gpu1.pci_bus_id=00000000:65:00.0
gpu1.util=100
gpu1.mem_total=42949672960
gpu1.mem_used=0
gpu1.power_mw=250
gpu1.energy_mj=1500
gpu1.temp=35
gpu1.pcie_tx_kib=1000
gpu1.pcie_rx_kib=3
gpu1.replays=0
gpu1.ecc_corrected=0
gpu1.ecc_uncorrected=0
gpu1.mig=1
gpu1.xid=0
"
    )
}

fn wait_metrics(obs: &mut ObserverProcess, what: &str, cond: impl Fn(&Metrics) -> bool) -> Metrics {
    let mut last = None;
    let r = wait_until(what, WAIT, Duration::from_millis(50), || {
        let m = obs.metrics()?;
        let ok = cond(&m);
        last = Some(m.clone());
        Ok(ok.then_some(m))
    });
    r.unwrap_or_else(|e| panic!("{e:#}\nlast scrape:\n{last:?}\nlog:\n{}", plain_log(obs)))
}

fn gpu(m: &Metrics, name: &str, index: &str) -> Option<f64> {
    m.value(name, &[("gpu", index)])
}

/// The observer's log without terminal colour codes.
fn plain_log(obs: &ObserverProcess) -> String {
    let log = obs.log();
    let mut out = String::with_capacity(log.len());
    let mut chars = log.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// The families of the PodResources client (tests/tests/gpu_pods.rs): named
/// observer_gpu_ but about the kubelet, not one GPU. Without a kubelet (these
/// tests) only `observer_gpu_pod_resources_up 0`, while NVML is up.
const POD_RESOURCES_FAMILIES: [&str; 3] =
    ["observer_gpu_pod_resources_up", "observer_gpu_allocation_info", "observer_gpu_allocatable_devices"];

/// Series of GPUs (and their pods' memory).
fn gpu_series(m: &Metrics) -> Vec<String> {
    m.samples()
        .iter()
        .filter(|s| s.name.starts_with("observer_gpu_") && !POD_RESOURCES_FAMILIES.contains(&s.name.as_str()))
        .map(|s| s.to_string())
        .collect()
}

#[test]
fn no_library_nvml_down_and_the_network_side_runs() {
    let ns = NetNs::new("gpu-nolib").unwrap();
    let mut obs = ObserverProcess::start(
        &ns,
        &["--iface", "lo", "--gpu-interval", "100ms", "--nvml-lib", "/nonexistent/nvidia/libnvidia-ml.so.1"],
    )
    .unwrap();
    let m = obs.metrics().unwrap();
    assert_eq!(m.value_exact("observer_nvml_up", &[]), Some(0.0), "{m:?}");
    assert!(gpu_series(&m).is_empty(), "{m:?}");
    assert!(m.help("observer_nvml_up").is_some_and(|h| h.contains("no library")), "{m:?}");
    wait_until("the reason in the log", WAIT, Duration::from_millis(50), || {
        Ok(plain_log(&obs).contains("cannot load the NVML library").then_some(()))
    })
    .unwrap();
    let log = plain_log(&obs);
    assert!(log.contains("/nonexistent/nvidia/libnvidia-ml.so.1") && log.contains("--nvml-lib"), "{log}");
    assert!(!log.contains("panicked"), "{log}");
    assert_eq!(obs.get("/readyz").unwrap().status, 200);
}

#[test]
fn required_refuses_to_start_without_nvml_with_exit_2() {
    let fake = FakeNvml::new("gpu-required", "init=driver_not_loaded\ncount=1\n");
    let lib = fake.lib.to_str().unwrap().to_string();
    let zero = FakeNvml::new("gpu-required-zero", "count=0\n");
    let zero_lib = zero.lib.to_str().unwrap().to_string();
    for (args, needles) in [
        (
            vec!["--nvml-lib", "/nonexistent/libnvidia-ml.so.1"],
            vec![
                "--gpu required, but NVML cannot start: cannot load the NVML library",
                "/nonexistent/libnvidia-ml.so.1",
            ],
        ),
        (
            vec!["--nvml-lib", &lib],
            vec!["--gpu required, but NVML cannot start: NVML initialisation through", "NVIDIA driver is not loaded"],
        ),
        (vec!["--nvml-lib", &zero_lib], vec!["--gpu required, but NVML cannot start: NVML started but reports no GPU"]),
    ] {
        let mut argv = vec!["run", "--listen", "127.0.0.1:0", "--gpu", "required"];
        argv.extend(args.iter().copied());
        let out = run_observer_cli(&argv).unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{argv:?}: {stderr}");
        for n in needles {
            assert!(stderr.contains(n), "{argv:?}: expected {n:?} in {stderr}");
        }
        assert!(!stderr.contains("panicked"), "{stderr}");
    }
}

#[test]
fn bad_gpu_flags_are_usage_errors() {
    for (args, needle) in [
        (&["--gpu", "maybe"][..], "[possible values: off, auto, required]"),
        (&["--gpu-interval", "5"][..], "`5` has no unit"),
        (&["--gpu-interval", "1ms"][..], "shorter than 100ms"),
        (&["--nvml-lib", ""][..], "the path is empty"),
        (&["--nvml-lib", "libnvidia-ml.so.1"][..], "is not a path"),
    ] {
        let mut argv = vec!["run", "--listen", "127.0.0.1:0"];
        argv.extend_from_slice(args);
        let out = run_observer_cli(&argv).unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains(needle), "{args:?}: expected {needle:?} in {stderr}");
    }
}

#[test]
fn init_failures_are_retried_and_a_driver_lost_mid_run_is_reinitialised() {
    let conf = two_gpus();
    let fake = FakeNvml::new("gpu-init", &format!("{conf}init=driver_not_loaded\n"));
    let ns = NetNs::new("gpu-init").unwrap();
    let mut obs = fake.start(&ns, &[]);
    let has = |obs: &ObserverProcess, s: &str| plain_log(obs).contains(s);

    let m = obs.metrics().unwrap();
    assert_eq!(m.value_exact("observer_nvml_up", &[]), Some(0.0), "{m:?}");
    wait_until("the driver error in the log", WAIT, Duration::from_millis(50), || {
        Ok(has(&obs, "NVIDIA driver is not loaded").then_some(()))
    })
    .unwrap();

    // Another reason is logged again.
    fake.set(&format!("{conf}init=no_permission\n"));
    wait_until("the permission error in the log", WAIT, Duration::from_millis(50), || {
        Ok(has(&obs, "cannot open the /dev/nvidia* devices").then_some(()))
    })
    .unwrap();
    assert_eq!(obs.metrics().unwrap().value_exact("observer_nvml_up", &[]), Some(0.0));

    // The driver arrives: the next retry (backoff 1 s, 2 s, 4 s...) succeeds.
    fake.set(&conf);
    wait_metrics(&mut obs, "NVML up after the retry", |m| {
        m.value_exact("observer_nvml_up", &[]) == Some(1.0) && gpu(m, "observer_gpu_up", "1") == Some(1.0)
    });
    assert!(has(&obs, "NVML ready"));

    // The driver goes away mid-run: NVML down, the GPU series go, then back.
    fake.set(&format!("{conf}error.nvmlDeviceGetCount_v2=driver_not_loaded\n"));
    let m = wait_metrics(&mut obs, "NVML down after the driver left", |m| {
        m.value_exact("observer_nvml_up", &[]) == Some(0.0)
    });
    assert!(gpu_series(&m).is_empty(), "{m:?}");
    fake.set(&conf);
    wait_metrics(&mut obs, "NVML back", |m| {
        m.value_exact("observer_nvml_up", &[]) == Some(1.0) && gpu(m, "observer_gpu_up", "0") == Some(1.0)
    });
    let log = plain_log(&obs);
    assert!(!log.contains("panicked"), "{log}");
    assert_eq!(obs.get("/readyz").unwrap().status, 200);
}

#[test]
fn zero_gpus_nvml_up_and_no_gpu_series() {
    let fake = FakeNvml::new("gpu-zero", "count=0\n");
    let ns = NetNs::new("gpu-zero").unwrap();
    let mut obs = fake.start(&ns, &[]);
    let m = wait_metrics(&mut obs, "a completed cycle", |m| {
        m.value_exact("observer_nvml_sample_duration_seconds", &[]).is_some()
    });
    assert_eq!(m.value_exact("observer_nvml_up", &[]), Some(1.0), "{m:?}");
    assert!(gpu_series(&m).is_empty(), "{m:?}");
    // No kubelet socket here (the default path on a test host).
    assert_eq!(m.value_exact("observer_gpu_pod_resources_up", &[]), Some(0.0), "{m:?}");
    // A GPU appears: the session is rebuilt with it.
    fake.set(&format!("count=1\ngpu0.uuid={UUID0}\ngpu0.util=5\n"));
    let m = wait_metrics(&mut obs, "the new GPU", |m| gpu(m, "observer_gpu_up", "0") == Some(1.0));
    assert_eq!(gpu(&m, "observer_gpu_utilization_ratio", "0"), Some(0.05));
    assert!(plain_log(&obs).contains("the GPU count changed from 0 to 1"));
}

#[test]
fn gpu_off_loads_nothing_and_exports_only_nvml_down() {
    let fake = FakeNvml::new("gpu-off", &two_gpus());
    let ns = NetNs::new("gpu-off").unwrap();
    let mut obs = fake.start(&ns, &["--gpu", "off"]);
    std::thread::sleep(Duration::from_millis(300));
    let m = obs.metrics().unwrap();
    assert_eq!(m.value_exact("observer_nvml_up", &[]), Some(0.0), "{m:?}");
    assert!(
        gpu_series(&m).is_empty() && m.value_exact("observer_nvml_sample_duration_seconds", &[]).is_none(),
        "{m:?}"
    );
    let maps = fs::read_to_string(format!("/proc/{}/maps", obs.pid())).unwrap();
    assert!(!maps.contains("libnvidia-ml"), "the library was loaded");
    assert!(plain_log(&obs).contains("GPU statistics off (--gpu off)"));
}

#[test]
fn two_gpus_every_metric_with_its_unit() {
    let fake = FakeNvml::new("gpu-two", &two_gpus());
    let ns = NetNs::new("gpu-two").unwrap();
    // `required` starts when NVML works.
    let mut obs = fake.start(&ns, &["--gpu", "required"]);
    let m = wait_metrics(&mut obs, "both GPUs sampled", |m| gpu(m, "observer_gpu_up", "1") == Some(1.0));

    assert_eq!(m.value_exact("observer_nvml_up", &[]), Some(1.0));
    let info = |idx: &str, uuid: &str, model: &str, bus: &str, mig: &str| {
        let labels = [
            ("gpu", idx),
            ("uuid", uuid),
            ("model", model),
            ("pci_bus_id", bus),
            ("driver_version", "550.54.15"),
            ("mig_mode", mig),
        ];
        assert_eq!(m.value_exact("observer_gpu_info", &labels), Some(1.0), "{labels:?}\n{m:?}");
    };
    info("0", UUID0, "NVIDIA H100 80GB HBM3", "00000000:17:00.0", "disabled");
    info("1", UUID1, "NVIDIA A100-SXM4-40GB", "00000000:65:00.0", "enabled");

    // (family, type, GPU 0, GPU 1): NVML's units converted to base units.
    let kib = 1024.0;
    let expected: &[(&str, &str, Option<f64>, Option<f64>)] = &[
        ("observer_gpu_up", "gauge", Some(1.0), Some(1.0)),
        ("observer_gpu_utilization_ratio", "gauge", Some(0.37), Some(1.0)),
        ("observer_gpu_memory_used_bytes", "gauge", Some(2147483648.0), Some(0.0)),
        ("observer_gpu_memory_total_bytes", "gauge", Some(85520809984.0), Some(42949672960.0)),
        ("observer_gpu_power_watts", "gauge", Some(123.456), Some(0.25)),
        ("observer_gpu_energy_joules_total", "counter", Some(987654.321), Some(1.5)),
        ("observer_gpu_temperature_celsius", "gauge", Some(61.0), Some(35.0)),
        ("observer_gpu_pcie_transmit_bytes_total", "counter", Some(111111111111.0), None),
        ("observer_gpu_pcie_receive_bytes_total", "counter", Some(222222222222.0), None),
        ("observer_gpu_pcie_transmit_bytes_per_second", "gauge", None, Some(1000.0 * kib)),
        ("observer_gpu_pcie_receive_bytes_per_second", "gauge", None, Some(3.0 * kib)),
        ("observer_gpu_pcie_replays_total", "counter", Some(3.0), Some(0.0)),
        ("observer_gpu_ecc_corrected_errors_total", "counter", Some(4.0), Some(0.0)),
        ("observer_gpu_ecc_uncorrected_errors_total", "counter", Some(5.0), Some(0.0)),
        ("observer_gpu_xid_errors_total", "counter", Some(0.0), Some(0.0)),
    ];
    for &(family, kind, v0, v1) in expected {
        assert_eq!(m.metric_type(family), Some(kind), "{family}");
        assert_eq!(m.value_exact(family, &[("gpu", "0"), ("uuid", UUID0)]), v0, "{family} on GPU 0\n{m:?}");
        assert_eq!(m.value_exact(family, &[("gpu", "1"), ("uuid", UUID1)]), v1, "{family} on GPU 1\n{m:?}");
    }
    // Every GPU and NVML family has HELP; per-GPU series carry gpu and uuid only.
    for s in m.samples().iter().filter(|s| s.name.starts_with("observer_gpu_") || s.name.starts_with("observer_nvml_"))
    {
        assert!(m.help(&s.name).is_some_and(|h| !h.is_empty()), "no HELP for {}", s.name);
        if s.name == "observer_gpu_pod_resources_up" {
            assert!(s.labels.is_empty(), "{s}");
        } else if !["observer_gpu_info", "observer_gpu_pod_memory_used_bytes"].contains(&s.name.as_str())
            && s.name.starts_with("observer_gpu_")
        {
            assert_eq!(s.labels.keys().map(String::as_str).collect::<Vec<_>>(), ["gpu", "uuid"], "{s}");
        }
    }
    let cycle = m.value_exact("observer_nvml_sample_duration_seconds", &[]).unwrap();
    assert!(cycle > 0.0 && cycle < 1.0, "{cycle}");
    let stamp = m.value_exact("observer_nvml_last_sample_timestamp_seconds", &[]).unwrap();
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs_f64();
    assert!((now - stamp).abs() < 5.0, "{stamp} vs {now}");

    // XID errors arrive as NVML events: counted, and logged with their code.
    fake.set(&two_gpus().replace("gpu0.xid=0", "gpu0.xid=2\ngpu0.xid_code=48"));
    wait_metrics(&mut obs, "two XID errors on GPU 0", |m| gpu(m, "observer_gpu_xid_errors_total", "0") == Some(2.0));
    let log = plain_log(&obs);
    assert_eq!(log.matches("XID error reported by the NVIDIA driver").count(), 2, "{log}");
    assert!(log.contains("xid=48"), "{log}");
    assert_eq!(
        obs.metrics().unwrap().value_exact("observer_gpu_xid_errors_total", &[("gpu", "1"), ("uuid", UUID1)]),
        Some(0.0)
    );
}

/// GPM on the H100 (values in nvml.h's units: percent, MiB/s), none on the
/// pre-Hopper A100: `observer_gpu_gpm_supported` 1 and 0, the families in
/// base units on GPU 0 from its second cycle, absent on GPU 1; promtool clean.
#[test]
fn gpm_families_on_hopper_absent_before() {
    let gpm = "gpu0.gpm=1
gpu0.gpm.2=62.5
gpu0.gpm.3=40
gpu0.gpm.5=25
gpu0.gpm.10=80
gpu0.gpm.13=10
gpu0.gpm.12=20
gpu0.gpm.11=5
gpu0.gpm.21=1024
gpu0.gpm.20=512
gpu0.gpm.60=2048
gpu0.gpm.61=4096
";
    let fake = FakeNvml::new("gpu-gpm", &format!("{}{gpm}", two_gpus()));
    let ns = NetNs::new("gpu-gpm").unwrap();
    let mut obs = fake.start(&ns, &[]);
    let m = wait_metrics(&mut obs, "GPM values of GPU 0", |m| {
        gpu(m, "observer_gpu_gpm_sm_activity_ratio", "0").is_some() && gpu(m, "observer_gpu_up", "1") == Some(1.0)
    });
    let mib = 1_048_576.0;
    let expected: &[(&str, Option<f64>, Option<f64>)] = &[
        ("observer_gpu_gpm_supported", Some(1.0), Some(0.0)),
        ("observer_gpu_gpm_sm_activity_ratio", Some(0.625), None),
        ("observer_gpu_gpm_sm_occupancy_ratio", Some(0.4), None),
        ("observer_gpu_gpm_tensor_activity_ratio", Some(0.25), None),
        ("observer_gpu_gpm_dram_bandwidth_utilization_ratio", Some(0.8), None),
        ("observer_gpu_gpm_fp16_activity_ratio", Some(0.1), None),
        ("observer_gpu_gpm_fp32_activity_ratio", Some(0.2), None),
        ("observer_gpu_gpm_fp64_activity_ratio", Some(0.05), None),
        ("observer_gpu_gpm_pcie_receive_bytes_per_second", Some(1024.0 * mib), None),
        ("observer_gpu_gpm_pcie_transmit_bytes_per_second", Some(512.0 * mib), None),
        ("observer_gpu_gpm_nvlink_receive_bytes_per_second", Some(2048.0 * mib), None),
        ("observer_gpu_gpm_nvlink_transmit_bytes_per_second", Some(4096.0 * mib), None),
    ];
    for &(family, v0, v1) in expected {
        assert_eq!(m.metric_type(family), Some("gauge"), "{family}");
        assert!(m.help(family).is_some_and(|h| !h.is_empty()), "no HELP for {family}");
        assert_eq!(m.value_exact(family, &[("gpu", "0"), ("uuid", UUID0)]), v0, "{family} on GPU 0\n{m:?}");
        assert_eq!(m.value_exact(family, &[("gpu", "1"), ("uuid", UUID1)]), v1, "{family} on GPU 1\n{m:?}");
    }
    promtool_check_metrics(m.raw()).unwrap();

    // A metric the GPU stops giving goes alone; the others stay.
    fake.set(&format!("{}{}", two_gpus(), gpm.replace("gpu0.gpm.61=4096\n", "")));
    let m = wait_metrics(&mut obs, "NVLink transmit gone on GPU 0", |m| {
        gpu(m, "observer_gpu_gpm_nvlink_transmit_bytes_per_second", "0").is_none()
    });
    assert_eq!(gpu(&m, "observer_gpu_gpm_nvlink_receive_bytes_per_second", "0"), Some(2048.0 * mib), "{m:?}");
}

/// MIG devices of a GPU in MIG mode are listed by their own UUIDs, with their
/// memory; a GPU out of MIG mode has none.
#[test]
fn mig_devices_are_listed() {
    const MIG_A: &str = "MIG-4f1a2b3c-0d9e-5f60-8a7b-1c2d3e4f5a6b";
    const MIG_B: &str = "MIG-9e8d7c6b-5a4f-5e3d-8c2b-a1b2c3d4e5f6";
    let conf = format!("{}gpu1.mig_devices={MIG_A}:1048576:10737418240,{MIG_B}:0:21474836480\n", two_gpus());
    let fake = FakeNvml::new("gpu-mig", &conf);
    let ns = NetNs::new("gpu-mig").unwrap();
    let mut obs = fake.start(&ns, &[]);
    let m = wait_metrics(&mut obs, "MIG devices of GPU 1", |m| !m.matching("observer_gpu_mig_info", &[]).is_empty());
    for (mig, used, total) in [(MIG_A, 1048576.0, 10737418240.0), (MIG_B, 0.0, 21474836480.0)] {
        let labels = [("gpu", "1"), ("uuid", UUID1), ("mig_uuid", mig)];
        assert_eq!(m.value_exact("observer_gpu_mig_info", &labels), Some(1.0), "{mig}\n{m:?}");
        assert_eq!(m.value_exact("observer_gpu_mig_memory_used_bytes", &labels), Some(used), "{mig}");
        assert_eq!(m.value_exact("observer_gpu_mig_memory_total_bytes", &labels), Some(total), "{mig}");
    }
    assert_eq!(m.matching("observer_gpu_mig_info", &[]).len(), 2, "{m:?}");
    assert!(m.matching("observer_gpu_mig_info", &[("gpu", "0")]).is_empty(), "GPU 0 is not in MIG mode\n{m:?}");
    promtool_check_metrics(m.raw()).unwrap();
}

/// GPM per MIG device on a Hopper GPU in MIG mode (nvmlGpmMigSampleGet for
/// each device's GPU instance): the ratios per `mig_uuid`, in base units; a
/// pre-Hopper GPU's MIG devices have memory and no utilisation (NVML gives
/// none there). A failing MIG sample drops only the MIG GPM series.
#[test]
fn mig_gpm_per_gpu_instance_on_hopper() {
    const MIG_A: &str = "MIG-11111111-2222-5333-8444-555555555555";
    const MIG_B: &str = "MIG-66666666-7777-5888-8999-aaaaaaaaaaaa";
    const MIG_C: &str = "MIG-bbbbbbbb-cccc-5ddd-8eee-ffffffffffff";
    // GPU 0 (H100, GPM) in MIG mode with instances 1 and 2; GPU 1 (A100, no GPM) with one.
    let conf = format!(
        "{}gpu0.gpm=1
gpu0.mig_devices={MIG_A}:1024:10737418240:1,{MIG_B}:0:21474836480:2
gpu0.mig1.gpm.2=62.5
gpu0.mig1.gpm.3=40
gpu0.mig1.gpm.5=25
gpu0.mig1.gpm.10=80
gpu0.mig1.gpm.11=5
gpu0.mig1.gpm.12=20
gpu0.mig1.gpm.13=10
gpu0.mig2.gpm.2=12.5
gpu1.mig_devices={MIG_C}:0:5368709120:3
gpu1.mig3.gpm.2=99
",
        two_gpus().replace("gpu0.mig=0", "gpu0.mig=1")
    );
    let fake = FakeNvml::new("gpu-mig-gpm", &conf);
    let ns = NetNs::new("gpu-mig-gpm").unwrap();
    let mut obs = fake.start(&ns, &[]);
    let m = wait_metrics(&mut obs, "GPM of both GPU instances", |m| {
        m.value("observer_gpu_mig_gpm_sm_activity_ratio", &[("mig_uuid", MIG_B)]).is_some()
            && m.value("observer_gpu_mig_info", &[("mig_uuid", MIG_C)]).is_some()
    });
    let a = [("gpu", "0"), ("uuid", UUID0), ("mig_uuid", MIG_A)];
    for (family, value) in [
        ("observer_gpu_mig_gpm_sm_activity_ratio", 0.625),
        ("observer_gpu_mig_gpm_sm_occupancy_ratio", 0.4),
        ("observer_gpu_mig_gpm_tensor_activity_ratio", 0.25),
        ("observer_gpu_mig_gpm_dram_bandwidth_utilization_ratio", 0.8),
        ("observer_gpu_mig_gpm_fp16_activity_ratio", 0.1),
        ("observer_gpu_mig_gpm_fp32_activity_ratio", 0.2),
        ("observer_gpu_mig_gpm_fp64_activity_ratio", 0.05),
    ] {
        assert_eq!(m.metric_type(family), Some("gauge"), "{family}");
        assert!(m.help(family).is_some_and(|h| !h.is_empty()), "no HELP for {family}");
        assert_eq!(m.value_exact(family, &a), Some(value), "{family}\n{m:?}");
    }
    let b = [("gpu", "0"), ("uuid", UUID0), ("mig_uuid", MIG_B)];
    assert_eq!(m.value_exact("observer_gpu_mig_gpm_sm_activity_ratio", &b), Some(0.125), "{m:?}");
    // Instance 2 gives SM activity only: the other metrics are absent, not 0.
    assert!(m.value("observer_gpu_mig_gpm_tensor_activity_ratio", &[("mig_uuid", MIG_B)]).is_none(), "{m:?}");
    // The A100's MIG device: memory, no GPM (its GPU has none, and NVML has no other utilisation of a MIG device).
    let c = [("gpu", "1"), ("uuid", UUID1), ("mig_uuid", MIG_C)];
    assert_eq!(m.value_exact("observer_gpu_mig_memory_total_bytes", &c), Some(5368709120.0), "{m:?}");
    assert_eq!(gpu(&m, "observer_gpu_gpm_supported", "1"), Some(0.0));
    let mut mig_c: Vec<String> = m
        .samples()
        .iter()
        .filter(|s| s.labels.get("mig_uuid").is_some_and(|u| u == MIG_C))
        .map(|s| s.name.clone())
        .collect();
    mig_c.sort();
    assert_eq!(
        mig_c,
        ["observer_gpu_mig_info", "observer_gpu_mig_memory_total_bytes", "observer_gpu_mig_memory_used_bytes"],
        "{m:?}"
    );
    promtool_check_metrics(m.raw()).unwrap();

    // The MIG samples fail: their series go, everything else stays; said once.
    fake.set(&format!("{conf}error.nvmlGpmMigSampleGet=unknown\n"));
    let m = wait_metrics(&mut obs, "MIG GPM gone", |m| {
        m.matching("observer_gpu_mig_gpm_sm_activity_ratio", &[]).is_empty()
    });
    std::thread::sleep(Duration::from_millis(500));
    let m2 = obs.metrics().unwrap();
    for m in [&m, &m2] {
        assert_eq!(m.value_exact("observer_gpu_mig_memory_used_bytes", &a), Some(1024.0), "{m:?}");
        assert_eq!(gpu(m, "observer_gpu_utilization_ratio", "0"), Some(0.37), "{m:?}");
        assert_eq!(gpu(m, "observer_gpu_up", "0"), Some(1.0), "{m:?}");
        assert!(m.matching("observer_gpu_mig_gpm_sm_activity_ratio", &[]).is_empty(), "{m:?}");
    }
    let log = plain_log(&obs);
    let warned = log.lines().filter(|l| l.contains("cannot read GPU value") && l.contains("mig_gpm_sample")).count();
    assert_eq!(warned, 1, "{log}");
    // And they come back.
    fake.set(&conf);
    wait_metrics(&mut obs, "MIG GPM back", |m| {
        m.value_exact("observer_gpu_mig_gpm_sm_activity_ratio", &b) == Some(0.125)
    });
}

/// NVLink per link: state, data counters (KiB in NVML, bytes here) and
/// error counters of active links; none on a GPU without NVLink. A counter
/// that fails goes alone, logged once; a GPU lost in an NVLink call is down
/// while the other GPU keeps every series.
#[test]
fn nvlinks_per_link_state_counters_and_errors() {
    let links = "gpu0.nvlink=1,1,0
gpu0.nvlink0.tx_kib=1000
gpu0.nvlink0.rx_kib=2000
gpu0.nvlink0.replay=1
gpu0.nvlink0.recovery=2
gpu0.nvlink0.crc_flit=3
gpu0.nvlink0.crc_data=4
gpu0.nvlink1.rx_kib=5
gpu0.nvlink1.replay=0
gpu0.nvlink2.tx_kib=7
gpu0.nvlink2.replay=9
";
    let conf = format!("{}{links}", two_gpus());
    let fake = FakeNvml::new("gpu-nvlink", &conf);
    let ns = NetNs::new("gpu-nvlink").unwrap();
    let mut obs = fake.start(&ns, &[]);
    let m = wait_metrics(&mut obs, "NVLink links of GPU 0", |m| {
        !m.matching("observer_gpu_nvlink_active", &[]).is_empty() && gpu(m, "observer_gpu_up", "1") == Some(1.0)
    });
    let link = |l: &'static str| [("gpu", "0"), ("uuid", UUID0), ("link", l)];
    // (family, link, value)
    let expected: &[(&str, &str, Option<f64>)] = &[
        ("observer_gpu_nvlink_active", "0", Some(1.0)),
        ("observer_gpu_nvlink_active", "1", Some(1.0)),
        ("observer_gpu_nvlink_active", "2", Some(0.0)),
        ("observer_gpu_nvlink_transmit_bytes_total", "0", Some(1000.0 * 1024.0)),
        ("observer_gpu_nvlink_receive_bytes_total", "0", Some(2000.0 * 1024.0)),
        ("observer_gpu_nvlink_transmit_bytes_total", "1", None),
        ("observer_gpu_nvlink_receive_bytes_total", "1", Some(5.0 * 1024.0)),
        // An inactive link's counters are not read.
        ("observer_gpu_nvlink_transmit_bytes_total", "2", None),
    ];
    for &(family, l, value) in expected {
        assert_eq!(m.value_exact(family, &link(l)), value, "{family} link {l}\n{m:?}");
    }
    for (kind, value) in [("replay", 1.0), ("recovery", 2.0), ("crc_flit", 3.0), ("crc_data", 4.0)] {
        let mut labels = link("0").to_vec();
        labels.push(("type", kind));
        assert_eq!(m.value_exact("observer_gpu_nvlink_errors_total", &labels), Some(value), "{kind}\n{m:?}");
    }
    let errors = |m: &Metrics, l: &str| m.matching("observer_gpu_nvlink_errors_total", &[("link", l)]).len();
    assert_eq!((errors(&m, "1"), errors(&m, "2")), (1, 0), "{m:?}");
    assert_eq!(m.metric_type("observer_gpu_nvlink_errors_total"), Some("counter"));
    assert_eq!(m.metric_type("observer_gpu_nvlink_receive_bytes_total"), Some("counter"));
    assert_eq!(m.metric_type("observer_gpu_nvlink_active"), Some("gauge"));
    // The A100 here has no NVLink: no series, and no log line about it.
    assert!(m.samples().iter().all(|s| !s.name.contains("_nvlink_") || s.labels["gpu"] == "0"), "{m:?}");
    assert!(!plain_log(&obs).contains("nvlink"), "{}", plain_log(&obs));
    promtool_check_metrics(m.raw()).unwrap();

    // A link goes down: its counters go, its state says so.
    fake.set(&format!("{conf}gpu0.nvlink=1,0,0\n"));
    let m =
        wait_metrics(&mut obs, "link 1 down", |m| m.value_exact("observer_gpu_nvlink_active", &link("1")) == Some(0.0));
    assert_eq!(m.value_exact("observer_gpu_nvlink_receive_bytes_total", &link("1")), None, "{m:?}");
    assert_eq!(m.value_exact("observer_gpu_nvlink_receive_bytes_total", &link("0")), Some(2000.0 * 1024.0));

    // The error counters fail: they go alone, and are logged once.
    fake.set(&format!("{conf}error.nvmlDeviceGetNvLinkErrorCounter=unknown\n"));
    wait_metrics(&mut obs, "NVLink error counters gone", |m| {
        m.matching("observer_gpu_nvlink_errors_total", &[]).is_empty()
    });
    std::thread::sleep(Duration::from_millis(500));
    let m = obs.metrics().unwrap();
    assert!(m.matching("observer_gpu_nvlink_errors_total", &[]).is_empty(), "{m:?}");
    assert_eq!(m.value_exact("observer_gpu_nvlink_active", &link("1")), Some(1.0), "{m:?}");
    assert_eq!(m.value_exact("observer_gpu_nvlink_transmit_bytes_total", &link("0")), Some(1000.0 * 1024.0));
    assert_eq!(gpu(&m, "observer_gpu_power_watts", "0"), Some(123.456));
    let log = plain_log(&obs);
    let warned = log.lines().filter(|l| l.contains("cannot read GPU value") && l.contains("nvlink_errors")).count();
    assert_eq!(warned, 1, "{log}");

    // The GPU falls off the bus in an NVLink call: GPU 0 down, GPU 1 intact.
    fake.set(&format!("{conf}error.nvmlDeviceGetNvLinkState=gpu_is_lost\n"));
    let m = wait_metrics(&mut obs, "GPU 0 lost", |m| gpu(m, "observer_gpu_up", "0") == Some(0.0));
    assert!(m.matching("observer_gpu_nvlink_active", &[]).is_empty(), "{m:?}");
    assert_eq!(gpu(&m, "observer_gpu_up", "1"), Some(1.0));
    assert_eq!(gpu(&m, "observer_gpu_power_watts", "1"), Some(0.25));
    assert_eq!(m.value_exact("observer_nvml_up", &[]), Some(1.0));
    fake.set(&conf);
    wait_metrics(&mut obs, "GPU 0 and its links back", |m| {
        m.value_exact("observer_gpu_nvlink_active", &link("2")) == Some(0.0)
            && gpu(m, "observer_gpu_up", "0") == Some(1.0)
    });
    assert!(!plain_log(&obs).contains("panicked"));
}

#[test]
fn unsupported_values_are_omitted_not_zero() {
    let conf = format!(
        "count=1
gpu0.uuid={UUID0}
gpu0.util=12
gpu0.mem_total=1000
gpu0.mem_used=10
gpu0.power_mw=5000
error.nvmlDeviceGetPowerUsage=no_permission
error.nvmlDeviceGetComputeRunningProcesses_v3=not_supported
"
    );
    let fake = FakeNvml::new("gpu-unsupported", &conf);
    let ns = NetNs::new("gpu-unsupported").unwrap();
    let mut obs = fake.start(&ns, &[]);
    wait_metrics(&mut obs, "the GPU sampled", |m| gpu(m, "observer_gpu_up", "0") == Some(1.0));
    // A few more cycles, to see that errors are logged once, not per cycle.
    std::thread::sleep(Duration::from_millis(500));
    let m = obs.metrics().unwrap();
    let mut names: Vec<&str> =
        m.samples().iter().filter(|s| s.name.starts_with("observer_gpu_")).map(|s| s.name.as_str()).collect();
    names.sort();
    assert_eq!(
        names,
        [
            "observer_gpu_gpm_supported",
            "observer_gpu_info",
            "observer_gpu_memory_total_bytes",
            "observer_gpu_memory_used_bytes",
            "observer_gpu_pod_resources_up",
            "observer_gpu_up",
            "observer_gpu_utilization_ratio"
        ],
        "{m:?}"
    );
    assert_eq!(gpu(&m, "observer_gpu_utilization_ratio", "0"), Some(0.12));
    // No GPM on this (pre-Hopper) fake: said so, and no GPM family.
    assert_eq!(gpu(&m, "observer_gpu_gpm_supported", "0"), Some(0.0));
    assert_eq!(m.value("observer_gpu_info", &[("gpu", "0")]), Some(1.0));
    assert!(m.matching("observer_gpu_info", &[("mig_mode", "unsupported"), ("model", "Fake GPU")]).len() == 1, "{m:?}");
    let log = plain_log(&obs);
    let warned: Vec<&str> = log.lines().filter(|l| l.contains("cannot read GPU value")).collect();
    assert_eq!(warned.len(), 1, "no permission is logged once:\n{log}");
    assert!(warned[0].contains(r#"field="power""#) && warned[0].contains("permission"), "{log}");
}

#[test]
fn a_gpu_lost_mid_run_goes_down_and_comes_back() {
    let conf = two_gpus();
    let fake = FakeNvml::new("gpu-lost", &conf);
    let ns = NetNs::new("gpu-lost").unwrap();
    let mut obs = fake.start(&ns, &[]);
    wait_metrics(&mut obs, "both GPUs up", |m| gpu(m, "observer_gpu_up", "1") == Some(1.0));

    fake.set(&format!("{conf}gpu1.lost=1\n"));
    let m = wait_metrics(&mut obs, "GPU 1 down", |m| gpu(m, "observer_gpu_up", "1") == Some(0.0));
    assert_eq!(m.value_exact("observer_nvml_up", &[]), Some(1.0), "{m:?}");
    let gpu1: Vec<&str> =
        m.samples().iter().filter(|s| s.labels.get("gpu").is_some_and(|g| g == "1")).map(|s| s.name.as_str()).collect();
    assert_eq!(
        gpu1,
        ["observer_gpu_info", "observer_gpu_up"],
        "a lost GPU keeps its identity and loses its values\n{m:?}"
    );
    assert_eq!(gpu(&m, "observer_gpu_up", "0"), Some(1.0));
    assert_eq!(gpu(&m, "observer_gpu_utilization_ratio", "0"), Some(0.37));
    // Still lost across a re-initialisation (after the 1 s backoff).
    wait_until("a re-initialisation", WAIT, Duration::from_millis(50), || {
        Ok(plain_log(&obs).contains("re-initialising NVML").then_some(()))
    })
    .unwrap();
    let m = obs.metrics().unwrap();
    assert_eq!(gpu(&m, "observer_gpu_up", "1"), Some(0.0), "{m:?}");
    assert_eq!(
        m.value_exact(
            "observer_gpu_info",
            &[
                ("gpu", "1"),
                ("uuid", UUID1),
                ("model", "NVIDIA A100-SXM4-40GB"),
                ("pci_bus_id", "00000000:65:00.0"),
                ("driver_version", "550.54.15"),
                ("mig_mode", "enabled")
            ]
        ),
        Some(1.0),
        "{m:?}"
    );

    fake.set(&conf);
    let m = wait_metrics(&mut obs, "GPU 1 back", |m| gpu(m, "observer_gpu_up", "1") == Some(1.0));
    assert_eq!(gpu(&m, "observer_gpu_power_watts", "1"), Some(0.25));
    let log = plain_log(&obs);
    assert_eq!(log.matches("GPU lost;").count(), 1, "{log}");
    assert!(log.contains("GPU answers again"), "{log}");
    assert!(!log.contains("panicked"), "{log}");
}

/// The cgroup v2 mount: /sys/fs/cgroup on most hosts, /sys/fs/cgroup/unified
/// on hybrid ones.
fn cgroup2_root() -> PathBuf {
    let mountinfo = fs::read_to_string("/proc/self/mountinfo").unwrap();
    mountinfo
        .lines()
        .find_map(|l| {
            let (before, after) = l.split_once(" - ")?;
            let mount_point = before.split_whitespace().nth(4)?;
            (after.split_whitespace().next()? == "cgroup2").then(|| PathBuf::from(mount_point))
        })
        .expect("a cgroup2 mount")
}

/// Cgroups laid out as the kubelet does, each with a sleeping process in it.
/// Everything sits below one test-owned directory (as in kind, whose kubelet
/// runs below a prefix), so a real `kubepods.slice` on the host is never
/// touched. Drop kills the processes and removes the cgroups, also when the
/// test fails.
struct PodCgroups {
    dirs: Vec<PathBuf>,
    children: Vec<Child>,
}

impl PodCgroups {
    fn new() -> Self {
        PodCgroups { dirs: Vec::new(), children: Vec::new() }
    }

    /// Creates `rel` (and its parents) below `base` and starts a process in it.
    fn process_in(&mut self, base: &Path, rel: &str) -> u32 {
        let mut dir = base.to_path_buf();
        for part in std::iter::once(None).chain(Path::new(rel).components().map(Some)) {
            if let Some(part) = part {
                dir.push(part);
            }
            if !dir.exists() {
                fs::create_dir(&dir).unwrap_or_else(|e| panic!("creating cgroup {}: {e}", dir.display()));
                self.dirs.push(dir.clone());
            }
        }
        let child = Command::new("sleep").arg("600").stdin(Stdio::null()).spawn().unwrap();
        let pid = child.id();
        self.children.push(child);
        fs::write(dir.join("cgroup.procs"), pid.to_string())
            .unwrap_or_else(|e| panic!("moving {pid} into {}: {e}", dir.display()));
        pid
    }
}

impl Drop for PodCgroups {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        // Deepest first; a cgroup whose last process just exited may stay
        // busy for a moment.
        for dir in self.dirs.iter().rev() {
            let deadline = Instant::now() + Duration::from_secs(5);
            while let Err(e) = fs::remove_dir(dir) {
                if e.kind() == std::io::ErrorKind::NotFound || Instant::now() > deadline {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

#[test]
fn gpu_processes_are_mapped_to_pods_through_their_cgroups() {
    let pod_a = ("team-a", "trainer-0", "3f2504e0-4f89-41d3-9a0c-0305e82c3301");
    let pod_b = ("team-b", "server-1", "9b1deb4d-3b7d-4bad-9bdd-2b0d7b3dcb6d");
    let container = |n: u8| format!("{:064x}", 0xabcdef00u64 + u64::from(n));
    let base = cgroup2_root().join(format!("observer-gpu-test-{}", std::process::id()));
    let mut cgroups = PodCgroups::new();
    let systemd_pod =
        format!("kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{}.slice", pod_a.2.replace('-', "_"));
    // Pod A (systemd driver, containerd): two processes in two containers,
    // and one whose memory NVML does not report.
    let a1 = cgroups.process_in(&base, &format!("{systemd_pod}/cri-containerd-{}.scope", container(1)));
    let a2 = cgroups.process_in(&base, &format!("{systemd_pod}/cri-containerd-{}.scope", container(2)));
    let a3 = cgroups.process_in(&base, &format!("{systemd_pod}/cri-containerd-{}.scope", container(2)));
    // Pod B (cgroupfs driver, CRI-O) on both GPUs.
    let b1 = cgroups.process_in(&base, &format!("kubepods/burstable/pod{}/crio-{}", pod_b.2, container(3)));
    // Not in a pod.
    let host = cgroups.process_in(&base, "system.slice/inference-daemon.service");

    let fake = FakeNvml::new("gpu-pods", &two_gpus());
    for (ns, pod, uid) in [pod_a, pod_b] {
        fs::create_dir_all(fake.path("pods").join(format!("{ns}_{pod}_{uid}"))).unwrap();
    }
    let conf = format!(
        "{}gpu0.procs={a1}:1000000000,{a2}:500000000,{a3}:na,{b1}:7000000,{host}:123456\ngpu1.procs={b1}:2000000000\n",
        two_gpus()
    );
    fake.set(&conf);
    let ns = NetNs::new("gpu-pods").unwrap();
    let mut obs = fake.start(&ns, &[]);
    let m = wait_metrics(&mut obs, "pod memory", |m| !m.matching("observer_gpu_pod_memory_used_bytes", &[]).is_empty());
    let pods: Vec<String> =
        m.matching("observer_gpu_pod_memory_used_bytes", &[]).iter().map(|s| s.to_string()).collect();
    assert_eq!(pods.len(), 3, "{pods:#?}");
    for (uuid, (namespace, pod, _), bytes) in
        [(UUID0, pod_a, 1_500_000_000.0), (UUID0, pod_b, 7_000_000.0), (UUID1, pod_b, 2_000_000_000.0)]
    {
        assert_eq!(
            m.value_exact(
                "observer_gpu_pod_memory_used_bytes",
                &[("uuid", uuid), ("namespace", namespace), ("pod", pod)]
            ),
            Some(bytes),
            "{pods:#?}"
        );
    }
    assert_eq!(m.metric_type("observer_gpu_pod_memory_used_bytes"), Some("gauge"));

    // A pod whose log directory is missing is left out, and said so once.
    let pod_c = "6ba7b810-9dad-41d1-80b4-00c04fd430c8";
    let c1 = cgroups.process_in(&base, &format!("kubepods/pod{pod_c}/{}", container(4)));
    fake.set(&format!("{conf}gpu1.procs={b1}:2000000000,{c1}:4096\n"));
    wait_until("the unnamed pod in the log", WAIT, Duration::from_millis(50), || {
        Ok(plain_log(&obs).contains(&format!("pod_uid={pod_c}")).then_some(()))
    })
    .unwrap();
    let m = obs.metrics().unwrap();
    assert_eq!(m.matching("observer_gpu_pod_memory_used_bytes", &[]).len(), 3, "{m:?}");
    drop(obs);
    drop(cgroups);
    assert!(!base.exists(), "cgroups left behind in {}", base.display());
}

/// Issue 6's performance note: how long one sampling cycle takes against the
/// fake with 8 GPUs, and that scrapes answer as fast while an NVML call is
/// blocked for 5 s (the network side keeps counting sessions meanwhile).
#[test]
fn sampling_cycle_with_8_gpus_and_scrapes_while_nvml_is_blocked() {
    let mut conf = String::from("count=8\n");
    for i in 0..8 {
        conf.push_str(&format!(
            "gpu{i}.uuid=GPU-00000000-0000-4000-8000-{i:012}\ngpu{i}.util=50\ngpu{i}.mem_total=85520809984\ngpu{i}.mem_used=1000000\n\
             gpu{i}.power_mw=300000\ngpu{i}.energy_mj=1000000\ngpu{i}.temp=50\ngpu{i}.pcie_tx_bytes=1\ngpu{i}.pcie_rx_bytes=2\n\
             gpu{i}.replays=0\ngpu{i}.ecc_corrected=0\ngpu{i}.ecc_uncorrected=0\ngpu{i}.mig=0\ngpu{i}.xid=0\n\
             gpu{i}.procs={}:1000,{}:2000\n",
            100_000 + i,
            200_000 + i
        ));
        // GPM on (Hopper): two samples and 11 metrics per GPU per cycle.
        conf.push_str(&format!("gpu{i}.gpm=1\n"));
        for id in [2, 3, 5, 10, 11, 12, 13, 20, 21, 60, 61] {
            conf.push_str(&format!("gpu{i}.gpm.{id}=50\n"));
        }
        // 18 active NVLink links (an H100 SXM's), every counter given:
        // 7 series per link, 1,008 on the node.
        conf.push_str(&format!("gpu{i}.nvlink={}\n", ["1"; 18].join(",")));
        for l in 0..18 {
            for c in ["tx_kib", "rx_kib", "replay", "recovery", "crc_flit", "crc_data"] {
                conf.push_str(&format!("gpu{i}.nvlink{l}.{c}={}\n", 1000 + l));
            }
        }
    }
    let fake = FakeNvml::new("gpu-perf", &conf);
    let ns = NetNs::new("gpu-perf").unwrap();
    let mut obs = fake.start(&ns, &[]);
    let m = wait_metrics(&mut obs, "8 GPUs sampled, with GPM and NVLink", |m| {
        gpu(m, "observer_gpu_up", "7") == Some(1.0)
            && gpu(m, "observer_gpu_gpm_sm_activity_ratio", "7") == Some(0.5)
            && m.value("observer_gpu_nvlink_errors_total", &[("gpu", "7"), ("link", "17"), ("type", "crc_data")])
                == Some(1017.0)
    });
    let series = gpu_series(&m).len();
    assert!(series > 1008, "{series}");

    // Cycle time: the observer's own measurement, one per completed cycle.
    let mut cycles = Vec::new();
    let mut last_stamp = 0.0;
    wait_until("30 sampling cycles", WAIT, Duration::from_millis(20), || {
        let m = obs.metrics()?;
        let stamp = m.value_exact("observer_nvml_last_sample_timestamp_seconds", &[]).unwrap_or(0.0);
        if stamp != last_stamp {
            last_stamp = stamp;
            cycles.push(m.value_exact("observer_nvml_sample_duration_seconds", &[]).unwrap());
        }
        Ok((cycles.len() >= 30).then_some(()))
    })
    .unwrap();
    let cycle = Stats::of(cycles.iter().map(|s| Duration::from_secs_f64(*s)).collect());

    // The observer's side of a scrape: the request and the whole body, not
    // this (unoptimised) test binary's parse of 1,200 GPU series after it.
    let scrape = |obs: &mut ObserverProcess| {
        let t = Instant::now();
        let r = obs.get("/metrics").unwrap();
        let took = t.elapsed();
        assert_eq!(r.status, 200);
        (took, Metrics::parse(&String::from_utf8(r.body).unwrap()).unwrap())
    };
    // Paced like the scrapes during the block below, for a like-for-like baseline.
    let before = Stats::of(
        (0..100)
            .map(|_| {
                let took = scrape(&mut obs).0;
                std::thread::sleep(Duration::from_millis(20));
                took
            })
            .collect(),
    );
    let stamp_before = obs.metrics().unwrap().value_exact("observer_nvml_last_sample_timestamp_seconds", &[]).unwrap();

    // Block one NVML call for 5 s, for one call only.
    let marker = fake.path("blocked");
    fake.set(&format!("{conf}sleep.nvmlDeviceGetUtilizationRates=5000\nsleep_marker={}\n", marker.display()));
    wait_until("NVML blocked", WAIT, Duration::from_millis(5), || Ok(marker.exists().then_some(()))).unwrap();
    let blocked_at = Instant::now();
    fake.set(&conf);

    let server = TcpServer::start_in(&ns, SocketAddr::from((Ipv4Addr::LOCALHOST, 0))).unwrap();
    let sessions = |m: &Metrics| m.sum("observer_sessions_total", &[("protocol", "tcp")]);
    let sessions_before = sessions(&obs.metrics().unwrap());
    let addr = server.addr();
    ns.spawn(move || transfer(addr, 64 * 1024, 64 * 1024, None).unwrap()).join().unwrap();

    let mut during = Vec::new();
    let mut stamps = Vec::new();
    let mut counted_while_blocked = false;
    while blocked_at.elapsed() < Duration::from_secs(4) {
        let since_block = blocked_at.elapsed();
        let (took, m) = scrape(&mut obs);
        assert!(took < Duration::from_secs(1), "a scrape took {took:?} while NVML was blocked");
        // The last cycle completed at most one interval (100 ms) before the
        // block began: its snapshot is served while younger than 3 intervals,
        // and withdrawn once older (issue 27; it used to be served for good).
        if since_block < Duration::from_millis(150) {
            assert_eq!(m.value_exact("observer_nvml_up", &[]), Some(1.0), "the last snapshot is served");
            assert_eq!(gpu(&m, "observer_gpu_utilization_ratio", "7"), Some(0.5));
        } else if since_block > Duration::from_millis(350) {
            assert_eq!(m.value_exact("observer_nvml_up", &[]), Some(0.0), "stale after 3 intervals: {since_block:?}");
            assert!(gpu_series(&m).is_empty(), "stale GPU series withdrawn: {:?}", gpu_series(&m));
        }
        stamps.push(m.value_exact("observer_nvml_last_sample_timestamp_seconds", &[]).unwrap());
        counted_while_blocked |= sessions(&m) >= sessions_before + 2.0;
        during.push(took);
        std::thread::sleep(Duration::from_millis(20));
    }
    // At most the cycle in flight when the marker appeared completed.
    let distinct = stamps.iter().filter(|s| **s != stamp_before).fold(Vec::<f64>::new(), |mut v, s| {
        if !v.contains(s) {
            v.push(*s)
        }
        v
    });
    assert!(distinct.len() <= 1, "the sampler kept publishing while blocked: {distinct:?}");
    assert!(counted_while_blocked, "the network side counted the transfer's sessions while NVML was blocked");
    let during = Stats::of(during);

    let last_blocked_stamp = *stamps.last().unwrap();
    wait_metrics(&mut obs, "sampling resumed", |m| {
        m.value_exact("observer_nvml_last_sample_timestamp_seconds", &[]).is_some_and(|s| s != last_blocked_stamp)
    });
    let resumed_after = blocked_at.elapsed();
    eprintln!(
        "gpu performance (fake NVML, 8 GPUs, 2 processes each, GPM on, 18 NVLink links each; {series} GPU series):\n  sampling cycle: {cycle}\n  scrape latency, NVML free:    {before}\n  scrape latency, NVML blocked: {during}\n  sampling resumed {resumed_after:?} after the 5 s call began"
    );
    assert!(resumed_after >= Duration::from_millis(4500), "{resumed_after:?}");
    assert!(cycle.median < Duration::from_millis(50), "{cycle}");
    // Blocked scrapes are as fast as free ones (the bound absorbs CI noise).
    assert!(during.median < before.max + Duration::from_millis(20), "free {before}, blocked {during}");
}

/// Issue 27: a sample older than 3 intervals turns `observer_nvml_up` to 0
/// and withdraws the stale GPU series; they return when sampling does. The
/// fake blocks one NVML call until the test removes a file.
#[test]
fn a_blocked_nvml_call_turns_nvml_down_within_3_intervals_and_back() {
    const INTERVAL: Duration = Duration::from_millis(100);
    let fake = FakeNvml::new("gpu-stale", &two_gpus());
    let ns = NetNs::new("gpu-stale").unwrap();
    let mut obs = fake.start(&ns, &[]);
    let before = wait_metrics(&mut obs, "both GPUs sampled", |m| gpu(m, "observer_gpu_up", "1") == Some(1.0));
    assert_eq!(gpu(&before, "observer_gpu_utilization_ratio", "0"), Some(0.37));

    let hold = fake.path("hold");
    let marker = fake.path("blocked");
    fs::write(&hold, "").unwrap();
    fake.set(&format!(
        "{}block.nvmlDeviceGetUtilizationRates={}\nsleep_marker={}\n",
        two_gpus(),
        hold.display(),
        marker.display()
    ));
    wait_until("NVML blocked", WAIT, Duration::from_millis(2), || Ok(marker.exists().then_some(()))).unwrap();
    let blocked_at = Instant::now();
    let down = wait_until("observer_nvml_up 0", WAIT, Duration::from_millis(10), || {
        let m = obs.metrics()?;
        Ok((m.value_exact("observer_nvml_up", &[]) == Some(0.0)).then_some(m))
    })
    .unwrap();
    let went_down = blocked_at.elapsed();
    // The last cycle completed before the block began, so its sample is 3
    // intervals old at the latest 3 intervals after; the allowance is for
    // the scrape that sees it.
    assert!(went_down <= 3 * INTERVAL + Duration::from_millis(50), "observer_nvml_up 0 only after {went_down:?}");
    assert!(gpu_series(&down).is_empty(), "stale GPU series still served: {:?}", gpu_series(&down));
    let stamp = down.value_exact("observer_nvml_last_sample_timestamp_seconds", &[]);
    assert!(stamp.is_some(), "when the last cycle completed stays: {down:?}");
    // It stays down while the call is blocked.
    for _ in 0..10 {
        std::thread::sleep(INTERVAL);
        let m = obs.metrics().unwrap();
        assert_eq!(m.value_exact("observer_nvml_up", &[]), Some(0.0));
        assert!(gpu_series(&m).is_empty());
        assert_eq!(m.value_exact("observer_nvml_last_sample_timestamp_seconds", &[]), stamp);
    }

    fake.set(&two_gpus());
    fs::remove_file(&hold).unwrap();
    let released_at = Instant::now();
    let back = wait_metrics(&mut obs, "sampling recovered", |m| {
        m.value_exact("observer_nvml_up", &[]) == Some(1.0) && gpu(m, "observer_gpu_utilization_ratio", "0").is_some()
    });
    let came_back = released_at.elapsed();
    assert_eq!(gpu(&back, "observer_gpu_utilization_ratio", "0"), Some(0.37));
    assert_eq!(gpu(&back, "observer_gpu_up", "1"), Some(1.0));
    let log = plain_log(&obs);
    assert!(log.contains("no GPU sampling cycle completed for 3 intervals"), "{log}");
    assert!(log.contains("GPU sampling completes again"), "{log}");
    eprintln!(
        "nvml staleness (100 ms interval): observer_nvml_up 0 {went_down:?} after the block began, 1 again {came_back:?} after it ended"
    );
}

struct Stats {
    n: usize,
    min: Duration,
    median: Duration,
    p90: Duration,
    p99: Duration,
    max: Duration,
}

impl Stats {
    fn of(mut v: Vec<Duration>) -> Self {
        v.sort();
        let at = |q: f64| v[((v.len() - 1) as f64 * q).round() as usize];
        Stats { n: v.len(), min: v[0], median: at(0.5), p90: at(0.9), p99: at(0.99), max: v[v.len() - 1] }
    }
}

impl std::fmt::Display for Stats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "n={} min={:?} median={:?} p90={:?} p99={:?} max={:?}",
            self.n, self.min, self.median, self.p90, self.p99, self.max
        )
    }
}
