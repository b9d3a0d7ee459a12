//! Deployment files under deploy/: the Kubernetes manifests validate against
//! the parts of the Kubernetes API schema that matter for them (required
//! fields, types and enums, known keys, and the cross-references the API
//! server would not catch but a broken rollout would: selectors, named ports,
//! volumes), the Helm chart is consistent with its values and with the plain
//! manifests, and the Grafana dashboard queries only metrics the observer
//! exports. The README stays a page a newcomer reads: at most
//! [`README_MAX_LINES`] lines, and its flag and metrics tables list every flag
//! of `observer run` and every metric family the code names. No root needed.
//!
//! `helm` is not packaged by Debian, PyPI or npm, so the chart is rendered
//! with `helm template` only where a `helm` binary is on PATH; otherwise its
//! templates are checked statically (see `helm_chart`).
use std::{
    collections::{BTreeSet, HashMap},
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use observer_tests::{observer_bin, run_with_timeout, workspace_root};
use serde_json::Value;

fn deploy_dir() -> PathBuf {
    workspace_root().join("deploy")
}

/// Every YAML document of a file, as JSON values (null documents skipped).
fn yaml_documents(text: &str, origin: &Path) -> Vec<Value> {
    serde_saphyr::from_multiple::<Value>(text)
        .unwrap_or_else(|e| panic!("{}: not YAML: {e}", origin.display()))
        .into_iter()
        .filter(|v| !v.is_null())
        .collect()
}

fn get<'a>(v: &'a Value, path: &str) -> &'a Value {
    path.split('.').fold(v, |v, k| &v[k])
}

fn str_map(v: &Value) -> HashMap<String, String> {
    v.as_object()
        .map(|m| m.iter().map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_string())).collect())
        .unwrap_or_default()
}

/// Collects schema violations with the object they were found in.
#[derive(Default)]
struct Report(Vec<String>);

impl Report {
    fn check(&mut self, ok: bool, what: impl FnOnce() -> String) {
        if !ok {
            self.0.push(what());
        }
    }

    fn keys(&mut self, v: &Value, allowed: &[&str], at: &str) {
        if let Some(m) = v.as_object() {
            for k in m.keys() {
                self.check(allowed.contains(&k.as_str()), || format!("{at}: unknown field {k:?}"));
            }
        }
    }
}

fn dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

const POD_SPEC_KEYS: &[&str] = &[
    "serviceAccountName",
    "automountServiceAccountToken",
    "hostNetwork",
    "hostPID",
    "hostIPC",
    "dnsPolicy",
    "priorityClassName",
    "runtimeClassName",
    "terminationGracePeriodSeconds",
    "tolerations",
    "nodeSelector",
    "affinity",
    "containers",
    "initContainers",
    "volumes",
    "securityContext",
];
const CONTAINER_KEYS: &[&str] = &[
    "name",
    "image",
    "imagePullPolicy",
    "command",
    "args",
    "env",
    "envFrom",
    "ports",
    "readinessProbe",
    "livenessProbe",
    "startupProbe",
    "resources",
    "securityContext",
    "volumeMounts",
    "workingDir",
    "lifecycle",
];
const SECURITY_CONTEXT_KEYS: &[&str] = &[
    "runAsUser",
    "runAsGroup",
    "runAsNonRoot",
    "privileged",
    "allowPrivilegeEscalation",
    "readOnlyRootFilesystem",
    "capabilities",
    "seccompProfile",
    "seLinuxOptions",
    "appArmorProfile",
];
const HOST_PATH_TYPES: &[&str] =
    &["", "DirectoryOrCreate", "Directory", "FileOrCreate", "File", "Socket", "CharDevice", "BlockDevice"];

