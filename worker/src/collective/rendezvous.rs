//! Waiting for the peers of a GPU rank without losing the ability to stop.
//!
//! - [`IdSlot`]: the NCCL unique id's last hop inside a worker: the agent's stream receives
//!   the coordinator's `Rendezvous` and puts the id in the rank's slot; the rank's thread,
//!   which cannot join the communicator without it, waits there.
//! - [`poll_until`]: how the rank waits for a non-blocking NCCL communicator to finish
//!   joining or enqueueing (`nccl.rs`), looking at its stop flag between polls.
//!
//! Not tied to CUDA, so it is built and tested everywhere; only the CUDA path waits here.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use crate::WorkerError;

/// How often a waiting rank looks at its stop flag.
const STOP_POLL: Duration = Duration::from_millis(100);

/// One rank's NCCL unique id, empty until the coordinator relays it.
#[derive(Default)]
pub struct IdSlot {
    id: Mutex<Option<Vec<u8>>>,
    filled: Condvar,
}

impl IdSlot {
    pub fn new() -> Self {
        Self::default()
    }

    /// Hands the id to the waiting rank. The coordinator repeats it when the worker
    /// reattaches; a repeat replaces the id (it is the same one for one attempt).
    pub fn deliver(&self, id: Vec<u8>) {
        *self.id.lock().unwrap_or_else(|e| e.into_inner()) = Some(id);
        self.filled.notify_all();
    }

    /// Waits for the id until `stop` is set (the rank was cancelled: rank 0 failed, say) or
    /// `timeout` passes.
    pub fn wait(&self, stop: &AtomicBool, timeout: Duration) -> Result<Vec<u8>, WorkerError> {
        let deadline = Instant::now() + timeout;
        let mut id = self.id.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if let Some(id) = id.as_ref() {
                return Ok(id.clone());
            }
            if stop.load(Ordering::Relaxed) {
                return Err(WorkerError::Stopped { step: 0 });
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(WorkerError::Collective(format!(
                    "no NCCL unique id from rank 0 within {} s (the coordinator relays it \
                     once rank 0 has made it)",
                    timeout.as_secs_f64()
                )));
            }
            id = self
                .filled
                .wait_timeout(id, left.min(STOP_POLL))
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }
}

/// What one look at an operation in flight found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Progress {
    Done,
    Pending,
}

/// Calls `poll` until it says [`Progress::Done`], sleeping `every` between calls. Returns
/// [`WorkerError::Stopped`] once `stop` is set, a timeout error naming `what` once `timeout`
/// has passed, and the first error `poll` returns. The caller abandons the operation on any
/// error (for NCCL: aborts the communicator).
pub fn poll_until(
    what: &str,
    stop: &AtomicBool,
    timeout: Duration,
    every: Duration,
    mut poll: impl FnMut() -> Result<Progress, WorkerError>,
) -> Result<(), WorkerError> {
    let deadline = Instant::now() + timeout;
    loop {
        if poll()? == Progress::Done {
            return Ok(());
        }
        if stop.load(Ordering::Relaxed) {
            return Err(WorkerError::Stopped { step: 0 });
        }
        if Instant::now() >= deadline {
            return Err(WorkerError::Collective(format!(
                "{what}: not done within {} s",
                timeout.as_secs_f64()
            )));
        }
        std::thread::sleep(every);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::thread::JoinHandle;

    /// A stop flag that another thread sets after `after`.
    fn stop_after(after: Duration) -> (Arc<AtomicBool>, JoinHandle<()>) {
        let stop = Arc::new(AtomicBool::new(false));
        let setter = stop.clone();
        let t = std::thread::spawn(move || {
            std::thread::sleep(after);
            setter.store(true, Ordering::Relaxed);
        });
        (stop, t)
    }

    #[test]
    fn a_waiting_rank_gets_the_id_delivered_from_another_thread() {
        let slot = Arc::new(IdSlot::new());
        let stop = AtomicBool::new(false);
        let sender = slot.clone();
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            sender.deliver(vec![7; 128]);
        });
        let id = slot.wait(&stop, Duration::from_secs(30)).unwrap();
        assert_eq!(id, vec![7; 128]);
        t.join().unwrap();
        // Taken again (a repeat after a reattach changes nothing for the rank).
        slot.deliver(vec![7; 128]);
        assert_eq!(slot.wait(&stop, Duration::ZERO).unwrap(), vec![7; 128]);
    }

    #[test]
    fn a_stopped_rank_stops_waiting() {
        let slot = IdSlot::new();
        let (stop, t) = stop_after(Duration::from_millis(50));
        let started = Instant::now();
        let err = slot.wait(&stop, Duration::from_secs(30)).unwrap_err();
        assert!(matches!(err, WorkerError::Stopped { step: 0 }), "{err}");
        assert!(started.elapsed() < Duration::from_secs(5), "took {:?}", started.elapsed());
        t.join().unwrap();
    }

    #[test]
    fn no_id_within_the_timeout_is_an_error_naming_rank_0() {
        let slot = IdSlot::new();
        let err = slot.wait(&AtomicBool::new(false), Duration::from_millis(30)).unwrap_err();
        assert!(err.to_string().contains("no NCCL unique id from rank 0"), "{err}");
    }

    const SOON: Duration = Duration::from_millis(5);
    const LONG: Duration = Duration::from_secs(30);

    #[test]
    fn polling_ends_when_the_operation_is_done() {
        let mut polls = 0;
        poll_until("join", &AtomicBool::new(false), LONG, SOON, || {
            polls += 1;
            Ok(if polls < 5 { Progress::Pending } else { Progress::Done })
        })
        .unwrap();
        assert_eq!(polls, 5);
    }

    #[test]
    fn polling_stops_on_the_stop_flag_a_timeout_or_an_error() {
        let (stop, t) = stop_after(Duration::from_millis(50));
        let started = Instant::now();
        let pending = || Ok(Progress::Pending);
        let err = poll_until("join", &stop, LONG, SOON, pending).unwrap_err();
        assert!(matches!(err, WorkerError::Stopped { step: 0 }), "{err}");
        assert!(started.elapsed() < Duration::from_secs(5), "took {:?}", started.elapsed());
        t.join().unwrap();

        let idle = AtomicBool::new(false);
        let err = poll_until("joining as rank 1 of 2", &idle, SOON * 6, SOON, pending).unwrap_err();
        assert!(err.to_string().contains("joining as rank 1 of 2: not done within"), "{err}");

        let failed = || Err(WorkerError::Collective("NCCL: ncclRemoteError".into()));
        let err = poll_until("all-reduce", &idle, LONG, SOON, failed).unwrap_err();
        assert!(err.to_string().contains("ncclRemoteError"), "{err}");
    }
}
