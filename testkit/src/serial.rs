//! Tests that spawn the system's processes or load the model share two cores: they take
//! this machine-wide lock (a lock file, so it also serialises separate test binaries).

use std::fs::File;

use nix::fcntl::{Flock, FlockArg};

/// Held for the duration of a heavy test.
pub struct HeavyTest {
    _lock: Flock<File>,
}

/// Blocks until no other heavy test runs on this machine.
pub fn heavy() -> HeavyTest {
    let path = std::env::temp_dir().join("asr-heavy-tests.lock");
    let file = File::create(&path).expect("lock file in the temp dir");
    let lock = Flock::lock(file, FlockArg::LockExclusive)
        .map_err(|(_, e)| e)
        .expect("flock");
    HeavyTest { _lock: lock }
}