/// Validates a set of objects meant to be applied together.
fn validate(objects: &[Value]) -> Report {
    let mut r = Report::default();
    let by_kind = |kind: &str| objects.iter().filter(move |o| o["kind"] == kind).collect::<Vec<_>>();
    for o in objects {
        let name = get(o, "metadata.name").as_str().unwrap_or_default();
        let at = format!("{} {name}", o["kind"].as_str().unwrap_or("?"));
        r.check(o["apiVersion"].is_string() && o["kind"].is_string(), || format!("{at}: apiVersion and kind"));
        r.check(dns_label(name), || format!("{at}: metadata.name {name:?} is not a DNS label"));
        r.check(get(o, "metadata.labels").is_null() || get(o, "metadata.labels").is_object(), || {
            format!("{at}: labels")
        });
        let want_api = match o["kind"].as_str().unwrap_or_default() {
            "Namespace" | "ServiceAccount" | "Service" => "v1",
            "DaemonSet" => "apps/v1",
            // The chart's kube-rbac-proxy option.
            "ClusterRole" | "ClusterRoleBinding" => "rbac.authorization.k8s.io/v1",
            "ServiceMonitor" => "monitoring.coreos.com/v1",
            other => {
                r.0.push(format!("{at}: unexpected kind {other}"));
                continue;
            }
        };
        r.check(o["apiVersion"] == want_api, || format!("{at}: apiVersion {} (want {want_api})", o["apiVersion"]));
    }

    let pods: Vec<(&Value, HashMap<String, String>)> = by_kind("DaemonSet")
        .into_iter()
        .map(|ds| (get(ds, "spec.template.spec"), str_map(get(ds, "spec.template.metadata.labels"))))
        .collect();
    r.check(pods.len() == 1, || format!("expected one DaemonSet, found {}", pods.len()));
    let accounts: BTreeSet<&str> =
        by_kind("ServiceAccount").iter().filter_map(|a| get(a, "metadata.name").as_str()).collect();
    let mut container_ports = BTreeSet::new();
    for ds in by_kind("DaemonSet") {
        let at = format!("DaemonSet {}", get(ds, "metadata.name"));
        let selector = str_map(get(ds, "spec.selector.matchLabels"));
        let labels = str_map(get(ds, "spec.template.metadata.labels"));
        r.check(!selector.is_empty(), || format!("{at}: spec.selector.matchLabels is required"));
        r.check(selector.iter().all(|(k, v)| labels.get(k) == Some(v)), || {
            format!("{at}: selector {selector:?} does not match the template's labels {labels:?}")
        });
        let pod = get(ds, "spec.template.spec");
        r.keys(pod, POD_SPEC_KEYS, &format!("{at}: pod spec"));
        let sa = pod["serviceAccountName"].as_str().unwrap_or_default();
        r.check(accounts.contains(sa), || format!("{at}: serviceAccountName {sa:?} is not defined"));
        for flag in ["hostNetwork", "hostPID", "automountServiceAccountToken"] {
            r.check(pod[flag].is_boolean(), || format!("{at}: {flag} must be set (a boolean)"));
        }
        for t in pod["tolerations"].as_array().into_iter().flatten() {
            r.check(["Exists", "Equal"].contains(&t["operator"].as_str().unwrap_or("Equal")), || {
                format!("{at}: toleration operator {}", t["operator"])
            });
            r.check(
                ["NoSchedule", "PreferNoSchedule", "NoExecute", ""].contains(&t["effect"].as_str().unwrap_or("")),
                || format!("{at}: toleration effect {}", t["effect"]),
            );
        }
        let volumes: Vec<&str> =
            pod["volumes"].as_array().into_iter().flatten().filter_map(|v| v["name"].as_str()).collect();
        r.check(volumes.len() == volumes.iter().collect::<BTreeSet<_>>().len(), || format!("{at}: duplicate volumes"));
        for v in pod["volumes"].as_array().into_iter().flatten() {
            let path = get(v, "hostPath.path").as_str().unwrap_or_default();
            r.check(path.starts_with('/'), || format!("{at}: volume {}: hostPath.path must be absolute", v["name"]));
            let ty = get(v, "hostPath.type").as_str().unwrap_or_default();
            r.check(HOST_PATH_TYPES.contains(&ty), || format!("{at}: volume {}: hostPath.type {ty:?}", v["name"]));
        }
        let containers = pod["containers"].as_array().cloned().unwrap_or_default();
        r.check(containers.iter().any(|c| c["name"] == "observer"), || format!("{at}: a container named observer"));
        // The chart's kube-rbac-proxy sidecar serves the metrics port for the
        // observer, which then listens on the node's loopback only.
        let proxied = containers.iter().any(|c| c["name"] == "kube-rbac-proxy");
        for p in containers.iter().filter(|c| c["name"] != "observer").flat_map(|c| c["ports"].as_array()).flatten() {
            container_ports
                .insert((p["name"].as_str().unwrap_or_default().to_string(), p["containerPort"].as_u64().unwrap_or(0)));
        }
        // The rest is about the observer's container.
        for c in containers.iter().filter(|c| c["name"] == "observer") {
            let cname = c["name"].as_str().unwrap_or_default();
            let at = format!("{at}: container {cname}");
            r.keys(c, CONTAINER_KEYS, &at);
            r.check(dns_label(cname), || format!("{at}: name"));
            r.check(c["image"].as_str().is_some_and(|i| !i.is_empty() && !i.contains(char::is_whitespace)), || {
                format!("{at}: image")
            });
            let args: Vec<&str> = c["args"].as_array().into_iter().flatten().filter_map(Value::as_str).collect();
            r.check(args.first() == Some(&"run"), || {
                format!("{at}: args must start with the run subcommand: {args:?}")
            });
            // Host PIDs are for GPU processes only (NVML names them by host PID).
            let gpu_on = args.iter().find_map(|a| a.strip_prefix("--gpu=")).unwrap_or("auto") != "off";
            r.check(pod["hostPID"].as_bool() == Some(gpu_on), || {
                format!("{at}: hostPID must be {gpu_on} with {args:?}: only GPU sampling needs host PIDs")
            });
            r.check(
                args.iter().any(|a| a.starts_with("--listen=") && (proxied || !a.starts_with("--listen=127."))),
                || format!("{at}: --listen must be reachable by Prometheus: {args:?}"),
            );
            let mut port_names = BTreeSet::new();
            for p in c["ports"].as_array().into_iter().flatten() {
                let n = p["containerPort"].as_u64().unwrap_or(0);
                r.check((1..=65535).contains(&n), || format!("{at}: containerPort {}", p["containerPort"]));
                let pname = p["name"].as_str().unwrap_or_default();
                r.check(dns_label(pname) && pname.len() <= 15, || format!("{at}: port name {pname:?}"));
                r.check(["TCP", "UDP", "SCTP"].contains(&p["protocol"].as_str().unwrap_or("TCP")), || {
                    format!("{at}: protocol")
                });
                port_names.insert(pname.to_string());
                container_ports.insert((pname.to_string(), n));
            }
            let listen_port = args
                .iter()
                .find_map(|a| a.strip_prefix("--listen="))
                .and_then(|l| l.rsplit(':').next())
                .and_then(|p| p.parse::<u64>().ok());
            r.check(container_ports.iter().any(|(_, n)| Some(*n) == listen_port), || {
                format!("{at}: no containerPort for --listen port {listen_port:?}")
            });
            for probe in ["readinessProbe", "livenessProbe"] {
                let port = get(&c[probe], "httpGet.port");
                r.check(port.as_str().is_some_and(|p| port_names.contains(p)) || port.is_u64(), || {
                    format!("{at}: {probe} port {port}")
                });
            }
            let sc = &c["securityContext"];
            r.keys(sc, SECURITY_CONTEXT_KEYS, &format!("{at}: securityContext"));
            let seccomp = get(sc, "seccompProfile.type").as_str().unwrap_or_default();
            r.check(seccomp == "RuntimeDefault", || {
                format!("{at}: seccompProfile.type {seccomp:?}: RuntimeDefault allows bpf() and perf_event_open() with BPF and PERFMON")
            });
            r.check(sc["privileged"] == false, || format!("{at}: privileged must stay a documented fallback"));
            let add: Vec<&str> =
                get(sc, "capabilities.add").as_array().into_iter().flatten().filter_map(Value::as_str).collect();
            let drop: Vec<&str> =
                get(sc, "capabilities.drop").as_array().into_iter().flatten().filter_map(Value::as_str).collect();
            r.check(drop == ["ALL"], || format!("{at}: capabilities.drop must be [ALL]: {drop:?}"));
            for cap in ["BPF", "PERFMON", "NET_ADMIN"] {
                r.check(add.contains(&cap), || format!("{at}: capability {cap} is needed"));
            }
            r.check(!add.contains(&"SYS_ADMIN"), || format!("{at}: SYS_ADMIN only on request (bpfStats)"));
            // Without it, statistics cannot be switched on: saying so spares a
            // warning at every start.
            r.check(args.contains(&"--bpf-stats=false"), || {
                format!("{at}: no SYS_ADMIN, so --bpf-stats=false: {args:?}")
            });
            r.check(
                add.iter().all(|c| !c.starts_with("CAP_") && c.bytes().all(|b| b.is_ascii_uppercase() || b == b'_')),
                || format!("{at}: capabilities are named without CAP_, upper case: {add:?}"),
            );
            let mounts: Vec<&Value> = c["volumeMounts"].as_array().into_iter().flatten().collect();
            for m in &mounts {
                let v = m["name"].as_str().unwrap_or_default();
                r.check(volumes.contains(&v), || format!("{at}: volumeMount {v:?} has no volume"));
                r.check(m["mountPath"].as_str().is_some_and(|p| p.starts_with('/')), || {
                    format!("{at}: mountPath of {v}")
                });
            }
            for v in &volumes {
                r.check(mounts.iter().any(|m| m["name"] == *v), || format!("{at}: volume {v} is never mounted"));
            }
            let paths: Vec<&str> = mounts.iter().filter_map(|m| m["mountPath"].as_str()).collect();
            for need in ["/sys/kernel/btf", "/sys/fs/cgroup", "/var/log/pods"] {
                r.check(paths.contains(&need), || format!("{at}: {need} must be mounted from the host"));
            }
            // The host's bpffs is mounted exactly when state is pinned there
            // (--state-dir under it), writable, and seeing the host's mounts.
            let state_dir = args.iter().find_map(|a| a.strip_prefix("--state-dir=")).unwrap_or_default();
            let pinned = !state_dir.is_empty();
            r.check(!pinned || state_dir.starts_with("/sys/fs/bpf/"), || {
                format!("{at}: --state-dir={state_dir} must lie under the mounted /sys/fs/bpf")
            });
            r.check(paths.contains(&"/sys/fs/bpf") == pinned, || {
                format!("{at}: /sys/fs/bpf must be mounted exactly when --state-dir pins there ({state_dir:?})")
            });
            if let Some(m) = mounts.iter().find(|m| m["mountPath"] == "/sys/fs/bpf") {
                r.check(m["readOnly"] != true, || format!("{at}: bpffs mounted read-only: pins cannot be made"));
                r.check(m["mountPropagation"] == "HostToContainer", || {
                    format!("{at}: bpffs needs mountPropagation HostToContainer")
                });
            }
        }
    }

    let mut service_ports = BTreeSet::new();
    let mut service_labels = Vec::new();
    for svc in by_kind("Service") {
        let at = format!("Service {}", get(svc, "metadata.name"));
        let selector = str_map(get(svc, "spec.selector"));
        r.check(!selector.is_empty(), || format!("{at}: spec.selector"));
        r.check(pods.iter().any(|(_, labels)| selector.iter().all(|(k, v)| labels.get(k) == Some(v))), || {
            format!("{at}: selector {selector:?} matches no pod template")
        });
        for p in get(svc, "spec.ports").as_array().into_iter().flatten() {
            let port = p["port"].as_u64().unwrap_or(0);
            r.check((1..=65535).contains(&port), || format!("{at}: port {}", p["port"]));
            let target = &p["targetPort"];
            r.check(
                target.as_str().is_some_and(|t| container_ports.iter().any(|(n, _)| n == t))
                    || target.as_u64().is_some_and(|t| container_ports.iter().any(|(_, n)| *n == t)),
                || format!("{at}: targetPort {target} names no container port"),
            );
            service_ports.insert(p["name"].as_str().unwrap_or_default().to_string());
        }
        service_labels.push(str_map(get(svc, "metadata.labels")));
    }
    for sm in by_kind("ServiceMonitor") {
        let at = format!("ServiceMonitor {}", get(sm, "metadata.name"));
        let selector = str_map(get(sm, "spec.selector.matchLabels"));
        r.check(!selector.is_empty(), || format!("{at}: spec.selector.matchLabels"));
        r.check(service_labels.iter().any(|l| selector.iter().all(|(k, v)| l.get(k) == Some(v))), || {
            format!("{at}: selector {selector:?} matches no Service")
        });
        let endpoints = get(sm, "spec.endpoints").as_array().cloned().unwrap_or_default();
        r.check(!endpoints.is_empty(), || format!("{at}: spec.endpoints"));
        for e in &endpoints {
            let port = e["port"].as_str().unwrap_or_default();
            r.check(service_ports.contains(port), || format!("{at}: endpoint port {port:?} is no Service port name"));
            for key in ["interval", "scrapeTimeout"] {
                let d = e[key].as_str().unwrap_or("1s");
                r.check(d.ends_with('s') && d.trim_end_matches('s').parse::<u32>().is_ok(), || {
                    format!("{at}: {key} {d:?}")
                });
            }
        }
    }
    r
}

