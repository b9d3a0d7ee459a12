//! The sampling thread: initialise NVML, read every GPU each `--gpu-interval`,
//! map compute processes to pods, publish a snapshot; on failure publish
//! `nvml_up 0`, log why, and re-initialise with exponential backoff.
//!
//! A plain std thread, never a tokio task: NVML calls block (for seconds when
//! a driver is wedged), and nothing else may wait on them. Scrapes read the
//! last published snapshot; shutdown does not join the thread.
use std::{
    collections::{BTreeMap, HashMap, HashSet},
    panic::{AssertUnwindSafe, catch_unwind},
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
        mpsc::SyncSender,
    },
    time::{Duration, Instant, SystemTime},
};

use super::{
    Shared,
    nvml::{self, Fault, Notes, Reading, Session},
    snapshot::{GpuState, MigState, PodMemory, Snapshot},
};
use crate::enrich::pods::{PodLookup, Resolver};

/// Re-initialisation delays: 1 s, doubling, at most a minute. The upper bound
/// keeps a node whose driver arrives late (GPU operator) from waiting long.
pub const BACKOFF_FIRST: Duration = Duration::from_secs(1);
pub const BACKOFF_MAX: Duration = Duration::from_secs(60);

pub struct Config {
    pub lib: Option<PathBuf>,
    pub interval: Duration,
    pub pod_log_dir: PathBuf,
    /// Send the first attempt's outcome here (`--gpu required`); the thread
    /// ends if that attempt fails, since the process is about to exit.
    pub first: Option<SyncSender<Result<(), String>>>,
}

#[derive(Debug)]
struct Backoff(Duration);

impl Backoff {
    fn next(&mut self) -> Duration {
        let d = self.0;
        self.0 = (self.0 * 2).min(BACKOFF_MAX);
        d
    }
    fn peek(&self) -> Duration {
        self.0
    }
    fn reset(&mut self) {
        self.0 = BACKOFF_FIRST;
    }
}

/// Why a session ended.
enum End {
    Stopped,
    /// Start over after the backoff delay.
    Failed(String),
    /// A GPU stayed down for the backoff delay: start over at once, with
    /// fresh handles (after a GPU reset or driver reload old ones may never
    /// answer again).
    Reinit(String),
}

/// State that outlives sessions.
struct Sampler {
    cfg: Config,
    shared: Arc<Shared>,
    stop: Arc<AtomicBool>,
    backoff: Backoff,
    notes: Notes,
    resolver: Resolver,
    /// XID counts per GPU (by UUID), kept across re-initialisations so the
    /// counter does not go back.
    xids: HashMap<String, u64>,
    last_failure: Option<String>,
    warned_pods: HashSet<String>,
    /// Identity and MIG mode of each GPU index as last read, so a lost GPU
    /// keeps the labels it had (also when it is lost as a session opens).
    known: HashMap<u32, (nvml::Identity, MigState)>,
}

pub fn run(cfg: Config, shared: Arc<Shared>, stop: Arc<AtomicBool>) {
    let resolver = Resolver::new(cfg.pod_log_dir.clone());
    let mut s = Sampler {
        cfg,
        shared,
        stop,
        backoff: Backoff(BACKOFF_FIRST),
        notes: Notes::default(),
        resolver,
        xids: HashMap::new(),
        last_failure: None,
        warned_pods: HashSet::new(),
        known: HashMap::new(),
    };
    loop {
        // A panic inside NVML's wrapper must not take the thread (and GPU
        // metrics) down for good: treat it as a failed session.
        let end = catch_unwind(AssertUnwindSafe(|| s.session())).unwrap_or_else(|p| {
            let msg = p.downcast_ref::<&str>().map(|s| s.to_string()).or_else(|| p.downcast_ref::<String>().cloned());
            End::Failed(format!("the NVML sampler panicked: {}", msg.unwrap_or_default()))
        });
        let delay = match end {
            End::Stopped => return,
            End::Failed(why) => {
                if let Some(first) = s.cfg.first.take() {
                    // `--gpu required`: the caller exits with this message.
                    let _ = first.send(Err(why));
                    return;
                }
                let delay = s.backoff.next();
                s.publish_down();
                if s.last_failure.as_ref() != Some(&why) {
                    tracing::warn!(error = %why, retry_in = ?delay, "GPU statistics unavailable; observer_nvml_up is 0, retrying with backoff");
                    s.last_failure = Some(why);
                } else {
                    tracing::debug!(error = %why, retry_in = ?delay, "NVML still unavailable");
                }
                delay
            }
            End::Reinit(why) => {
                tracing::info!(reason = %why, "re-initialising NVML");
                Duration::ZERO
            }
        };
        if !s.sleep_until(Instant::now() + delay) {
            return;
        }
    }
}

