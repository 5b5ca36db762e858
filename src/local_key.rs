//! The local tenant's API key on a one-machine setup. `asr up` creates it once, in a
//! keys file in the state folder that its ingest serves from; `asr transcribe` finds it
//! there when it is given no key. Other tenants can be added to the same file
//! (`tenant key` per line); ingest reads it when it starts.
//!
//! Beside it, the secret ingest signs resume tokens with: kept in the state folder, it
//! outlives a restart of the whole system, so clients resume across one.

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
        let secret = random_hex::<24>();
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

    pub fn resume_secret_file(&self) -> PathBuf {
        self.dir.join("resume-secret")
    }

    /// The resume-token secret, created (readable by this user only) if there is none.
    pub fn ensure_resume_secret(&self) -> anyhow::Result<String> {
        let path = self.resume_secret_file();
        match std::fs::read_to_string(&path) {
            Ok(secret) if !secret.trim().is_empty() => return Ok(secret.trim().to_string()),
            Ok(_) => anyhow::bail!("{} is empty: delete it and start again", path.display()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        }
        std::fs::create_dir_all(&self.dir)
            .with_context(|| format!("creating the state folder {}", self.dir.display()))?;
        let secret = random_hex::<32>();
        let mut file = open_private(&path)
            .with_context(|| format!("creating the resume secret {}", path.display()))?;
        writeln!(file, "{secret}")?;
        Ok(secret)
    }

    /// The key to present: `given` (a flag or the environment), else the local key,
    /// else none (said on stderr, with where a key would come from).
    pub fn key_or_local(&self, given: Option<String>) -> anyhow::Result<Option<String>> {
        if given.is_some() {
            return Ok(given);
        }
        let local = self.local_key()?;
        if local.is_none() {
            eprintln!(
                "no API key: none given (--api-key, ASR_API_KEY) and none in {} (`asr up` writes one there); trying without",
                self.keys_file().display()
            );
        }
        Ok(local)
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

/// `N` random bytes in hex.
fn random_hex<const N: usize>() -> String {
    rand::random::<[u8; N]>()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
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

        // The resume secret too: created once, privately, then the same.
        let secret = state.ensure_resume_secret().unwrap();
        assert_eq!(secret.len(), 64);
        assert_eq!(state.ensure_resume_secret().unwrap(), secret);
        let mode = std::fs::metadata(state.resume_secret_file())
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        std::fs::remove_dir_all(&state.dir).unwrap();
    }
}
