//! Tenants and their API keys (pure): which tenant a key presented at `open` names.
//!
//! Keys come from a file (`tenant key` per line) or a list (`tenant=key,...`), see
//! [`crate::config::IngestArgs`]. A key is compared with every configured key in
//! constant time (`subtle`), so the time an answer takes says nothing about how much of
//! a guess was right; and no key is ever printed: [`ApiKey`]'s `Debug` hides it, and a
//! refusal says only that the key was missing or unknown.

use std::fmt;
use std::path::Path;
use std::str::FromStr;

use subtle::ConstantTimeEq;
use thiserror::Error;

/// The tenant of sessions opened without a key, when the node allows that.
pub const ANONYMOUS_TENANT: &str = "anonymous";

/// A tenant name: what sessions, audit and resume are scoped to.
pub type Tenant = String;

/// One tenant's key.
#[derive(Clone, PartialEq, Eq)]
pub struct ApiKey {
    pub tenant: Tenant,
    key: String,
}

impl ApiKey {
    /// Shortest key accepted: a key is a bearer secret, not a password to remember.
    pub const MIN_LEN: usize = 16;

    pub fn new(tenant: impl Into<String>, key: impl Into<String>) -> Result<Self, KeyError> {
        let (tenant, key) = (tenant.into(), key.into());
        let valid_name = |c: char| c.is_ascii_alphanumeric() || "-_.".contains(c);
        if tenant.is_empty() || !tenant.chars().all(valid_name) {
            return Err(KeyError::BadTenant(tenant));
        }
        if key.len() < Self::MIN_LEN || key.chars().any(|c| c.is_whitespace() || c == ',') {
            return Err(KeyError::BadKey { tenant });
        }
        Ok(Self { tenant, key })
    }

    /// The secret itself, for a client to present.
    pub fn secret(&self) -> &str {
        &self.key
    }
}

impl fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ApiKey({}, <hidden>)", self.tenant)
    }
}

/// `tenant=key`, as `--api-keys` takes them.
impl FromStr for ApiKey {
    type Err = KeyError;

    fn from_str(entry: &str) -> Result<Self, KeyError> {
        let (tenant, key) = entry.split_once('=').ok_or(KeyError::NotAnEntry)?;
        ApiKey::new(tenant.trim(), key.trim())
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Error)]
pub enum KeyError {
    #[error("an API key entry is `tenant=key` (in a file: `tenant key` per line)")]
    NotAnEntry,
    #[error("tenant name {0:?}: use letters, digits, '-', '_' or '.'")]
    BadTenant(String),
    #[error(
        "the key of tenant {tenant:?} is too short or has spaces or commas: use at least 16 characters (for instance `openssl rand -hex 24`)"
    )]
    BadKey { tenant: String },
    #[error("API keys file {path}, line {line}: {error}")]
    InFile {
        path: String,
        line: usize,
        error: Box<KeyError>,
    },
    #[error("cannot read the API keys file {path}: {message}")]
    Unreadable { path: String, message: String },
    #[error("tenant {0:?} has more than one key entry with the same key")]
    Duplicate(String),
}

/// Where a service finds its tenants' keys: flags with environment fallbacks, shared
/// by every service that authenticates tenants (ingest, the audit API).
#[derive(clap::Args, Clone, Debug, Default, PartialEq, Eq)]
pub struct KeyArgs {
    /// A file of API keys, one `tenant key` per line (`#` comments). `asr up` writes
    /// one for the local tenant.
    #[arg(long, env = "ASR_API_KEYS_FILE")]
    pub api_keys_file: Option<std::path::PathBuf>,
    /// API keys as `tenant=key`, comma-separated (in addition to the file).
    #[arg(
        long,
        env = "ASR_API_KEYS",
        value_delimiter = ',',
        hide_env_values = true
    )]
    pub api_keys: Vec<ApiKey>,
    /// Also serve clients that show no key, as the tenant `anonymous` (a trusted
    /// network only).
    #[arg(long, env = "ASR_ALLOW_ANONYMOUS")]
    pub allow_anonymous: bool,
}

impl KeyArgs {
    /// The keys of `--api-keys-file` and `--api-keys`.
    pub fn load(&self) -> Result<ApiKeys, KeyError> {
        let mut keys = self.api_keys.clone();
        if let Some(path) = &self.api_keys_file {
            let text = std::fs::read_to_string(path).map_err(|e| KeyError::Unreadable {
                path: path.display().to_string(),
                message: e.to_string(),
            })?;
            keys.extend(ApiKeys::parse_file(&text, path)?);
        }
        ApiKeys::new(keys, self.allow_anonymous)
    }
}

/// The keys a node accepts, and whether sessions without one are allowed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ApiKeys {
    keys: Vec<ApiKey>,
    allow_anonymous: bool,
}

/// Why a session was refused: deliberately without detail.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Unauthorized;

impl ApiKeys {
    pub fn new(keys: Vec<ApiKey>, allow_anonymous: bool) -> Result<Self, KeyError> {
        for (i, a) in keys.iter().enumerate() {
            if keys[..i].iter().any(|b| b.key == a.key) {
                return Err(KeyError::Duplicate(a.tenant.clone()));
            }
        }
        Ok(Self {
            keys,
            allow_anonymous,
        })
    }

