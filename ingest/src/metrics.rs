//! The node's Prometheus metrics, named in one place.

use std::time::Duration;

use crate::protocol::SessionError;

/// Sessions opened (SessionOpened confirmed) or resumed on this node whose connection
/// is still up.
pub const SESSIONS_ACTIVE: &str = "ingest_sessions_active";
/// Audio chunks the broker confirmed.
pub const CHUNKS_APPENDED: &str = "ingest_chunks_appended_total";
/// From receiving an audio frame to the broker's confirmation (when its ack is sent).
pub const CHUNK_ACK_LATENCY: &str = "ingest_chunk_ack_latency_seconds";
/// From a result event's `at_ms` to its message being written to the client.
pub const RESULT_LATENCY: &str = "ingest_result_latency_seconds";
/// Sessions ended with an error, by code.
pub const ERRORS: &str = "ingest_errors_total";
/// Sessions resumed on this node (a client came back after a drop).
pub const SESSIONS_RESUMED: &str = "ingest_sessions_resumed_total";
/// From a `resume` message to its `resumed` answer (the takeover and the input scan).
pub const RESUME_LATENCY: &str = "ingest_resume_latency_seconds";
/// Partials not sent to a client that did not keep up.
pub const PARTIALS_DROPPED: &str = "ingest_partials_dropped_total";

pub fn error(error: &SessionError) {
    metrics::counter!(ERRORS, "code" => error.code()).increment(1);
}

pub fn chunk_confirmed(latency: Duration) {
    metrics::counter!(CHUNKS_APPENDED).increment(1);
    metrics::histogram!(CHUNK_ACK_LATENCY).record(latency.as_secs_f64());
}

pub fn result_sent(at_ms: u64) {
    let latency_ms = eventlog::now_ms().saturating_sub(at_ms);
    metrics::histogram!(RESULT_LATENCY).record(latency_ms as f64 / 1000.0);
}

pub fn partial_dropped() {
    metrics::counter!(PARTIALS_DROPPED).increment(1);
}

pub fn session_opened() {
    metrics::gauge!(SESSIONS_ACTIVE).increment(1.0);
}

pub fn session_resumed(latency: Duration) {
    metrics::gauge!(SESSIONS_ACTIVE).increment(1.0);
    metrics::counter!(SESSIONS_RESUMED).increment(1);
    metrics::histogram!(RESUME_LATENCY).record(latency.as_secs_f64());
}

pub fn session_gone() {
    metrics::gauge!(SESSIONS_ACTIVE).decrement(1.0);
}
