//! Test support shared by the workspace's tests (never linked into a release binary).
//!
//! - [`speech`]: real English speech synthesised with espeak-ng and converted by sox;
//! - [`wer`]: word error rate between a reference and a hypothesis;
//! - [`system`]: runs the pipeline's roles as separate OS processes of the built `asr`
//!   binary, each test in a namespace (streams, Redis keys) and on ports of its own;
//! - [`serial`]: one-at-a-time execution for tests that spawn processes or load the model.

pub mod serial;
pub mod speech;
pub mod system;
pub mod wer;

/// A TCP port that was free a moment ago on 127.0.0.1.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("an ephemeral port")
}