impl Sampler {
    fn session(&mut self) -> End {
        let nvml = match nvml::init(self.cfg.lib.as_deref()) {
            Ok(n) => n,
            Err(why) => return End::Failed(why),
        };
        let mut session = match Session::open(&nvml, &mut self.notes) {
            Ok(s) => s,
            Err(why) => return End::Failed(why),
        };
        if let Some(first) = self.cfg.first.take() {
            if session.slots.is_empty() {
                let why = "NVML started but reports no GPU (is NVIDIA_VISIBLE_DEVICES set for this container?)";
                let _ = first.send(Err(why.into()));
                return End::Stopped;
            }
            let _ = first.send(Ok(()));
        }
        self.last_failure = None;
        tracing::info!(driver = %session.driver_version, gpus = session.slots.len(), "NVML ready");

        let mut down_since: Option<Instant> = None;
        loop {
            let started = Instant::now();
            let snapshot = match self.cycle(&mut session, started) {
                Ok(s) => s,
                Err(end) => return end,
            };
            let all_up = snapshot.gpus.iter().all(|g| g.up);
            self.shared.publish(snapshot);
            if all_up {
                down_since = None;
                self.backoff.reset();
            } else {
                let since = *down_since.get_or_insert(started);
                if since.elapsed() >= self.backoff.peek() {
                    let waited = self.backoff.next();
                    return End::Reinit(format!("a GPU has been down for {waited:?}"));
                }
            }
            if !self.sleep_until(started + self.cfg.interval) {
                return End::Stopped;
            }
        }
    }

