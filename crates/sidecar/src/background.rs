//! Snapshot loading and verification off the decision path: one OS thread at the lowest CPU
//! priority the kernel offers (`SCHED_IDLE` on Linux), so that reading, hashing and validating
//! a large snapshot (about a core-second for a million accounts) only ever uses CPU the
//! request workers leave idle. Work is queued and done one job at a time, in order.
//!
//! The thread is process-wide and started on first use: there is one CPU to be polite about,
//! whatever number of sources or stores a process holds.

use std::sync::mpsc;
use std::sync::{Mutex, OnceLock};

type Job = Box<dyn FnOnce() + Send>;

static QUEUE: OnceLock<Mutex<mpsc::Sender<Job>>> = OnceLock::new();

/// Lowers the calling thread to `SCHED_IDLE` (also used by the reaper that frees replaced
/// snapshots). Failure only means the thread keeps normal priority, so it is logged, not fatal.
pub fn lower_priority() {
    #[cfg(target_os = "linux")]
    {
        let param = libc::sched_param { sched_priority: 0 };
        // SAFETY: `sched_setscheduler` with pid 0 changes only the calling thread's policy and
        // reads `param`, a valid, initialised value that outlives the call.
        #[expect(unsafe_code, reason = "sched_setscheduler has no safe wrapper in std")]
        let result = unsafe { libc::sched_setscheduler(0, libc::SCHED_IDLE, &param) };
        if result != 0 {
            tracing::warn!(error = %std::io::Error::last_os_error(), "cannot lower the snapshot loader's priority");
        }
    }
}

fn queue() -> Option<&'static Mutex<mpsc::Sender<Job>>> {
    if let Some(queue) = QUEUE.get() {
        return Some(queue);
    }
    let (sender, receiver) = mpsc::channel::<Job>();
    let spawned = std::thread::Builder::new().name("tollgate-loader".into()).spawn(move || {
        lower_priority();
        while let Ok(job) = receiver.recv() {
            // A job that panics must not take the loader with it: later snapshots still
            // need loading. Its caller sees the dropped answer as a failed load.
            let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(job));
        }
    });
    if let Err(error) = spawned {
        tracing::error!(%error, "cannot start the snapshot loader thread");
        return None;
    }
    // Another caller may have won the race; its thread serves, and this one's exits when its
    // sender is dropped here.
    let _ = QUEUE.set(Mutex::new(sender));
    QUEUE.get()
}

/// Runs `work` on the low-priority thread and waits for it without blocking a worker; `None`
/// when it did not finish (the thread could not be started, or the work panicked).
pub async fn run<T: Send + 'static>(work: impl FnOnce() -> T + Send + 'static) -> Option<T> {
    let (done, result) = tokio::sync::oneshot::channel();
    let job: Job = Box::new(move || {
        let _ = done.send(work());
    });
    let sent = queue().and_then(|queue| queue.lock().ok().map(|sender| sender.send(job).is_ok())).unwrap_or(false);
    if !sent {
        return None;
    }
    result.await.ok()
}
