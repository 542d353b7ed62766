//! Secrets: named ones stored encrypted in the registry's database, and the
//! resolution of a create request's secrets into environment values.
//!
//! At rest: every stored secret is its JSON map sealed with
//! XChaCha20-Poly1305 (RustCrypto's `chacha20poly1305`), a fresh random
//! 192-bit nonce per write and the secret's name as associated data (a sealed
//! value cannot be moved to another name). The 256-bit key lives in
//! `DATA/secrets.key` (mode 0600), created on first start.
//!
//! In flight: the values of a sandbox's secrets go from here to its
//! supervisor through an inherited pipe (see `spawn_supervisor`), never
//! through a file; they are never logged nor put into an error message.

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;
use std::sync::Mutex;

use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use gworker_api::{self as api, ErrorCode};
use rusqlite::{params, Connection, OptionalExtension};

use crate::{check_env, now, EngineError, Result};

const KEY_FILE: &str = "secrets.key";
const AAD_PREFIX: &[u8] = b"gworker-secret-v1:";

pub struct SecretStore {
    conn: Mutex<Connection>,
    cipher: XChaCha20Poly1305,
    /// Secret environments resolved by `create`, waiting for `start` to hand
    /// them to the sandbox's supervisor (memory only).
    handoff: Mutex<HashMap<String, Vec<(String, String)>>>,
}

fn internal(what: &str) -> impl Fn(rusqlite::Error) -> EngineError + '_ {
    move |e| EngineError::Internal(format!("secrets: {what}: {e}"))
}

/// Names of stored secrets and volumes: safe in paths, URLs and logs.
pub(crate) fn check_name(kind: &str, name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name.as_bytes()[0].is_ascii_alphanumeric()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(EngineError::Invalid(format!(
            "invalid {kind} name {name:?}: use letters, digits, '.', '_' and '-' (at most 64, starting with a letter or digit)"
        )))
    }
}

fn not_found(name: &str) -> EngineError {
    EngineError::NotFound(format!("no secret named {name:?}"))
}

