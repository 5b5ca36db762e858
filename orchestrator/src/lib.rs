//! The orchestrator (worker manager): its gRPC API, the worker registry in Redis,
//! allocation of sessions to workers with idle capacity, heartbeats, the handling of
//! lost workers, and leader election among replicas.
//!
//! - [`allocator`]: the allocation and wait-queue rules, pure;
//! - [`leadership`]: the leader lock with its fencing token, in Redis;
//! - [`load`]: each model's load projection, folded from the event streams;
//! - [`scaling`]: the scaling policies and fleet decisions, pure;
//! - [`autoscaler`]: acts on them while leading, through a [`scaling_backend`]
//!   (local processes, [`kubernetes`], dry run);
//! - [`discovery`]: how clients find and follow the leader;
//! - [`registry`]: workers, sessions, queues and epochs in Redis, written fenced;
//! - [`service`]: the `WorkerManager` gRPC service;
//! - [`server`]: start-up, the ops endpoints and the heartbeat monitor ([`run`]);
//! - [`config`]: the command-line flags ([`OrchestratorArgs`]).

pub mod allocator;
pub mod autoscaler;
pub mod config;
pub mod discovery;
pub mod kubernetes;
pub mod leadership;
pub mod load;
pub mod registry;
pub mod scaling;
pub mod scaling_backend;
pub mod server;
pub mod service;
mod telemetry;

pub use config::OrchestratorArgs;
pub use server::{Orchestrator, run};

/// The generated gRPC API (`proto/worker_manager.proto`), client and server.
pub mod api {
    tonic::include_proto!("asr.worker_manager.v1");
}