fn assert_valid(objects: &[Value], origin: &str) {
    let kinds: BTreeSet<&str> = objects.iter().filter_map(|o| o["kind"].as_str()).collect();
    for kind in ["DaemonSet", "ServiceAccount", "Service", "ServiceMonitor"] {
        assert!(kinds.contains(kind), "{origin}: no {kind}");
    }
    let report = validate(objects);
    assert!(report.0.is_empty(), "{origin}:\n  {}", report.0.join("\n  "));
}

#[test]
fn kubernetes_manifests_validate() {
    let dir = deploy_dir().join("kubernetes");
    let mut objects = Vec::new();
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "yaml") {
            objects.extend(yaml_documents(&std::fs::read_to_string(&path).unwrap(), &path));
        }
    }
    assert_valid(&objects, "deploy/kubernetes");
}

#[test]
fn validator_catches_broken_manifests() {
    let path = deploy_dir().join("kubernetes/observer.yaml");
    let good = std::fs::read_to_string(&path).unwrap();
    let mut sm =
        yaml_documents(&std::fs::read_to_string(deploy_dir().join("kubernetes/servicemonitor.yaml")).unwrap(), &path);
    for (from, to, want) in [
        (
            "- name: pod-logs\n          hostPath",
            "- name: logs\n          hostPath",
            "volumeMount \"pod-logs\" has no volume",
        ),
        ("                - PERFMON\n", "", "capability PERFMON is needed"),
        ("targetPort: metrics", "targetPort: web", "targetPort \"web\" names no container port"),
        ("serviceAccountName: observer", "serviceAccountName: other", "serviceAccountName \"other\""),
        ("          imagePullPolicy", "          imagePullPolicyy", "unknown field \"imagePullPolicyy\""),
        ("--gpu=auto", "--gpu=off", "hostPID must be false"),
        ("type: RuntimeDefault", "type: Unconfined", "seccompProfile.type \"Unconfined\""),
    ] {
        assert!(good.contains(from), "{from}");
        let mut objects = yaml_documents(&good.replacen(from, to, 1), &path);
        objects.append(&mut sm.clone());
        let report = validate(&objects);
        assert!(report.0.iter().any(|e| e.contains(want)), "{want} not reported: {:?}", report.0);
    }
    sm[0]["spec"]["endpoints"][0]["port"] = "http".into();
    let mut objects = yaml_documents(&good, &path);
    objects.append(&mut sm);
    assert!(validate(&objects).0.iter().any(|e| e.contains("endpoint port \"http\"")));
}

