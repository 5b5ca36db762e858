//! The projector's Prometheus metrics, named in one place.

use std::time::Duration;

/// Events projected (committed), per stream.
pub const EVENTS: &str = "projector_events_total";
/// Transaction time of one batch.
pub const COMMIT: &str = "projector_commit_seconds";
/// Now minus the time of the last projected event, per stream: how far behind.
pub const LAG: &str = "projector_lag_seconds";
/// Events the broker dropped (retention) before they were projected.
pub const LOST: &str = "projector_events_lost_total";

pub fn batch_committed(stream: &str, events: usize, took: Duration, last_at_ms: u64) {
    metrics::counter!(EVENTS, "stream" => stream.to_string()).increment(events as u64);
    metrics::histogram!(COMMIT).record(took.as_secs_f64());
    let lag_ms = eventlog::now_ms().saturating_sub(last_at_ms);
    metrics::gauge!(LAG, "stream" => stream.to_string()).set(lag_ms as f64 / 1000.0);
}

pub fn records_lost(stream: &str, lost: u64) {
    metrics::counter!(LOST, "stream" => stream.to_string()).increment(lost);
}
