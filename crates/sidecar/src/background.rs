//! Snapshot loading and verification off the decision path: one OS thread at the lowest CPU
//! priority the kernel offers (`SCHED_IDLE` on Linux), so that reading, hashing and validating
//! a large snapshot (about a core-second for a million accounts) uses CPU the request workers
//! leave idle. Work is queued and done one job at a time, in order.
//!
//! Idle priority alone can starve an update: on a busy machine a small snapshot took up to
//! 1.9 s to install, and under sustained full CPU it might never install. So a load is run
//! with a deadline ([`DEADLINE`], 2 s): if the idle thread has not answered by then, the same
//! work is started at normal priority on the runtime's blocking pool and the first answer is
//! taken. A thread cannot leave `SCHED_IDLE` again without `CAP_SYS_NICE`, so escalation is a
//! second run rather than a priority change; loads are free of side effects (the install
//! happens afterwards, once), so running one twice costs CPU, never correctness. A job the idle
//! thread has not started yet is taken away from it, so in that case it runs only once.
//!
//! The thread is process-wide and started on first use: there is one CPU to be polite about,
//! whatever number of sources or stores a process holds.

use std::sync::mpsc;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

/// How long a load may wait for idle CPU before it is also run at normal priority.
pub const DEADLINE: Duration = Duration::from_secs(2);

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

fn enqueue(job: Job) -> bool {
    queue().and_then(|queue| queue.lock().ok().map(|sender| sender.send(job).is_ok())).unwrap_or(false)
}

/// Runs `work` on the low-priority thread and waits for it without blocking a worker; `None`
/// when it did not finish (the thread could not be started, or the work panicked). No
/// deadline: for work that may wait (writing the snapshot cache).
pub async fn run<T: Send + 'static>(work: impl FnOnce() -> T + Send + 'static) -> Option<T> {
    let (done, result) = tokio::sync::oneshot::channel();
    let job: Job = Box::new(move || {
        let _ = done.send(work());
    });
    if !enqueue(job) {
        return None;
    }
    result.await.ok()
}

/// Runs side-effect-free `work` on the low-priority thread; if it has not answered within
/// `deadline`, runs it at normal priority too (see the module comment) and returns the first
/// answer. `None` when neither finished (both panicked).
///
/// Each call runs `work` at most twice and spawns at most one blocking task, which finishes
/// when `work` does; callers load one update at a time, so escalations do not pile up.
pub async fn run_with_deadline<T: Send + 'static>(work: impl Fn() -> T + Send + Sync + 'static, deadline: Duration) -> Option<T> {
    let work = Arc::new(work);
    // The queued job's copy of the work; whichever side takes it first runs it. A job the idle
    // thread has not started is emptied by the escalation, so a starved queue keeps no work (nor
    // the snapshot bytes it holds) alive, and the idle thread skips the job when it gets to it.
    let slot = Arc::new(Mutex::new(Some(Arc::clone(&work))));
    let (done, mut result) = tokio::sync::oneshot::channel();
    let job: Job = {
        let slot = Arc::clone(&slot);
        Box::new(move || {
            let taken = slot.lock().ok().and_then(|mut slot| slot.take());
            if let Some(work) = taken {
                let _ = done.send((*work)());
            }
        })
    };
    let queued = enqueue(job);
    if queued {
        match tokio::time::timeout(deadline, &mut result).await {
            Ok(answer) => return answer.ok(),
            Err(_elapsed) => {
                tracing::info!(deadline_ms = deadline.as_millis() as u64, "no idle CPU for a snapshot load; running it at normal priority")
            }
        }
    }
    // A poisoned slot cannot tell; then both run, which costs CPU, never correctness.
    let idle_started = queued && slot.lock().map(|mut slot| slot.take().is_none()).unwrap_or(true);
    drop(slot);
    let urgent = tokio::task::spawn_blocking(move || (*work)());
    if !idle_started {
        return urgent.await.ok();
    }
    tokio::pin!(urgent);
    tokio::select! {
        answer = &mut result => match answer {
            Ok(value) => Some(value),
            Err(_) => urgent.await.ok(),
        },
        answer = &mut urgent => match answer {
            Ok(value) => Some(value),
            Err(_) => result.await.ok(),
        },
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    #[tokio::test]
    async fn a_load_stuck_behind_the_idle_thread_runs_at_normal_priority_after_the_deadline() {
        // Occupy the idle thread, as starvation would, and wait until it is occupied: `run`
        // queues its job only when first polled.
        let (release, hold) = std::sync::mpsc::channel::<()>();
        let (occupied, is_occupied) = tokio::sync::oneshot::channel::<()>();
        let blocker = tokio::spawn(run(move || {
            let _ = occupied.send(());
            let _ = hold.recv_timeout(Duration::from_secs(60));
        }));
        assert_eq!(is_occupied.await, Ok(()));
        let ran = Arc::new(AtomicUsize::new(0));
        let counted = Arc::clone(&ran);
        let on_loader = Arc::new(AtomicUsize::new(0));
        let loader_runs = Arc::clone(&on_loader);
        // Stands for the snapshot bytes a load holds.
        let payload = Arc::new(vec![0u8; 1024]);
        let held = Arc::clone(&payload);
        let started = tokio::time::Instant::now();
        let answer = run_with_deadline(
            move || {
                counted.fetch_add(1, Ordering::SeqCst);
                if std::thread::current().name() == Some("tollgate-loader") {
                    loader_runs.fetch_add(1, Ordering::SeqCst);
                }
                42 + held.len() - 1024
            },
            Duration::from_millis(100),
        )
        .await;
        assert_eq!(answer, Some(42));
        assert_eq!(on_loader.load(Ordering::SeqCst), 0, "answered by the escalation, not the idle thread");
        // Generous: a loaded machine may be slow to start a blocking thread, never 20 s slow.
        assert!(started.elapsed() < Duration::from_secs(20), "took {:?}", started.elapsed());
        // The job still queued behind the blocker no longer holds the work.
        assert_eq!(Arc::strong_count(&payload), 1);
        let _ = release.send(());
        assert_eq!(blocker.await.ok(), Some(Some(())));
        // The queued copy was claimed by the escalation and is skipped: the work ran once.
        let flushed = run(|| ()).await;
        assert_eq!(flushed, Some(()));
        assert_eq!(ran.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn an_idle_answer_within_the_deadline_is_taken_as_is() {
        assert_eq!(run_with_deadline(|| 7, Duration::from_secs(30)).await, Some(7));
    }
}
