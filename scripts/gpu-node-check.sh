#!/usr/bin/env bash
# The NVML path on a real NVIDIA GPU, which CI cannot run (it has no GPU; the
# tests use a fake libnvidia-ml). Run as root on a GPU node with python3 and
# torch, from the repository root, after
#   cargo build --release -p observer --example gpu_sample
# or with BIN naming a folder that holds `observer` and `gpu_sample`.
#
# Checks, each printed as "ok: ..." or "FAILED: ..." (exit 1 if any failed):
# 1. gpu_sample (the sampler alone, no eBPF) finds NVML and every GPU.
# 2. `observer run --gpu required` serves GPU metrics next to the network ones.
# 3. Under a torch load, utilisation and memory move, and the memory of a
#    process in a kubelet-style pod cgroup is reported for that pod, to the
#    byte of what nvidia-smi reports for the process; a process outside any
#    pod is not.
# 4. Once the processes exit, the pod's series goes.
# 5. On a GPU with GPM (Hopper and later; observer_gpu_gpm_supported 1), SM
#    activity is near 0 idle and above 0.5 during the matmul loop, and the
#    PCIe counters (and NVLink rates, where the GPU has links) move; a GPU
#    without GPM reports observer_gpu_gpm_supported 0 and no GPM family.
# 6. NVLink: the links nvidia-smi lists for GPU 0 have observer_gpu_nvlink_active
#    with the same state, and their data counters are present; a GPU without
#    NVLink has no NVLink series. The counters' movement is reported (a
#    single-GPU load moves nothing over NVLink; with 2+ GPUs a peer copy does).
# 7. MIG: for every GPU in MIG mode, each MIG device nvidia-smi -L lists has
#    observer_gpu_mig_info (and, on a GPU with GPM, MIG GPM series appear);
#    skipped when no GPU is in MIG mode (the script changes no MIG setting).
# Everything it creates (cgroups under observer-gpu-check, the pod log folder,
# processes) is removed on exit.
set -uo pipefail
BIN=${BIN:-target/release}
SAMPLE=${SAMPLE:-$BIN/examples/gpu_sample}
[ -x "$SAMPLE" ] || SAMPLE=$BIN/gpu_sample
OBSERVER=$BIN/observer
LISTEN=127.0.0.1:9479
WORK=$(mktemp -d /tmp/observer-gpu-check.XXXXXX)
POD_UID=3f2504e0-4f89-41d3-9a0c-0305e82c3301
CGROOT=$(awk '$3 == "cgroup2" { print $2; exit }' /proc/mounts)
CG=$CGROOT/observer-gpu-check-$$
failed=0 obs= pod= host=

ok() { echo "ok: $*"; }
fail() { echo "FAILED: $*"; failed=1; }
fetch() { python3 -c 'import sys, urllib.request; sys.stdout.write(urllib.request.urlopen(sys.argv[1], timeout=10).read().decode())' "$1"; }
value() { awk -v m="$1" 'index($0, m) == 1 { print $NF; exit }' "$2"; }
cleanup() {
	kill $pod $host 2>/dev/null
	[ -n "$obs" ] && kill -TERM "$obs" 2>/dev/null && wait "$obs" 2>/dev/null
	[ -n "$CGROOT" ] && [ -d "$CG" ] && find "$CG" -depth -type d -exec rmdir {} + 2>/dev/null
	rm -rf "$WORK"
}
trap cleanup EXIT

for f in "$SAMPLE" "$OBSERVER"; do
	[ -x "$f" ] || { echo "no $f: build it first (see the top of $0) or set BIN"; exit 2; }
done
python3 -c 'import torch; assert torch.cuda.is_available()' 2>/dev/null ||
	{ echo "python3 with torch and a CUDA device is needed for the load"; exit 2; }
[ -n "$CGROOT" ] || { echo "no cgroup v2 mount"; exit 2; }
nvidia-smi --query-gpu=index,name,driver_version,memory.total --format=csv,noheader
gpus=$(nvidia-smi -L | wc -l)

# 1. The sampler alone.
if "$SAMPLE" --gpu required --gpu-interval 1s --samples 1 > "$WORK/sample.txt" 2>&1; then
	n=$(grep -c '^observer_gpu_up{.*} 1$' "$WORK/sample.txt")
	[ "$n" = "$gpus" ] && ok "gpu_sample: NVML up, $n of $gpus GPUs up" || fail "gpu_sample: $n of $gpus GPUs up"
else
	fail "gpu_sample: $(tail -1 "$WORK/sample.txt")"