    /// Reads `tenant key` lines; blank lines and `#` comments are skipped.
    pub fn parse_file(text: &str, path: &Path) -> Result<Vec<ApiKey>, KeyError> {
        let mut keys = Vec::new();
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let in_file = |error| KeyError::InFile {
                path: path.display().to_string(),
                line: i + 1,
                error: Box::new(error),
            };
            let mut fields = line.split_whitespace();
            let (Some(tenant), Some(key), None) = (fields.next(), fields.next(), fields.next())
            else {
                return Err(in_file(KeyError::NotAnEntry));
            };
            keys.push(ApiKey::new(tenant, key).map_err(in_file)?);
        }
        Ok(keys)
    }

    /// True when no key is configured and sessions without one are not allowed either:
    /// nobody could open a session.
    pub fn locks_everyone_out(&self) -> bool {
        self.keys.is_empty() && !self.allow_anonymous
    }

    pub fn tenants(&self) -> usize {
        self.keys.len()
    }

    /// The tenant `presented` names. Every configured key is compared, in constant
    /// time, whatever matched before.
    pub fn authenticate(&self, presented: Option<&str>) -> Result<Tenant, Unauthorized> {
        let Some(presented) = presented else {
            return if self.allow_anonymous {
                Ok(ANONYMOUS_TENANT.into())
            } else {
                Err(Unauthorized)
            };
        };
        let mut found: Option<&ApiKey> = None;
        for key in &self.keys {
            if bool::from(key.key.as_bytes().ct_eq(presented.as_bytes())) {
                found = Some(key);
            }
        }
        found.map(|k| k.tenant.clone()).ok_or(Unauthorized)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(tenant: &str, key: &str) -> ApiKey {
        ApiKey::new(tenant, key).unwrap()
    }

    fn keys() -> ApiKeys {
        ApiKeys::new(
            vec![
                key("north", "north-key-0123456789"),
                key("south", "south-key-0123456789"),
            ],
            false,
        )
        .unwrap()
    }

    #[test]
    fn a_key_names_its_tenant_and_nothing_else_does() {
        let keys = keys();
        assert_eq!(
            keys.authenticate(Some("south-key-0123456789")),
            Ok("south".into())
        );
        assert_eq!(
            keys.authenticate(Some("north-key-0123456789")),
            Ok("north".into())
        );
        for wrong in [
            "",
            "north",
            "north-key-012345678",
            "north-key-01234567890",
            "south",
        ] {
            assert_eq!(
                keys.authenticate(Some(wrong)),
                Err(Unauthorized),
                "{wrong:?}"
            );
        }
        assert_eq!(keys.authenticate(None), Err(Unauthorized));
        assert!(!keys.locks_everyone_out());
    }

    #[test]
    fn anonymous_sessions_only_when_allowed() {
        let open = ApiKeys::new(Vec::new(), true).unwrap();
        assert_eq!(open.authenticate(None), Ok(ANONYMOUS_TENANT.into()));
        assert_eq!(
            open.authenticate(Some("anything-at-all-here")),
            Err(Unauthorized)
        );
        assert!(
            ApiKeys::new(Vec::new(), false)
                .unwrap()
                .locks_everyone_out()
        );
    }

    #[test]
    fn keys_parse_from_entries_and_files() {
        assert_eq!(
            "a=0123456789abcdef".parse::<ApiKey>(),
            Ok(key("a", "0123456789abcdef"))
        );
        assert_eq!(
            "a:0123456789abcdef".parse::<ApiKey>(),
            Err(KeyError::NotAnEntry)
        );
        assert!(matches!(
            "a=short".parse::<ApiKey>(),
            Err(KeyError::BadKey { .. })
        ));
        assert!(matches!(
            "a b=0123456789abcdef".parse::<ApiKey>(),
            Err(KeyError::BadTenant(_))
        ));
        let file = "# tenants\n\nnorth north-key-0123456789\n  south   south-key-0123456789  \n";
        let parsed = ApiKeys::parse_file(file, Path::new("keys")).unwrap();
        assert_eq!(
            parsed,
            vec![
                key("north", "north-key-0123456789"),
                key("south", "south-key-0123456789")
            ]
        );
        let bad = ApiKeys::parse_file("north\n", Path::new("keys")).unwrap_err();
        assert_eq!(
            bad.to_string(),
            "API keys file keys, line 1: an API key entry is `tenant=key` (in a file: `tenant key` per line)"
        );
    }

    #[test]
    fn a_key_shared_by_two_tenants_is_refused() {
        let shared = ApiKeys::new(
            vec![
                key("a", "same-key-0123456789"),
                key("b", "same-key-0123456789"),
            ],
            false,
        );
        assert_eq!(shared, Err(KeyError::Duplicate("b".into())));
    }

    #[test]
    fn keys_never_show_in_debug_output() {
        let keys = keys();
        let shown = format!("{keys:?} {:?}", key("t", "secret-secret-secret"));
        assert!(!shown.contains("key-0123456789"), "{shown}");
        assert!(!shown.contains("secret-secret"), "{shown}");
        assert!(shown.contains("north"));
    }
}
