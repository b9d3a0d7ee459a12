//! How many data requests (/metrics, /api/v1/snapshot) run, and how often
//! they walk the kernel's tables: a [`Gate`] bounds the requests in flight
//! (beyond it: 503 with Retry-After), a [`Coalescer`] lets concurrent scrapes
//! share one refresh of the kernel-side counters. Before these, every scrape
//! walked the tables on a blocking thread of its own, and a few hundred
//! scrapers queued without bound, one thread each.
use std::{
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use tokio::sync::{Mutex, OwnedSemaphorePermit, Semaphore};

/// A scrape reuses a refresh begun at most this long before it arrived.
/// Short next to any scrape interval (a Prometheus pair 1 s apart still gets
/// two refreshes), long enough that a burst of scrapers shares one.
pub const REFRESH_REUSE: Duration = Duration::from_millis(200);
/// Data requests that render at once (encode the exposition or the
/// snapshot); the others in flight wait for a turn.
pub const SCRAPES_AT_ONCE: usize = 4;
/// Data requests in flight (rendering or waiting); one more is answered 503
/// at once. As many as the server has data connections
/// ([`crate::server::MAX_CONNECTIONS`]), so a full set of them is served.
pub const MAX_SCRAPES_IN_FLIGHT: usize = crate::server::MAX_CONNECTIONS;
/// The longest a data request waits for a turn before it is answered 503.
pub const SCRAPE_WAIT: Duration = Duration::from_secs(5);
/// Retry-After of those 503 answers, in seconds.
pub const RETRY_AFTER_SECONDS: u64 = 1;

/// Why a data request was not let in.
#[derive(Debug, PartialEq, Eq)]
pub enum Refused {
    /// `max_in_flight` requests were already in flight.
    InFlight,
    /// No turn came within the wait.
    Wait,
}

impl Refused {
    /// The `reason` label of `observer_http_requests_rejected_total`.
    pub fn reason(&self) -> &'static str {
        match self {
            Refused::InFlight => "scrapes_in_flight",
            Refused::Wait => "scrape_wait",
        }
    }
}

/// Bounds the data requests in flight and those rendering at once.
pub struct Gate {
    turns: Arc<Semaphore>,
    in_flight: Arc<AtomicUsize>,
    max_in_flight: usize,
    wait: Duration,
}

/// A request's turn: rendering may proceed; released on drop.
pub struct Turn {
    _permit: OwnedSemaphorePermit,
    _in_flight: InFlight,
}