/// Dotted `.Values.a.b` paths a template refers to.
fn values_references(template: &str) -> BTreeSet<String> {
    let mut refs = BTreeSet::new();
    let mut rest = template;
    while let Some(i) = rest.find(".Values.") {
        rest = &rest[i + ".Values.".len()..];
        let end = rest.find(|c: char| !(c.is_ascii_alphanumeric() || c == '.' || c == '_')).unwrap_or(rest.len());
        refs.insert(rest[..end].trim_end_matches('.').to_string());
        rest = &rest[end..];
    }
    refs
}

/// The chart: `helm template` when a helm binary exists; always the static
/// checks (every `.Values` path exists, the templates produce each kind, the
/// defaults agree with the plain manifests).
#[test]
fn helm_chart() {
    let chart = deploy_dir().join("helm/observer");
    let meta = &yaml_documents(&std::fs::read_to_string(chart.join("Chart.yaml")).unwrap(), &chart)[0];
    assert_eq!(meta["apiVersion"], "v2");
    assert_eq!(meta["name"], "observer");
    for key in ["version", "appVersion", "description"] {
        assert!(meta[key].is_string(), "Chart.yaml: {key}");
    }
    let values = &yaml_documents(&std::fs::read_to_string(chart.join("values.yaml")).unwrap(), &chart)[0];
    for key in ["listen.address", "listen.port", "ifaces", "labels", "gpu.mode", "resources", "tolerations"] {
        assert!(!get(values, key).is_null(), "values.yaml: {key}");
    }
    assert!(
        values["tolerations"].as_array().unwrap().iter().any(|t| t["key"] == "nvidia.com/gpu"),
        "values.yaml: GPU nodes are tolerated by default"
    );

    let mut kinds = BTreeSet::new();
    for entry in std::fs::read_dir(chart.join("templates")).unwrap() {
        let path = entry.unwrap().path();
        let text = std::fs::read_to_string(&path).unwrap();
        for r in values_references(&text) {
            assert!(!get(values, &r).is_null(), "{}: .Values.{r} is not in values.yaml", path.display());
        }
        kinds.extend(text.lines().filter_map(|l| l.strip_prefix("kind: ")).map(str::to_string));
    }
    let want: BTreeSet<String> = [
        "DaemonSet",
        "ServiceAccount",
        "Service",
        "ServiceMonitor",
        "ClusterRole",
        "ClusterRoleBinding",
        "PrometheusRule",
    ]
    .into_iter()
    .map(String::from)
    .collect();
    assert_eq!(kinds, want, "the chart's templates");

    // The plain manifests are the chart's defaults: same capabilities, same
    // host mounts.
    let daemonset = std::fs::read_to_string(chart.join("templates/daemonset.yaml")).unwrap();
    let plain = std::fs::read_to_string(deploy_dir().join("kubernetes/observer.yaml")).unwrap();
    for line in ["- BPF", "- PERFMON", "- NET_ADMIN", "hostNetwork: true", "drop: [\"ALL\"]"] {
        assert!(daemonset.contains(line) && plain.contains(line), "{line}");
    }
    for path in ["/sys/kernel/btf", "/sys/fs/cgroup"] {
        assert!(daemonset.contains(&format!("path: {path}")), "{path}");
    }
    // Pinned state (docs/restarts.md): the chart only while stateDir is set.
    assert!(daemonset.contains("{{- if .Values.stateDir }}") && daemonset.contains("path: /sys/fs/bpf"), "bpffs");
    assert!(plain.contains("--state-dir=/sys/fs/bpf/observer") && plain.contains("path: /sys/fs/bpf"), "bpffs");
    // Conditionals: host PIDs only with GPU sampling (the plain manifest's
    // default is --gpu=auto, so true there); the seccomp profile from values
    // (RuntimeDefault by default, as in the plain manifest).
    assert!(daemonset.contains("hostPID: {{ ne .Values.gpu.mode \"off\" }}"), "hostPID follows gpu.mode");
    assert!(plain.contains("hostPID: true") && plain.contains("--gpu=auto"));
    assert_eq!(get(values, "seccompProfile.type"), "RuntimeDefault");
    assert!(daemonset.contains("seccompProfile:") && plain.contains("type: RuntimeDefault"));
    // kube-rbac-proxy: off by default; when on, the observer listens on the
    // node's loopback only, the proxy takes the metrics port, and the RBAC
    // objects it needs exist only then.
    // Optional concerns: none switched off by default (as in the plain
    // manifest, where the line is commented out), passed as one --disable.
    assert_eq!(get(values, "disable"), &Value::Array(Vec::new()));
    assert!(daemonset.contains("{{- with .Values.disable }}\n            - --disable={{ join \",\" . }}"));
    assert!(plain.contains("# - --disable=") && !plain.contains("\n            - --disable"));
    assert_eq!(get(values, "kubeRbacProxy.enabled"), false);
    assert!(daemonset.contains("- --listen=127.0.0.1:{{ .Values.listen.port }}"));
    assert!(daemonset.contains("--upstream=http://127.0.0.1:{{ .Values.listen.port }}/"));
    let rbac = std::fs::read_to_string(chart.join("templates/rbac.yaml")).unwrap();
    assert!(rbac.starts_with("{{- if .Values.kubeRbacProxy.enabled }}"), "RBAC objects only with the proxy");
    for resource in ["tokenreviews", "subjectaccessreviews"] {
        assert!(rbac.contains(resource), "{resource}");
    }

    match which("helm") {
        Some(helm) => {
            let out = run_with_timeout(
                Command::new(&helm).args(["template", "observer", "--namespace", "observer"]).arg(&chart),
                Duration::from_secs(60),
            )
            .unwrap();
            assert!(out.status.success(), "helm template: {}", String::from_utf8_lossy(&out.stderr));
            let rendered = String::from_utf8(out.stdout).unwrap();
            assert_valid(&yaml_documents(&rendered, &chart), "helm template");
            assert!(!rendered.contains("--disable"), "no concern is switched off by default");
            let out = run_with_timeout(
                Command::new(&helm)
                    .args(["template", "observer", "--namespace", "observer"])
                    .args(["--set", "gpu.mode=off", "--set", "kubeRbacProxy.enabled=true"])
                    .args(["--set", "disable={drops,tcp_errors}"])
                    .arg(&chart),
                Duration::from_secs(60),
            )
            .unwrap();
            assert!(out.status.success(), "helm template: {}", String::from_utf8_lossy(&out.stderr));
            let rendered = String::from_utf8(out.stdout).unwrap();
            assert!(rendered.contains("- --disable=drops,tcp_errors\n"), "{rendered}");
            let objects = yaml_documents(&rendered, &chart);
            assert_valid(&objects, "helm template --set gpu.mode=off,kubeRbacProxy.enabled=true");
        }
        None => eprintln!("helm is not installed: rendering skipped, static checks only"),
    }
}

