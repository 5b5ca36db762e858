//! Test support shared by the workspace's tests (never linked into a release binary).
//!
//! - [`speech`]: real English speech synthesised with espeak-ng and converted by sox;
//! - [`wer`]: word error rate between a reference and a hypothesis (`client::words`);
//! - [`system`]: runs the pipeline's roles as separate OS processes of the built `asr`
//!   binary, each test in a namespace (streams, Redis keys) and on ports of its own;
//! - [`failover`]: driving a session through recognizer failures (stream and watch it,
//!   who holds it, kill moments inside speech, the no-failure reference, its results
//!   read back from the log), for the failover tests and benchmarks;
//! - [`serial`]: one-at-a-time execution for tests that spawn processes or load the model;
//! - [`proxy`]: a TCP proxy whose connections a test cuts, for dropped connections;
//! - [`synthetic`]: sessions written straight to the streams, for the projector.

pub mod failover;
pub mod proxy;
pub mod serial;
pub mod speech;
pub mod synthetic;
pub mod system;
pub use client::words as wer;

/// Makes `url` the orchestrator leader of `namespace`, the way an elected replica
/// announces itself, so that a test's fake orchestrator is found by the real clients.
/// The key expires after ten minutes, longer than any test, so none is left behind.
pub async fn announce_fake_leader(redis_url: &str, namespace: &str, url: &str) {
    let lock = orchestrator::leadership::Leader {
        token: 1,
        replica: "fake".into(),
        url: url.into(),
    };
    let mut redis = redis::Client::open(redis_url)
        .expect("redis url")
        .get_multiplexed_async_connection()
        .await
        .expect("redis connection");
    let _: () = redis::cmd("SET")
        .arg(orchestrator::leadership::leader_key(namespace))
        .arg(lock.value())
        .arg("PX")
        .arg(600_000)
        .query_async(&mut redis)
        .await
        .expect("SET leader");
}

/// A TCP port that was free a moment ago on 127.0.0.1.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("an ephemeral port")
}