    /// One pass over every GPU. `Err` when the session must end: it broke,
    /// or GPUs came or went (new handles and indexes are needed).
    fn cycle(&mut self, session: &mut Session<'_>, started: Instant) -> Result<Snapshot, End> {
        let count = session.device_count().map_err(|e| End::Failed(format!("nvmlDeviceGetCount failed: {e}")))?;
        if count as usize != session.slots.len() {
            return Err(End::Reinit(format!("the GPU count changed from {} to {count}", session.slots.len())));
        }
        let nvml = session.nvml;
        let mut gpus = Vec::with_capacity(session.slots.len());
        let mut processes = Vec::new();
        // To log a GPU's transitions once, not every cycle.
        let previous = self.shared.latest();
        for slot in &mut session.slots {
            let was_up = previous.gpus.iter().find(|g| g.index == slot.index).is_none_or(|g| g.up);
            let (reading, lost) = match slot.read(nvml, &mut self.notes) {
                Ok(r) => (Some(r), None),
                Err(Fault::Session(why)) => return Err(End::Failed(why)),
                Err(Fault::Lost(why)) => (None, Some(why)),
            };
            if let Some(r) = &reading
                && !slot.identity.uuid.is_empty()
            {
                self.known.insert(slot.index, (slot.identity.clone(), r.mig_mode));
            }
            let (id, last_mig) = match self.known.get(&slot.index) {
                Some((id, mig)) if reading.is_none() => (id, *mig),
                _ => (&slot.identity, MigState::default()),
            };
            match (&lost, was_up) {
                (Some(why), true) => {
                    tracing::warn!(gpu = slot.index, uuid = %id.uuid, error = %why, "GPU lost; observer_gpu_up is 0 and its values are absent until it answers")
                }
                (None, false) => tracing::info!(gpu = slot.index, uuid = %id.uuid, "GPU answers again"),
                _ => {}
            }
            let key = if id.uuid.is_empty() { format!("index {}", slot.index) } else { id.uuid.clone() };
            let mut state = GpuState {
                index: slot.index,
                uuid: id.uuid.clone(),
                model: id.model.clone(),
                pci_bus_id: id.pci_bus_id.clone(),
                mig_mode: last_mig,
                up: reading.is_some(),
                ..GpuState::default()
            };
            if slot.watches_xid() {
                state.xid_errors = Some(*self.xids.entry(key.clone()).or_default());
            }
            if let Some(Reading { values, mig_mode, processes: procs, xids, mig, nvlinks }) = reading {
                for code in &xids {
                    let code = code.map_or_else(|| "unknown".to_string(), |c| c.to_string());
                    tracing::warn!(gpu = slot.index, uuid = %id.uuid, xid = %code, "XID error reported by the NVIDIA driver");
                }
                if let Some(n) = state.xid_errors.as_mut() {
                    *n += xids.len() as u64;
                    self.xids.insert(key, *n);
                }
                state.values = values;
                state.mig_mode = mig_mode;
                state.mig = mig;
                state.nvlinks = nvlinks;
                processes.extend(procs.into_iter().map(|(pid, used)| (id.uuid.clone(), pid, used)));
            }
            gpus.push(state);
        }
        let pods = self.pods(processes);
        Ok(Snapshot {
            nvml_up: true,
            driver_version: session.driver_version.clone(),
            gpus,
            pods,
            sampled_at: Some(SystemTime::now()),
            cycle: Some(started.elapsed()),
            completed: Some(Instant::now()),
        })
    }

    /// Sums process memory per (GPU, pod). Processes outside pods and memory
    /// NVML does not report are left out.
    fn pods(&mut self, processes: Vec<(String, u32, Option<u64>)>) -> Vec<PodMemory> {
        let mut sums: BTreeMap<(String, String, String), u64> = BTreeMap::new();
        for (uuid, pid, used) in processes {
            let Some(bytes) = used else { continue };
            match self.resolver.pod_of_pid(pid) {
                PodLookup::Pod(p) => *sums.entry((uuid, p.namespace, p.name)).or_default() += bytes,
                PodLookup::UnnamedPod { uid } => {
                    if self.warned_pods.insert(uid.clone()) {
                        let why = self
                            .resolver
                            .scan_error
                            .clone()
                            .unwrap_or_else(|| format!("no entry for it in {}", self.resolver.log_dir().display()));
                        tracing::warn!(pid, pod_uid = %uid, reason = %why, "GPU process in a pod whose name is unknown; not in observer_gpu_pod_memory_used_bytes (mount the kubelet's pod log directory, see --pod-log-dir)");
                    }
                }
                PodLookup::NotInPod | PodLookup::NoProcess => {}
            }
        }
        sums.into_iter().map(|((uuid, namespace, pod), bytes)| PodMemory { uuid, namespace, pod, bytes }).collect()
    }

    /// NVML is down: only `observer_nvml_up 0`, and when the last cycle
    /// completed.
    fn publish_down(&self) {
        let down = self.shared.latest().down();
        self.shared.publish(down);
    }

    /// Sleeps until `deadline`; false when asked to stop.
    fn sleep_until(&self, deadline: Instant) -> bool {
        loop {
            if self.stop.load(Ordering::Acquire) {
                return false;
            }
            let now = Instant::now();
            if now >= deadline {
                return true;
            }
            std::thread::park_timeout(deadline - now);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_a_minute_and_resets() {
        let mut b = Backoff(BACKOFF_FIRST);
        let delays: Vec<u64> = (0..9).map(|_| b.next().as_secs()).collect();
        assert_eq!(delays, [1, 2, 4, 8, 16, 32, 60, 60, 60]);
        b.reset();
        assert_eq!(b.peek(), BACKOFF_FIRST);
    }
}
