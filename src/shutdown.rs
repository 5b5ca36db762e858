//! When a process should stop: Ctrl-C, SIGTERM, or — for a child of `asr up` — its
//! supervisor's death (so no worker outlives the system it belonged to, even when the
//! supervisor was SIGKILLed and could not stop it).

use std::time::Duration;

/// Set by `asr up` on its children: the supervisor's process id.
pub const SUPERVISOR_PID_ENV: &str = "ASR_SUPERVISOR_PID";

/// Resolves on the first of Ctrl-C, SIGTERM, or the supervisor's disappearance.
pub async fn signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => tracing::info!("interrupted, stopping"),
        _ = term.recv() => tracing::info!("SIGTERM, stopping"),
        _ = supervisor_gone() => tracing::warn!("supervisor is gone, stopping"),
    }
}

async fn supervisor_gone() {
    let Some(supervisor) = std::env::var(SUPERVISOR_PID_ENV)
        .ok()
        .and_then(|pid| pid.parse::<u32>().ok())
    else {
        return std::future::pending().await;
    };
    // An orphan is re-parented (to init or a subreaper): its parent id changes.
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    loop {
        tick.tick().await;
        if std::os::unix::process::parent_id() != supervisor {
            return;
        }
    }
}