/// The image is built for amd64 and arm64 without emulating the compiler: its build stage
/// runs on the builder's own platform and cross-compiles for the target platform with
/// scripts/build-observer.sh, the script `cargo xtask build --target aarch64` and `cargo
/// xtask test` run without a container (no container builder runs in CI). This checks that
/// the Dockerfile still runs that script, for both architectures, so the test command's run
/// of it is the image's build.
#[test]
fn dockerfile_cross_builds_with_the_script_ci_runs() {
    let dockerfile = std::fs::read_to_string(deploy_dir().join("Dockerfile")).unwrap();
    let script = std::fs::read_to_string(workspace_root().join("scripts/build-observer.sh")).unwrap();
    let instructions: Vec<&str> =
        dockerfile.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')).collect();
    let stages: Vec<&&str> = instructions.iter().filter(|l| l.starts_with("FROM ")).collect();
    assert_eq!(stages.len(), 2, "a build stage and the image: {stages:?}");
    assert!(
        stages[0].starts_with("FROM --platform=$BUILDPLATFORM ") && stages[0].ends_with(" AS build"),
        "the build stage must run on the builder's platform (no emulated compiler): {}",
        stages[0]
    );
    assert!(!stages[1].contains("--platform"), "the image is of the target platform: {}", stages[1]);
    let build_stage: Vec<&str> = instructions
        .iter()
        .copied()
        .skip_while(|l| !l.starts_with("FROM "))
        .skip(1)
        .take_while(|l| !l.starts_with("FROM "))
        .collect();
    assert!(build_stage.contains(&"ARG TARGETARCH"), "{build_stage:?}");
    let builds: Vec<&&str> = build_stage.iter().filter(|l| l.contains("cargo build")).collect();
    assert!(builds.is_empty(), "the build stage builds through scripts/build-observer.sh only: {builds:?}");
    let run = build_stage
        .iter()
        .find(|l| l.starts_with("RUN scripts/build-observer.sh "))
        .unwrap_or_else(|| panic!("the build stage does not run scripts/build-observer.sh: {build_stage:?}"));
    assert!(run.contains("${TARGETARCH") && run.ends_with(" /out/observer"), "{run}");
    assert!(instructions.contains(&"COPY --from=build /out/observer /usr/local/bin/observer"));
    // Both architectures of the image, each with its Rust target and cross compiler.
    for (arch, triple, gcc) in [
        ("amd64", "x86_64-unknown-linux-gnu", "gcc-x86-64-linux-gnu"),
        ("arm64", "aarch64-unknown-linux-gnu", "gcc-aarch64-linux-gnu"),
    ] {
        let arm = script
            .lines()
            .find(|l| l.trim_start().starts_with(&format!("{arch})")))
            .unwrap_or_else(|| panic!("scripts/build-observer.sh has no case for {arch}"));
        assert!(arm.contains(triple) && arm.contains(gcc), "{arm}");
    }
}