fi

# 2. The observer, with a pod log folder that names one pod.
mkdir -p "$WORK/pods/team-a_trainer-0_$POD_UID"
"$OBSERVER" run --iface lo --gpu required --gpu-interval 1s --pod-log-dir "$WORK/pods" --listen $LISTEN \
	> "$WORK/run.log" 2>&1 &
obs=$!
for _ in $(seq 1 60); do fetch http://$LISTEN/readyz > /dev/null 2>&1 && break; sleep 0.5; done
fetch http://$LISTEN/metrics > "$WORK/idle.txt" 2>/dev/null
[ "$(value observer_nvml_up "$WORK/idle.txt")" = 1 ] && grep -q '^observer_sessions_total' "$WORK/idle.txt" &&
	ok "observer run: observer_nvml_up 1 beside the session metrics" ||
	fail "observer run: no GPU metrics beside the session metrics ($(tail -1 "$WORK/run.log"))"

# GPM values need two cycles (1 s apart): an idle reading before the load.
sleep 3
fetch http://$LISTEN/metrics > "$WORK/idle2.txt"
gpm=$(value 'observer_gpu_gpm_supported{gpu="0"' "$WORK/idle2.txt")

# 3. A process in a pod's cgroup (cgroupfs layout, containerd) and one outside.
C=$CG/kubepods/burstable/pod$POD_UID/cri-containerd-$(printf '%064x' 2882400001)
mkdir -p "$C"
LOAD='import sys, time, torch
hold = torch.empty(int(sys.argv[1]) << 30, dtype=torch.uint8, device="cuda")
x = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
end = time.time() + int(sys.argv[2])
while time.time() < end:
    y = x @ x
torch.cuda.synchronize()'
sh -c "echo \$\$ > $C/cgroup.procs && exec python3 -c '$LOAD' 6 14" & pod=$!
python3 -c "$LOAD" 3 14 & host=$!
sleep 10
nvidia-smi --query-compute-apps=pid,used_memory --format=csv,noheader,nounits > "$WORK/apps.txt"
fetch http://$LISTEN/metrics > "$WORK/load.txt"
util=$(value 'observer_gpu_utilization_ratio{gpu="0"' "$WORK/load.txt")
used=$(value 'observer_gpu_memory_used_bytes{gpu="0"' "$WORK/load.txt")
python3 -c "import sys; sys.exit(not (float('${util:-0}') > 0.5 and float('${used:-0}') > 8 << 30))" &&
	ok "under load: GPU 0 utilisation $util, memory used $used bytes" ||
	fail "under load: GPU 0 utilisation ${util:-none}, memory used ${used:-none} bytes"
want=$(awk -F', ' -v p=$pod '$1 == p { printf "%.0f", $2 * 1048576 }' "$WORK/apps.txt")
got=$(value "observer_gpu_pod_memory_used_bytes{uuid=" "$WORK/load.txt")
series=$(grep -c '^observer_gpu_pod_memory_used_bytes{.*namespace="team-a",pod="trainer-0"}' "$WORK/load.txt")
total=$(grep -c '^observer_gpu_pod_memory_used_bytes' "$WORK/load.txt")
[ -n "$want" ] && [ "$got" = "$want" ] && [ "$series" = 1 ] && [ "$total" = 1 ] &&
	ok "pod team-a/trainer-0: $got bytes, as nvidia-smi reports for its process; the host process is in no pod" ||
	fail "pod memory: observer ${got:-none} in $total series, nvidia-smi ${want:-none} for pid $pod"