struct InFlight(Arc<AtomicUsize>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Default for Gate {
    fn default() -> Self {
        Gate::new(SCRAPES_AT_ONCE, MAX_SCRAPES_IN_FLIGHT, SCRAPE_WAIT)
    }
}

impl Gate {
    pub fn new(at_once: usize, max_in_flight: usize, wait: Duration) -> Self {
        Gate { turns: Arc::new(Semaphore::new(at_once)), in_flight: Arc::default(), max_in_flight, wait }
    }

    /// Waits for a turn, or says why there is none.
    pub async fn enter(&self) -> Result<Turn, Refused> {
        if self.in_flight.fetch_add(1, Ordering::AcqRel) >= self.max_in_flight {
            self.in_flight.fetch_sub(1, Ordering::AcqRel);
            return Err(Refused::InFlight);
        }
        let in_flight = InFlight(self.in_flight.clone());
        match tokio::time::timeout(self.wait, self.turns.clone().acquire_owned()).await {
            Ok(Ok(permit)) => Ok(Turn { _permit: permit, _in_flight: in_flight }),
            _ => Err(Refused::Wait),
        }
    }
}

/// Runs a refresh for whoever asks, unless one begun at most `reuse` before
/// the asker arrived has run (or is running: the asker waits for it). So at
/// most one runs at a time, and concurrent askers share one.
pub struct Coalescer {
    reuse: Duration,
    /// When the last refresh began; held while one runs.
    last: Arc<Mutex<Option<Instant>>>,
    /// When the last completed refresh began: an asker it satisfies goes on
    /// at once, even while a newer refresh runs for later askers.
    done: Arc<std::sync::Mutex<Option<Instant>>>,
}

/// What [`Coalescer::refresh`] did.
#[derive(Debug, PartialEq, Eq)]
pub enum Refreshed {
    Ran,
    Reused,
}

impl Default for Coalescer {
    fn default() -> Self {
        Coalescer::new(REFRESH_REUSE)
    }
}

impl Coalescer {
    pub fn new(reuse: Duration) -> Self {
        Coalescer { reuse, last: Arc::default(), done: Arc::default() }
    }

    fn fresh(&self, began: Option<Instant>, arrived: Instant) -> bool {
        began.is_some_and(|began| began + self.reuse >= arrived)
    }

    /// Brings the state to at most `reuse` older than `arrived`: runs `work`
    /// on a blocking thread, or reuses a recent run. The lock moves into the
    /// blocking task, so an asker that goes away (its client disconnected)
    /// cannot let a second refresh start beside one still running.
    pub async fn refresh(&self, arrived: Instant, work: impl FnOnce() + Send + 'static) -> Refreshed {
        if self.fresh(*self.done.lock().unwrap_or_else(|p| p.into_inner()), arrived) {
            return Refreshed::Reused;
        }
        let mut last = self.last.clone().lock_owned().await;
        if self.fresh(*last, arrived) {
            return Refreshed::Reused;
        }
        let began = Instant::now();
        *last = Some(began);
        let done = self.done.clone();
        let _ = tokio::task::spawn_blocking(move || {
            work();
            *done.lock().unwrap_or_else(|p| p.into_inner()) = Some(began);
            drop(last);
        })
        .await;
        Refreshed::Ran
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;

    use super::*;

    /// A refresh that takes `took` and records how many ran and how many
    /// ran at once at most.
    fn work(
        runs: &Arc<AtomicUsize>,
        running: &Arc<AtomicUsize>,
        most: &Arc<AtomicUsize>,
        took: Duration,
    ) -> impl FnOnce() + Send + 'static {
        let (runs, running, most) = (runs.clone(), running.clone(), most.clone());
        move || {
            runs.fetch_add(1, Ordering::SeqCst);
            let now = running.fetch_add(1, Ordering::SeqCst) + 1;
            most.fetch_max(now, Ordering::SeqCst);
            std::thread::sleep(took);
            running.fetch_sub(1, Ordering::SeqCst);
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_scrapes_share_one_refresh_and_later_ones_run_again() {
        let coalescer = Arc::new(Coalescer::new(Duration::from_millis(100)));
        let (runs, running, most) = (Arc::default(), Arc::default(), Arc::default());
        let arrived = Instant::now();
        let askers: Vec<_> = (0..50)
            .map(|_| {
                let (c, w) = (coalescer.clone(), work(&runs, &running, &most, Duration::from_millis(50)));
                tokio::spawn(async move { c.refresh(arrived, w).await })
            })
            .collect();
        let mut ran = 0;
        for asker in askers {
            ran += usize::from(asker.await.unwrap() == Refreshed::Ran);
        }
        assert_eq!((ran, runs.load(Ordering::SeqCst)), (1, 1), "50 concurrent askers, one refresh");
        // Arrived within `reuse` of the last one's start: reused.
        let w = work(&runs, &running, &most, Duration::ZERO);
        assert_eq!(coalescer.refresh(arrived + Duration::from_millis(90), w).await, Refreshed::Reused);
        // Arrived later: a new refresh.
        tokio::time::sleep(Duration::from_millis(120)).await;
        let w = work(&runs, &running, &most, Duration::ZERO);
        assert_eq!(coalescer.refresh(Instant::now(), w).await, Refreshed::Ran);
        assert_eq!(runs.load(Ordering::SeqCst), 2);
        assert_eq!(most.load(Ordering::SeqCst), 1);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_asker_satisfied_by_the_last_refresh_does_not_wait_for_a_running_one() {
        let coalescer = Arc::new(Coalescer::new(Duration::from_millis(300)));
        let (runs, running, most) = (Arc::default(), Arc::default(), Arc::default());
        let first = Instant::now();
        coalescer.refresh(first, work(&runs, &running, &most, Duration::ZERO)).await;
        // A later asker (beyond `reuse` of the first) starts a slow refresh ...
        let slow = {
            let (c, w) = (coalescer.clone(), work(&runs, &running, &most, Duration::from_millis(500)));
            tokio::spawn(async move { c.refresh(first + Duration::from_millis(400), w).await })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        // ... while one the first refresh satisfies goes on at once.
        let started = Instant::now();
        let w = work(&runs, &running, &most, Duration::ZERO);
        assert_eq!(coalescer.refresh(first + Duration::from_millis(100), w).await, Refreshed::Reused);
        assert!(started.elapsed() < Duration::from_millis(200), "waited {:?}", started.elapsed());
        assert_eq!(slow.await.unwrap(), Refreshed::Ran);
        assert_eq!((runs.load(Ordering::SeqCst), most.load(Ordering::SeqCst)), (2, 1));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_asker_that_goes_away_does_not_let_two_refreshes_overlap() {
        let coalescer = Arc::new(Coalescer::new(Duration::ZERO));
        let (runs, running, most) = (Arc::default(), Arc::default(), Arc::default());
        let first = {
            let (c, w) = (coalescer.clone(), work(&runs, &running, &most, Duration::from_millis(200)));
            tokio::spawn(async move { c.refresh(Instant::now(), w).await })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        first.abort();
        let _ = first.await;
        // The aborted asker's refresh is still running: this one waits for it.
        let w = work(&runs, &running, &most, Duration::from_millis(10));
        assert_eq!(coalescer.refresh(Instant::now(), w).await, Refreshed::Ran);
        assert_eq!(runs.load(Ordering::SeqCst), 2);
        assert_eq!(most.load(Ordering::SeqCst), 1, "two refreshes ran at once");
    }

    #[tokio::test]
    async fn the_gate_bounds_requests_in_flight_and_their_wait() {
        let gate = Arc::new(Gate::new(2, 3, Duration::from_millis(200)));
        let a = gate.enter().await.unwrap();
        let _b = gate.enter().await.unwrap();
        // A third is in flight, waiting for a turn ...
        let third = {
            let gate = gate.clone();
            tokio::spawn(async move {
                let started = Instant::now();
                (gate.enter().await.err(), started.elapsed())
            })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        // ... so a fourth is refused at once.
        let started = Instant::now();
        assert_eq!(gate.enter().await.err(), Some(Refused::InFlight));
        assert!(started.elapsed() < Duration::from_millis(50), "refused at once, not after the wait");
        let (third, waited) = third.await.unwrap();
        assert_eq!(third, Some(Refused::Wait), "no turn freed within the wait");
        assert!(waited >= Duration::from_millis(200), "{waited:?}");
        // Refusals give their place back: with a turn free, the next gets in.
        drop(a);
        assert!(gate.enter().await.is_ok());
    }
}
