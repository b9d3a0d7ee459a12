//! From the kernel's ring buffer to metrics: decode each closed-session record,
//! apply the interface filter, account it, and optionally log it.
use std::{
    io::Write,
    mem::size_of,
    sync::{Arc, Mutex},
};

use aya::maps::{MapData, PerCpuArray, RingBuf};
use observer_common::{LOST_SOURCES as KERNEL_LOST_SOURCES, SessionRecord};
use tokio::io::{Interest, unix::AsyncFd};

use crate::{
    error::Error,
    metrics::{LOST_SOURCES, Metrics},
    session::{IfaceFilter, Session},
    session_log::SessionLog,
};

pub struct Pipeline {
    pub metrics: Arc<Metrics>,
    pub filter: IfaceFilter,
    pub min_session_bytes: u64,
    pub session_log: Option<Mutex<SessionLog>>,
}

impl Pipeline {
    /// Reads records until the task is cancelled. Records are processed in
    /// batches per wake-up, so a burst of closes costs one wake-up.
    pub async fn run(&self, ring: RingBuf<MapData>) -> Result<(), Error> {
        // SAFETY: the AsyncFd owns the ring buffer, so the descriptor stays open
        // for as long as it is registered.
        let mut fd = unsafe { AsyncFd::register_with_interest(ring, Interest::READABLE) }
            .map_err(|e| Error::Ring(e.into_parts().1))?;
        loop {
            let mut guard = fd.readable_mut().await.map_err(Error::Ring)?;
            let ring = guard.get_inner_mut();
            while let Some(item) = ring.next() {
                self.handle(&item);
            }
            guard.clear_ready();
        }
    }

    pub fn handle(&self, bytes: &[u8]) {
        if bytes.len() < size_of::<SessionRecord>() {
            self.metrics.events_lost.with_label_values(&["session_record_malformed"]).inc();
            return;
        }
        // SAFETY: the length was checked; SessionRecord is plain old data and
        // read_unaligned makes no alignment assumption about the ring's bytes.
        let record: SessionRecord = unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast()) };
        let session = Session::from_record(&record);
        if !self.filter.accepts(&session) {
            self.metrics.record_ignored("iface");
            return;
        }
        self.metrics.record(&session, self.min_session_bytes);
        if let Some(log) = &self.session_log
            && let Ok(mut log) = log.lock()
        {
            log.write(&session);
        }
    }
}

/// The kernel's per-CPU lost-data counters, mirrored into
/// `observer_events_lost_total` by adding what grew since the last read.
pub struct KernelLostCounters {
    map: PerCpuArray<MapData, u64>,
    last: [u64; KERNEL_LOST_SOURCES as usize],
}

impl KernelLostCounters {
    pub fn new(map: PerCpuArray<MapData, u64>) -> Self {
        Self { map, last: [0; KERNEL_LOST_SOURCES as usize] }
    }

    pub fn sync(&mut self, metrics: &Metrics) {
        for (index, last) in self.last.iter_mut().enumerate() {
            let Ok(values) = self.map.get(&(index as u32), 0) else { continue };
            let total: u64 = values.iter().sum();
            if total > *last {
                metrics.events_lost.with_label_values(&[LOST_SOURCES[index]]).inc_by(total - *last);
                *last = total;
            }
        }
    }
}

/// Keeps `Write` errors of the optional session log from stopping the pipeline.
pub(crate) fn write_line(out: &mut dyn Write, line: &str) -> std::io::Result<()> {
    out.write_all(line.as_bytes())?;
    out.write_all(b"\n")?;
    out.flush()
}