# 5. GPM under the same load.
if [ "$gpm" = 1 ]; then
	sm_idle=$(value 'observer_gpu_gpm_sm_activity_ratio{gpu="0"' "$WORK/idle2.txt")
	sm_load=$(value 'observer_gpu_gpm_sm_activity_ratio{gpu="0"' "$WORK/load.txt")
	tensor=$(value 'observer_gpu_gpm_tensor_activity_ratio{gpu="0"' "$WORK/load.txt")
	python3 -c "import sys; sys.exit(not (float('${sm_idle:-1}') < 0.05 and float('${sm_load:-0}') > 0.5))" &&
		ok "GPM: SM activity ${sm_idle} idle, ${sm_load} under the matmul loop (tensor ${tensor:-none})" ||
		fail "GPM: SM activity ${sm_idle:-none} idle, ${sm_load:-none} under load"
	rx_idle=$(value 'observer_gpu_pcie_receive_bytes_total{gpu="0"' "$WORK/idle2.txt")
	rx_load=$(value 'observer_gpu_pcie_receive_bytes_total{gpu="0"' "$WORK/load.txt")
	gpm_rx=$(value 'observer_gpu_gpm_pcie_receive_bytes_per_second{gpu="0"' "$WORK/load.txt")
	python3 -c "import sys; sys.exit(not (float('${rx_load:-0}') > float('${rx_idle:-0}') and '${gpm_rx}' != ''))" &&
		ok "PCIe: receive counter ${rx_idle} -> ${rx_load} bytes, GPM receive ${gpm_rx} bytes/s" ||
		fail "PCIe: receive counter ${rx_idle:-none} -> ${rx_load:-none}, GPM receive ${gpm_rx:-none}"
	nvl=$(value 'observer_gpu_gpm_nvlink_receive_bytes_per_second{gpu="0"' "$WORK/load.txt")
	echo "info: GPM NVLink receive on GPU 0: ${nvl:-absent} bytes/s (a single GPU moves nothing over NVLink)"
elif [ "$gpm" = 0 ]; then
	grep -q '^observer_gpu_gpm_sm_activity_ratio{gpu="0"' "$WORK/load.txt" &&
		fail "GPM: GPU 0 says no GPM but exports GPM values" ||
		ok "GPM: GPU 0 has none (observer_gpu_gpm_supported 0), no GPM family"
else
	fail "GPM: no observer_gpu_gpm_supported for GPU 0"
fi

# 6. NVLink against nvidia-smi's view of GPU 0's links.
smi_links=$(nvidia-smi nvlink --status -i 0 2>/dev/null | grep -c 'Link [0-9]*:')
ours=$(grep -c '^observer_gpu_nvlink_active{gpu="0"' "$WORK/load.txt")
if [ "${smi_links:-0}" = 0 ]; then
	[ "$ours" = 0 ] && ok "NVLink: GPU 0 has none (nvidia-smi lists no link), no NVLink series" ||
		fail "NVLink: nvidia-smi lists no link on GPU 0, observer exports $ours"
else
	active_smi=$(nvidia-smi nvlink --status -i 0 | grep 'Link [0-9]*:' | grep -vc 'inactive\|<inactive>')
	active_ours=$(grep '^observer_gpu_nvlink_active{gpu="0"' "$WORK/load.txt" | grep -c ' 1$')
	rx0=$(grep '^observer_gpu_nvlink_receive_bytes_total{gpu="0"' "$WORK/idle2.txt" | awk '{s += $NF} END {printf "%.0f", s}')
	rx1=$(grep '^observer_gpu_nvlink_receive_bytes_total{gpu="0"' "$WORK/load.txt" | awk '{s += $NF} END {printf "%.0f", s}')
	counters=$(grep -c '^observer_gpu_nvlink_receive_bytes_total{gpu="0"' "$WORK/load.txt")
	[ "$ours" = "$smi_links" ] && [ "$active_ours" = "$active_smi" ] &&
		ok "NVLink: GPU 0 has $ours links ($active_ours active) as nvidia-smi says; receive counters on $counters, ${rx0:-0} -> ${rx1:-0} bytes" ||
		fail "NVLink: observer $ours links ($active_ours active), nvidia-smi $smi_links ($active_smi active)"
fi

# 7. MIG devices, where a GPU is in MIG mode already.
migs=$(nvidia-smi -L | grep -o 'MIG-[0-9a-f-]*' | sort -u)
if [ -z "$migs" ]; then
	echo "info: no GPU in MIG mode; MIG not checked (this script changes no MIG setting)"
else
	missing=0
	for u in $migs; do grep -q "^observer_gpu_mig_info{.*mig_uuid=\"$u\"" "$WORK/load.txt" || missing=$((missing + 1)); done
	mig_gpm=$(grep -c '^observer_gpu_mig_gpm_sm_activity_ratio' "$WORK/load.txt")
	[ "$missing" = 0 ] && ok "MIG: every MIG device nvidia-smi lists is exported ($mig_gpm with GPM SM activity)" ||
		fail "MIG: $missing MIG devices nvidia-smi lists are not in observer_gpu_mig_info"
fi

# 4. Gone once the processes are.
wait $pod $host
pod= host=
sleep 3
fetch http://$LISTEN/metrics > "$WORK/after.txt"
[ "$(grep -c '^observer_gpu_pod_memory_used_bytes' "$WORK/after.txt")" = 0 ] &&
	ok "after exit: no pod memory series" || fail "after exit: pod memory series still served"

exit $failed