fn which(name: &str) -> Option<PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?).map(|d| d.join(name)).find(|p| p.is_file())
}

fn readme() -> String {
    std::fs::read_to_string(workspace_root().join("README.md")).unwrap()
}

/// Backquoted words in the first cell of README's table rows (rows starting
/// with "| `"), the names its reference tables are keyed by.
fn readme_table_keys() -> Vec<String> {
    let readme = readme();
    let mut keys = Vec::new();
    for line in readme.lines().filter(|l| l.starts_with("| `")) {
        let first_cell = line.trim_start_matches('|').split('|').next().unwrap_or_default();
        keys.extend(first_cell.split('`').skip(1).step_by(2).map(String::from));
    }
    keys
}

/// Metric names the README documents (its metrics table), the reference
/// operators read: backquoted `observer_*` and `process_*` names in table rows.
fn documented_metrics() -> BTreeSet<String> {
    readme_table_keys().into_iter().filter(|k| k.starts_with("observer_") || k.starts_with("process_")).collect()
}

/// The README is read, the reference under docs/ is searched: past this, the
/// README has started collecting reference material again.
const README_MAX_LINES: usize = 300;

#[test]
fn readme_stays_short() {
    let lines = readme().lines().count();
    assert!(
        lines <= README_MAX_LINES,
        "README.md has {lines} lines (at most {README_MAX_LINES}): move detail to docs/"
    );
}

