//! When a process should stop: Ctrl-C, SIGTERM, or — for a child of `asr up` — its
//! supervisor's death (so no worker outlives the system it belonged to, even when the
//! supervisor was SIGKILLed and could not stop it).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::sync::watch;

/// Set by `asr up` on its children: the supervisor's process id.
pub const SUPERVISOR_PID_ENV: &str = "ASR_SUPERVISOR_PID";

/// How often a child checks that its supervisor is still its parent.
const SUPERVISOR_POLL: Duration = Duration::from_millis(100);

/// How long an orphaned child may take to stop by itself before it SIGKILLs itself: a
/// role that has not reached its shutdown handling yet (a recognizer loading its model,
/// a connection being retried) or is stuck in it.
const ORPHAN_GRACE: Duration = Duration::from_secs(5);

/// Resolves on the first of Ctrl-C, SIGTERM, or the supervisor's disappearance.
///
/// The supervisor is watched from this call on (by a thread of its own), not from the
/// first poll: a role polls its shutdown future only once it runs (a recognizer after
/// loading its model, seconds), and a child orphaned before that must not outlive the
/// system; it has nothing to stop gracefully yet, so it is killed at once. SIGTERM and
/// Ctrl-C are handled from the first poll; before it they keep their default action
/// (the process ends at once).
pub fn signal() -> impl Future<Output = ()> + Send + 'static {
    let listening = Arc::new(AtomicBool::new(false));
    let mut orphaned = supervisor_from_env().map(|supervisor| {
        watch_supervisor(
            supervisor,
            std::os::unix::process::parent_id,
            listening.clone(),
            SUPERVISOR_POLL,
            ORPHAN_GRACE,
            |why| {
                tracing::error!(why, "the supervisor is gone: killing this process");
                let _ = nix::sys::signal::raise(nix::sys::signal::Signal::SIGKILL);
            },
        )
    });
    async move {
        use tokio::signal::unix::{SignalKind, signal};
        listening.store(true, Ordering::SeqCst);
        let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
        let supervisor_gone = async {
            // An error means the watch thread is gone without having seen anything.
            if let Some(rx) = orphaned.as_mut()
                && rx.wait_for(|gone| *gone).await.is_ok()
            {
                return;
            }
            std::future::pending().await
        };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => tracing::info!("interrupted, stopping"),
            _ = term.recv() => tracing::info!("SIGTERM, stopping"),
            () = supervisor_gone => tracing::warn!("supervisor is gone, stopping"),
        }
    }
}

fn supervisor_from_env() -> Option<u32> {
    std::env::var(SUPERVISOR_PID_ENV).ok()?.parse().ok()
}

/// Watches, on a thread of its own, that `parent()` is still `supervisor` (an orphan is
/// re-parented to init or a subreaper, so its parent id changes; a reused pid cannot
/// fool this). Once it is not: if nobody is `listening` for the shutdown yet,
/// `last_resort` runs at once; otherwise the returned receiver turns true, and
/// `last_resort` runs if the process still exists `grace` later.
fn watch_supervisor(
    supervisor: u32,
    parent: impl Fn() -> u32 + Send + 'static,
    listening: Arc<AtomicBool>,
    poll: Duration,
    grace: Duration,
    last_resort: impl FnOnce(&'static str) + Send + 'static,
) -> watch::Receiver<bool> {
    let (tx, rx) = watch::channel(false);
    let watcher = std::thread::Builder::new()
        .name("supervisor-watch".into())
        .spawn(move || {
            while parent() == supervisor {
                std::thread::sleep(poll);
            }
            if !listening.load(Ordering::SeqCst) {
                return last_resort("orphaned while starting");
            }
            let _ = tx.send(true);
            std::thread::sleep(grace);
            last_resort("orphaned, and still running after the grace period");
        });
    if let Err(e) = watcher {
        tracing::error!(error = %e, "cannot watch the supervisor");
    }
    rx
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicU32;
    use std::sync::mpsc;

    use super::*;

    /// A fake parent id the test changes, and the watcher on it.
    fn watch(
        listening: bool,
        grace: Duration,
    ) -> (
        Arc<AtomicU32>,
        watch::Receiver<bool>,
        mpsc::Receiver<&'static str>,
    ) {
        let parent = Arc::new(AtomicU32::new(4242));
        let (killed_tx, killed_rx) = mpsc::channel();
        let orphaned = watch_supervisor(
            4242,
            {
                let parent = parent.clone();
                move || parent.load(Ordering::SeqCst)
            },
            Arc::new(AtomicBool::new(listening)),
            Duration::from_millis(5),
            grace,
            move |why| killed_tx.send(why).unwrap(),
        );
        (parent, orphaned, killed_rx)
    }

    #[tokio::test]
    async fn a_listening_orphan_is_told_at_once_and_killed_only_after_the_grace() {
        let (parent, mut orphaned, killed) = watch(true, Duration::from_millis(300));
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!*orphaned.borrow(), "the supervisor is still the parent");
        assert!(killed.try_recv().is_err());

        parent.store(1, Ordering::SeqCst); // re-parented to init
        let seen = std::time::Instant::now();
        tokio::time::timeout(Duration::from_secs(2), orphaned.wait_for(|gone| *gone))
            .await
            .expect("the orphan is told")
            .expect("the watcher is alive");
        assert!(killed.try_recv().is_err(), "no kill before the grace ends");
        killed
            .recv_timeout(Duration::from_secs(2))
            .expect("the last resort runs after the grace");
        assert!(seen.elapsed() >= Duration::from_millis(250));
    }

    #[test]
    fn an_orphan_that_is_not_listening_yet_is_killed_at_once() {
        let (parent, orphaned, killed) = watch(false, Duration::from_secs(3600));
        parent.store(1, Ordering::SeqCst);
        killed
            .recv_timeout(Duration::from_secs(2))
            .expect("killed without waiting for the grace");
        assert!(!*orphaned.borrow(), "nobody to tell");
    }
}