/// Reads the key, creating it (0600) on first start.
fn load_key(data_dir: &Path) -> Result<[u8; 32]> {
    let path = data_dir.join(KEY_FILE);
    let err =
        |e: std::io::Error| EngineError::Internal(format!("secrets key {}: {e}", path.display()));
    match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
    {
        Ok(mut f) => {
            let mut key = [0u8; 32];
            rand::Rng::fill(&mut rand::rngs::OsRng, &mut key);
            f.write_all(&key).map_err(err)?;
            f.sync_all().map_err(err)?;
            if let Ok(d) = std::fs::File::open(data_dir) {
                let _ = d.sync_all();
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(err(e)),
    }
    let meta = std::fs::metadata(&path).map_err(err)?;
    if meta.permissions().mode() & 0o077 != 0 {
        tracing::warn!(path = %path.display(), "secrets key was readable by others; setting mode 0600");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).map_err(err)?;
    }
    let bytes = std::fs::read(&path).map_err(err)?;
    bytes.try_into().map_err(|_| {
        EngineError::Internal(format!(
            "secrets key {} is not 32 bytes: restore it from a backup (stored secrets cannot be read without it)",
            path.display()
        ))
    })
}

impl SecretStore {
    pub fn open(data_dir: &Path) -> Result<SecretStore> {
        let key = load_key(data_dir)?;
        let conn = Connection::open(data_dir.join("gworker.db")).map_err(internal("open"))?;
        conn.busy_timeout(std::time::Duration::from_secs(5))
            .map_err(internal("open"))?;
        conn.execute_batch(
            "CREATE TABLE IF NOT EXISTS secrets (
                name TEXT PRIMARY KEY,
                created_at REAL NOT NULL,
                nonce BLOB NOT NULL,
                sealed BLOB NOT NULL
            );",
        )
        .map_err(internal("schema"))?;
        Ok(SecretStore {
            conn: Mutex::new(conn),
            cipher: XChaCha20Poly1305::new(&key.into()),
            handoff: Mutex::new(HashMap::new()),
        })
    }

    fn conn(&self) -> std::sync::MutexGuard<'_, Connection> {
        self.conn.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn aad(name: &str) -> Vec<u8> {
        [AAD_PREFIX, name.as_bytes()].concat()
    }

    pub fn create(&self, req: api::CreateSecret) -> Result<api::SecretInfo> {
        check_name("secret", &req.name)?;
        if req.values.is_empty() {
            return Err(EngineError::Invalid(
                "a secret needs at least one value".into(),
            ));
        }
        check_env(&req.values)?;
        let plain = serde_json::to_vec(&req.values).expect("map serializes");
        let mut nonce = [0u8; 24];
        rand::Rng::fill(&mut rand::rngs::OsRng, &mut nonce);
        let sealed = self
            .cipher
            .encrypt(
                XNonce::from_slice(&nonce),
                Payload {
                    msg: &plain,
                    aad: &Self::aad(&req.name),
                },
            )
            .map_err(|_| EngineError::Internal("cannot encrypt the secret".into()))?;
        let created_at = now();
        let conn = self.conn();
        let sql = if req.overwrite {
            "INSERT OR REPLACE INTO secrets (name, created_at, nonce, sealed) VALUES (?1, ?2, ?3, ?4)"
        } else {
            "INSERT INTO secrets (name, created_at, nonce, sealed) VALUES (?1, ?2, ?3, ?4)"
        };
        match conn.execute(sql, params![req.name, created_at, &nonce[..], sealed]) {
            Ok(_) => Ok(api::SecretInfo {
                name: req.name,
                created_at,
            }),
            Err(rusqlite::Error::SqliteFailure(e, _))
                if e.code == rusqlite::ErrorCode::ConstraintViolation =>
            {
                Err(EngineError::Coded {
                    code: ErrorCode::Conflict,
                    message: format!(
                        "a secret named {:?} exists already (delete it first, or overwrite it)",
                        req.name
                    ),
                })
            }
            Err(e) => Err(internal("insert")(e)),
        }
    }

    pub fn list(&self) -> Result<Vec<api::SecretInfo>> {
        let conn = self.conn();
        let mut st = conn
            .prepare("SELECT name, created_at FROM secrets ORDER BY name")
            .map_err(internal("list"))?;
        let rows = st
            .query_map([], |r| {
                Ok(api::SecretInfo {
                    name: r.get(0)?,
                    created_at: r.get(1)?,
                })
            })
            .map_err(internal("list"))?;
        rows.collect::<rusqlite::Result<Vec<_>>>()
            .map_err(internal("list"))
    }

    pub fn info(&self, name: &str) -> Result<api::SecretInfo> {
        check_name("secret", name).map_err(|_| not_found(name))?;
        self.list()?
            .into_iter()
            .find(|s| s.name == name)
            .ok_or_else(|| not_found(name))
    }

    pub fn delete(&self, name: &str) -> Result<()> {
        check_name("secret", name).map_err(|_| not_found(name))?;
        let n = self
            .conn()
            .execute("DELETE FROM secrets WHERE name = ?1", params![name])
            .map_err(internal("delete"))?;
        if n == 0 {
            return Err(not_found(name));
        }
        Ok(())
    }

    /// The values of a stored secret.
    fn values(&self, name: &str) -> Result<BTreeMap<String, String>> {
        check_name("secret", name).map_err(|_| not_found(name))?;
        let row: Option<(Vec<u8>, Vec<u8>)> = self
            .conn()
            .query_row(
                "SELECT nonce, sealed FROM secrets WHERE name = ?1",
                params![name],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()
            .map_err(internal("read"))?;
        let (nonce, sealed) = row.ok_or_else(|| not_found(name))?;
        if nonce.len() != 24 {
            return Err(EngineError::Internal(format!("secret {name:?}: bad nonce")));
        }
        let plain = self
            .cipher
            .decrypt(
                XNonce::from_slice(&nonce),
                Payload {
                    msg: &sealed,
                    aad: &Self::aad(name),
                },
            )
            .map_err(|_| {
                EngineError::Internal(format!(
                    "secret {name:?} cannot be decrypted: the data directory's secrets.key is not the one it was stored with"
                ))
            })?;
        serde_json::from_slice(&plain)
            .map_err(|_| EngineError::Internal(format!("secret {name:?}: malformed")))
    }

    /// A create request's secrets as one ordered list of `(name, value)`;
    /// later entries win. Unknown names are `NotFound`.
    pub fn resolve(&self, refs: &[api::SecretRef]) -> Result<Vec<(String, String)>> {
        let mut out = Vec::new();
        for (i, r) in refs.iter().enumerate() {
            match (&r.name, &r.values) {
                (Some(name), None) => out.extend(self.values(name)?),
                (None, Some(values)) => {
                    check_env(values)?;
                    out.extend(values.iter().map(|(k, v)| (k.clone(), v.clone())));
                }
                _ => {
                    return Err(EngineError::Invalid(format!(
                        "secrets[{i}] must have exactly one of `name` or `values`"
                    )))
                }
            }
        }
        Ok(out)
    }

    pub(crate) fn stash(&self, sandbox_id: &str, env: Vec<(String, String)>) {
        if !env.is_empty() {
            self.handoff
                .lock()
                .unwrap()
                .insert(sandbox_id.to_string(), env);
        }
    }

    pub(crate) fn take(&self, sandbox_id: &str) -> Option<Vec<(String, String)>> {
        self.handoff.lock().unwrap().remove(sandbox_id)
    }
}

/// A pipe (read end, write end), both close-on-exec and numbered at least
/// `min` (so that moving the read end to a low fd clobbers nothing).
pub(crate) fn pipe_above(min: i32) -> std::io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: fds has room for two descriptors.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fresh fds, owned here.
    let (r, w) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    let high = |fd: OwnedFd| -> std::io::Result<OwnedFd> {
        // SAFETY: valid fd; the duplicate is owned by the result.
        let d = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_DUPFD_CLOEXEC, min) };
        if d < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: fresh fd.
        Ok(unsafe { OwnedFd::from_raw_fd(d) })
    };
    Ok((high(r)?, high(w)?))
}