/// Long flags in README's flag table: the leading `--name` of a first cell
/// such as `--listen ADDR:PORT`.
fn documented_flags() -> BTreeSet<String> {
    readme_table_keys().iter().filter_map(|k| long_flag(k)).collect()
}

/// `--name` at the start of `s` (after leading spaces), without its value.
fn long_flag(s: &str) -> Option<String> {
    let rest = s.trim_start().strip_prefix("--")?;
    let name: String = rest.chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '-').collect();
    (!name.is_empty()).then(|| format!("--{name}"))
}

/// Long flags clap's `--help` output declares: option lines such as
/// `      --listen <ADDR:PORT>` or `  -h, --help`, not mentions in descriptions.
fn help_flags(help: &str) -> BTreeSet<String> {
    help.lines()
        .filter_map(|l| {
            let l = l.trim_start();
            // `-h, --help`: a short flag, then the long one.
            let l = match l.as_bytes() {
                [b'-', c, b',', b' ', ..] if c.is_ascii_alphanumeric() => &l[4..],
                _ => l,
            };
            long_flag(l)
        })
        .collect()
}

#[test]
fn readme_flag_table_lists_every_run_flag() {
    let bin = observer_bin();
    assert!(
        bin.is_file(),
        "{} not found: build the observer (AYA_BUILD_SKIP=1 cargo build --release -p observer is enough for \
         --help) or set OBSERVER_BIN",
        bin.display()
    );
    let out = run_with_timeout(Command::new(&bin).args(["run", "--help"]), Duration::from_secs(30)).unwrap();
    assert!(out.status.success(), "observer run --help: {out:?}");
    let help = String::from_utf8(out.stdout).unwrap();
    let mut flags = help_flags(&help);
    // clap's own; the README's table is about what the observer does.
    flags.remove("--help");
    assert!(flags.len() >= 20 && flags.contains("--listen"), "flags parsed from --help: {flags:?}\n{help}");
    let documented = documented_flags();
    let missing: Vec<&String> = flags.difference(&documented).collect();
    assert!(missing.is_empty(), "flags of `observer run` missing from README's flag table: {missing:?}");
    let unknown: Vec<&String> = documented.difference(&flags).collect();
    assert!(unknown.is_empty(), "README's flag table lists flags `observer run` does not have: {unknown:?}");
}

/// `"observer_..."` string literals of the observer's sources that are not
/// metric names: the log target of the kernel programs' diagnostics.
const NOT_METRICS: [&str; 1] = ["observer_ebpf"];

/// `"observer_..."` string literals in the observer's sources: the metric
/// families it registers (and their `_count`/`_sum` series in tests).
fn metric_literals(dir: &Path, out: &mut BTreeSet<String>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            metric_literals(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            let text = std::fs::read_to_string(&path).unwrap();
            for (i, _) in text.match_indices("\"observer_") {
                let name: String =
                    text[i + 1..].chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
                if !NOT_METRICS.contains(&name.as_str()) {
                    out.insert(name);
                }
            }
        }
    }
}

