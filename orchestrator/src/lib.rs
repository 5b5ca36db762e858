//! The orchestrator (worker manager): its gRPC API, the worker registry in Redis,
//! allocation of sessions to workers with idle capacity, and heartbeats.

/// The generated gRPC API (`proto/worker_manager.proto`), client and server.
pub mod api {
    tonic::include_proto!("asr.worker_manager.v1");
}