/// Writes a sandbox's secret environment to its supervisor's pipe.
pub(crate) fn send(wr: OwnedFd, env: &[(String, String)]) -> std::io::Result<()> {
    let mut buf = serde_json::to_vec(env).expect("strings serialize");
    let res = std::fs::File::from(wr).write_all(&buf);
    buf.iter_mut().for_each(|b| *b = 0);
    res
}

impl crate::Engine {
    /// The stored secrets.
    pub fn secrets(&self) -> &SecretStore {
        &self.secrets
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store() -> (SecretStore, std::path::PathBuf) {
        let dir = std::env::temp_dir().join(format!(
            "gw-secrets-{}-{}",
            std::process::id(),
            rand::random::<u32>()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        (SecretStore::open(&dir).unwrap(), dir)
    }

    #[test]
    fn stored_secrets_are_sealed_and_listed_by_name_only() {
        let (s, dir) = store();
        let mut values = BTreeMap::new();
        values.insert("TOKEN".to_string(), "hunter2-plaintext-marker".to_string());
        s.create(api::CreateSecret {
            name: "db".into(),
            values: values.clone(),
            overwrite: false,
        })
        .unwrap();
        let again = s.create(api::CreateSecret {
            name: "db".into(),
            values: values.clone(),
            overwrite: false,
        });
        assert_eq!(again.unwrap_err().code(), ErrorCode::Conflict);
        assert_eq!(s.list().unwrap()[0].name, "db");
        let env = s
            .resolve(&[
                api::SecretRef {
                    name: Some("db".into()),
                    values: None,
                },
                api::SecretRef {
                    name: None,
                    values: Some([("X".to_string(), "1".to_string())].into()),
                },
            ])
            .unwrap();
        assert_eq!(
            env,
            [
                ("TOKEN".to_string(), "hunter2-plaintext-marker".to_string()),
                ("X".to_string(), "1".to_string())
            ]
        );
        let unknown = s.resolve(&[api::SecretRef {
            name: Some("nope".into()),
            values: None,
        }]);
        assert_eq!(unknown.unwrap_err().code(), ErrorCode::NotFound);
        drop(s);
        for f in std::fs::read_dir(&dir).unwrap() {
            let b = std::fs::read(f.unwrap().path()).unwrap();
            assert!(!b
                .windows(b"hunter2-plaintext-marker".len())
                .any(|w| w == b"hunter2-plaintext-marker"));
        }
        let mode = std::fs::metadata(dir.join(KEY_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let s = SecretStore::open(&dir).unwrap();
        s.delete("db").unwrap();
        assert_eq!(s.delete("db").unwrap_err().code(), ErrorCode::NotFound);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