#[test]
fn readme_metrics_table_lists_every_metric_family() {
    let mut named = BTreeSet::new();
    metric_literals(&workspace_root().join("observer/src"), &mut named);
    assert!(
        named.len() >= 30 && named.contains("observer_bytes_total"),
        "metric names found in observer/src: {named:?}"
    );
    let documented = documented_metrics();
    let missing: Vec<&String> = named
        .iter()
        .filter(|n| {
            let family = ["_bucket", "_count", "_sum"].iter().find_map(|s| n.strip_suffix(s)).unwrap_or(n);
            !documented.contains(*n) && !documented.contains(family)
        })
        .collect();
    assert!(missing.is_empty(), "metrics named in observer/src but not in README's metrics table: {missing:?}");
}

/// Metric names in a PromQL expression (ours and the process collector's).
fn metric_names(expr: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let bytes = expr.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        let word = |b: u8| b.is_ascii_alphanumeric() || b == b'_' || b == b':';
        if word(bytes[i]) && (i == 0 || !word(bytes[i - 1])) {
            let start = i;
            while i < bytes.len() && word(bytes[i]) {
                i += 1;
            }
            let w = &expr[start..i];
            // Recording rules' names are `level:metric:operations`.
            if w.starts_with("observer_") || w.starts_with("process_") || w.contains(':') {
                names.insert(w.to_string());
            }
        } else {
            i += 1;
        }
    }
    names
}

fn exprs(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::Object(m) => {
            if let Some(Value::String(e)) = m.get("expr") {
                out.push(e.clone());
            }
            m.values().for_each(|v| exprs(v, out));
        }
        Value::Array(a) => a.iter().for_each(|v| exprs(v, out)),
        _ => {}
    }
}

#[test]
fn dashboard_queries_only_exported_metrics() {
    let path = deploy_dir().join("grafana/observer-dashboard.json");
    let dashboard: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let documented = documented_metrics();
    assert!(documented.contains("observer_session_goodput_bytes_per_second"), "README tables: {documented:?}");
    let recorded = recorded_names();
    let mut all = Vec::new();
    exprs(&dashboard, &mut all);
    assert!(all.len() >= 10, "{all:?}");
    let mut used = BTreeSet::new();
    let mut read = BTreeSet::new();
    for e in &all {
        // A panel grouped by `$group_by` reads the by-label rules' series of
        // that label: the rule file's `LABEL`.
        let names = metric_names(&e.replace("${group_by}", "LABEL"));
        assert!(!names.is_empty(), "no metric in {e}");
        for n in names {
            if n.contains(':') {
                assert!(recorded.contains(&n), "{e}: {n} is not recorded by the chart's rules {recorded:?}");
                read.insert(n);
                continue;
            }
            let family = ["_bucket", "_count", "_sum"]
                .iter()
                .find_map(|s| n.strip_suffix(s).filter(|f| documented.contains(*f)))
                .unwrap_or(&n)
                .to_string();
            assert!(documented.contains(&family), "{e}: {n} is not in README's metrics reference");
            used.insert(family);
        }
    }
    for needed in [
        "observer_session_goodput_bytes_per_second",
        "observer_drops_total",
        "observer_gpu_utilization_ratio",
        "observer_gpu_pod_memory_used_bytes",
    ] {
        assert!(used.contains(needed), "the dashboard must chart {needed}");
    }
    assert_eq!(read, recorded, "the dashboard reads every recorded series");
    // Quantile panels: the median and p10 of goodput.
    let goodput: Vec<&String> =
        all.iter().filter(|e| e.contains("observer_session_goodput_bytes_per_second_bucket")).collect();
    for q in ["histogram_quantile(0.5,", "histogram_quantile(0.1,"] {
        assert!(goodput.iter().any(|e| e.contains(q)), "{q}");
    }
}

/// The series the chart's recording rules record (`record:` in
/// deploy/helm/observer/rules/*.yaml; `LABEL` stands for each static label).
fn recorded_names() -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for entry in std::fs::read_dir(deploy_dir().join("helm/observer/rules")).unwrap() {
        let text = std::fs::read_to_string(entry.unwrap().path()).unwrap();
        names.extend(text.lines().filter_map(|l| l.trim().strip_prefix("- record: ")).map(str::to_owned));
    }
    assert!(names.len() >= 6, "{names:?}");
    names
}

#[test]
fn metric_name_extraction() {
    assert_eq!(
        metric_names("sum by (le) (rate(observer_a_bucket{x=\"observer_not\"}[1m])) / process_open_fds"),
        ["observer_a_bucket", "observer_not", "process_open_fds"].into_iter().map(String::from).collect()
    );
    assert_eq!(
        help_flags(
            "Options:\n      --listen <ADDR:PORT>\n          The --not-a-flag mentioned\n  -h, --help\n  -V, --version\n"
        ),
        ["--help", "--listen", "--version"].into_iter().map(String::from).collect()
    );
    assert_eq!(long_flag("--service-port PORT\\|FIRST-LAST").as_deref(), Some("--service-port"));
    assert_eq!(
        values_references("{{ .Values.gpu.mode }} {{- with .Values.labels }}"),
        ["gpu.mode", "labels"].into_iter().map(String::from).collect()
    );
}
