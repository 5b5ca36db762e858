//! The local tenant's API key on a one-machine setup. `asr up` creates it once, in a
//! keys file in the state folder that its ingest serves from; `asr transcribe` finds it
//! there when it is given no key. Other tenants can be added to the same file
//! (`tenant key` per line); ingest reads it when it starts.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::Args;
use ingest::tenants::{ApiKey, ApiKeys};

/// The tenant `asr up` creates a key for.
pub const LOCAL_TENANT: &str = "local";

#[derive(Args, Clone, Debug)]
pub struct StateDir {
    /// Where `asr up` keeps the local API keys file (`api-keys`).
    #[arg(long = "state-dir", env = "ASR_STATE_DIR", default_value_os_t = default_state_dir())]
    pub dir: PathBuf,
}

/// `$XDG_STATE_HOME/asr`, else `~/.local/state/asr`, else `.asr-state` here.
fn default_state_dir() -> PathBuf {
    let state_home = std::env::var_os("XDG_STATE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/state")));
    match state_home {
        Some(dir) => dir.join("asr"),
        None => PathBuf::from(".asr-state"),
    }
}

impl StateDir {
    pub fn keys_file(&self) -> PathBuf {
        self.dir.join("api-keys")
    }

    /// The keys file, with a key for [`LOCAL_TENANT`] created (readable by this user
    /// only) if the file does not exist yet.
    pub fn ensure_local_key(&self) -> anyhow::Result<PathBuf> {
        let path = self.keys_file();
        if path.exists() {
            return Ok(path);
        }
        std::fs::create_dir_all(&self.dir)
            .with_context(|| format!("creating the state folder {}", self.dir.display()))?;
        let secret: String = rand::random::<[u8; 24]>()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        let key = ApiKey::new(LOCAL_TENANT, secret).expect("a 48-digit hex key is valid");
        let mut file = open_private(&path)
            .with_context(|| format!("creating the API keys file {}", path.display()))?;
        writeln!(
            file,
            "# API keys of this machine's asr: `tenant key` per line. Created by `asr up`.\n{} {}",
            key.tenant,
            key.secret()
        )?;
        tracing::info!(file = %path.display(), tenant = LOCAL_TENANT, "created a local API key");
        Ok(path)
    }

    /// The local tenant's key, if `asr up` created one here.
    pub fn local_key(&self) -> anyhow::Result<Option<String>> {
        let path = self.keys_file();
        let text = match std::fs::read_to_string(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        };
        let keys = ApiKeys::parse_file(&text, &path)?;
        Ok(keys
            .into_iter()
            .find(|k| k.tenant == LOCAL_TENANT)
            .map(|k| k.secret().to_string()))
    }
}

fn open_private(path: &Path) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_local_key_is_created_once_privately_and_found_again() {
        use std::os::unix::fs::PermissionsExt;
        let state = StateDir {
            dir: std::env::temp_dir().join(format!("asr-state-{}", uuid::Uuid::new_v4())),
        };
        assert_eq!(state.local_key().unwrap(), None);
        let path = state.ensure_local_key().unwrap();
        let key = state.local_key().unwrap().expect("a local key");
        assert_eq!(key.len(), 48);
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        // Idempotent: the key stays what it was.
        state.ensure_local_key().unwrap();
        assert_eq!(state.local_key().unwrap(), Some(key.clone()));
        // And ingest reads the same file.
        let keys = ApiKeys::new(
            ApiKeys::parse_file(&std::fs::read_to_string(&path).unwrap(), &path).unwrap(),
            false,
        )
        .unwrap();
        assert_eq!(keys.authenticate(Some(&key)), Ok(LOCAL_TENANT.into()));
        std::fs::remove_dir_all(&state.dir).unwrap();
    }
}
