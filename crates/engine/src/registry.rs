//! The registry: every sandbox and process the daemon knows, in SQLite (WAL)
//! in the data directory, so that they survive daemon restarts. The engine is
//! its only user; nothing here knows about supervisors or HTTP.

use std::path::Path;
use std::sync::Mutex;

use rusqlite::{params, Connection, OptionalExtension};

#[derive(Debug, thiserror::Error)]
#[error("registry: {0}")]
pub struct RegistryError(#[from] rusqlite::Error);

impl RegistryError {
    /// SQLite could not write because the disk is full.
    pub fn is_disk_full(&self) -> bool {
        matches!(&self.0, rusqlite::Error::SqliteFailure(e, _) if e.code == rusqlite::ErrorCode::DiskFull)
    }
}

/// A sandbox as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct SandboxRow {
    pub id: String,
    pub image: String,
    pub cmd: Vec<String>,
    pub env: Vec<(String, String)>,
    pub workdir: Option<String>,
    pub created_at: f64,
    pub timeout: f64,
    pub deadline: f64,
    /// `starting`, `running` or `exited`.
    pub state: String,
    pub exit_code: Option<i32>,
    pub reason: Option<String>,
    pub message: Option<String>,
    pub exited_at: Option<f64>,
    pub limits: gworker_runtime::Limits,
    /// The network policy (rows from before networks existed: blocked).
    pub network: gworker_runtime::net::NetPolicy,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ProcessRow {
    pub sandbox_id: String,
    pub process_id: u32,
    pub cmd: Vec<String>,
    pub started_at: f64,
    pub exit_code: Option<i32>,
}

pub struct Registry {
    conn: Mutex<Connection>,
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS sandboxes (
    id TEXT PRIMARY KEY,
    image TEXT NOT NULL,
    cmd TEXT NOT NULL,
    env TEXT NOT NULL,
    workdir TEXT,
    created_at REAL NOT NULL,
    timeout REAL NOT NULL,
    deadline REAL NOT NULL,
    state TEXT NOT NULL,
    exit_code INTEGER,
    reason TEXT,
    message TEXT,
    exited_at REAL
);
CREATE TABLE IF NOT EXISTS processes (
    sandbox_id TEXT NOT NULL REFERENCES sandboxes(id) ON DELETE CASCADE,
    process_id INTEGER NOT NULL,
    cmd TEXT NOT NULL,
    started_at REAL NOT NULL,
    exit_code INTEGER,
    PRIMARY KEY (sandbox_id, process_id)
);
CREATE TABLE IF NOT EXISTS snapshots (
    id TEXT PRIMARY KEY,
    created_at REAL NOT NULL,
    meta TEXT NOT NULL
);
";

fn json_list(v: &[String]) -> String {
    serde_json::to_string(v).expect("strings serialize")
}

fn row_to_sandbox(r: &rusqlite::Row<'_>) -> rusqlite::Result<SandboxRow> {
    let cmd: String = r.get(2)?;
    let env: String = r.get(3)?;
    Ok(SandboxRow {
        id: r.get(0)?,
        image: r.get(1)?,
        cmd: serde_json::from_str(&cmd).unwrap_or_default(),
        env: serde_json::from_str(&env).unwrap_or_default(),
        workdir: r.get(4)?,
        created_at: r.get(5)?,
        timeout: r.get(6)?,
        deadline: r.get(7)?,
        state: r.get(8)?,
        exit_code: r.get(9)?,
        reason: r.get(10)?,
        message: r.get(11)?,
        exited_at: r.get(12)?,
        limits: r
            .get::<_, Option<String>>(13)?
            .and_then(|l| serde_json::from_str(&l).ok())
            .unwrap_or_default(),
        network: r
            .get::<_, Option<String>>(14)?
            .and_then(|n| serde_json::from_str(&n).ok())
            .unwrap_or_default(),
    })
}

const SANDBOX_COLS: &str =
    "id, image, cmd, env, workdir, created_at, timeout, deadline, state, exit_code, reason, message, exited_at, limits, network";

impl Registry {
    pub fn open(path: &Path) -> Result<Registry, RegistryError> {
        let conn = Connection::open(path)?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        conn.execute_batch(SCHEMA)?;
        // Added after the first release of the schema: ignore "duplicate column".
        let _ = conn.execute("ALTER TABLE sandboxes ADD COLUMN limits TEXT", []);
        let _ = conn.execute("ALTER TABLE sandboxes ADD COLUMN network TEXT", []);
        Ok(Registry {
            conn: Mutex::new(conn),
        })
    }

    fn conn(&self) -> std::sync::MutexGuard<'_, Connection> {
        self.conn.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn insert_sandbox(&self, s: &SandboxRow) -> Result<(), RegistryError> {
        let env = serde_json::to_string(&s.env).expect("env serializes");
        self.conn().execute(
            &format!("INSERT INTO sandboxes ({SANDBOX_COLS}) VALUES (?1,?2,?3,?4,?5,?6,?7,?8,?9,?10,?11,?12,?13,?14,?15)"),
            params![
                s.id, s.image, json_list(&s.cmd), env, s.workdir, s.created_at, s.timeout, s.deadline,
                s.state, s.exit_code, s.reason, s.message, s.exited_at
            , serde_json::to_string(&s.limits).expect("limits serialize")
            , serde_json::to_string(&s.network).expect("network serializes")
            ],
        )?;
        Ok(())
    }

    pub fn get_sandbox(&self, id: &str) -> Result<Option<SandboxRow>, RegistryError> {
        Ok(self
            .conn()
            .prepare_cached(&format!(
                "SELECT {SANDBOX_COLS} FROM sandboxes WHERE id = ?1"
            ))?
            .query_row([id], row_to_sandbox)
            .optional()?)
    }

    pub fn list_sandboxes(&self) -> Result<Vec<SandboxRow>, RegistryError> {
        let conn = self.conn();
        let mut st = conn.prepare_cached(&format!(
            "SELECT {SANDBOX_COLS} FROM sandboxes ORDER BY created_at"
        ))?;
        let rows = st
            .query_map([], row_to_sandbox)?
            .collect::<Result<Vec<_>, _>>()?;
        Ok(rows)
    }

    pub fn set_state(&self, id: &str, state: &str) -> Result<(), RegistryError> {
        self.conn()
            .prepare_cached("UPDATE sandboxes SET state = ?2 WHERE id = ?1 AND state != 'exited'")?
            .execute(params![id, state])?;
        Ok(())
    }

    /// Records the sandbox's end (first writer wins).
    pub fn set_exited(
        &self,
        id: &str,
        exit_code: Option<i32>,
        reason: &str,
        message: Option<&str>,
        exited_at: f64,
    ) -> Result<(), RegistryError> {
        self.conn().execute(
            "UPDATE sandboxes SET state = 'exited', exit_code = ?2, reason = ?3, message = ?4, exited_at = ?5
             WHERE id = ?1 AND state != 'exited'",
            params![id, exit_code, reason, message, exited_at],
        )?;
        Ok(())
    }

    pub fn delete_sandbox(&self, id: &str) -> Result<bool, RegistryError> {
        Ok(self
            .conn()
            .execute("DELETE FROM sandboxes WHERE id = ?1", [id])?
            > 0)
    }

    pub fn upsert_process(&self, p: &ProcessRow) -> Result<(), RegistryError> {
        self.conn()
            .prepare_cached(
                "INSERT INTO processes (sandbox_id, process_id, cmd, started_at, exit_code) VALUES (?1,?2,?3,?4,?5)
                 ON CONFLICT(sandbox_id, process_id) DO UPDATE SET exit_code = COALESCE(processes.exit_code, excluded.exit_code)",
            )?
            .execute(params![p.sandbox_id, p.process_id, json_list(&p.cmd), p.started_at, p.exit_code])?;
        Ok(())
    }

    pub fn set_process_exit(
        &self,
        sandbox_id: &str,
        process_id: u32,
        exit_code: Option<i32>,
    ) -> Result<(), RegistryError> {
        self.conn()
            .prepare_cached(
                "UPDATE processes SET exit_code = COALESCE(exit_code, ?3) WHERE sandbox_id = ?1 AND process_id = ?2",
            )?
            .execute(params![sandbox_id, process_id, exit_code])?;
        Ok(())
    }

    /// Snapshots are stored as their metadata document (JSON).
    pub fn insert_snapshot(
        &self,
        id: &str,
        created_at: f64,
        meta: &str,
    ) -> Result<(), RegistryError> {
        self.conn().execute(
            "INSERT INTO snapshots (id, created_at, meta) VALUES (?1, ?2, ?3)",
            params![id, created_at, meta],
        )?;
        Ok(())
    }

    pub fn get_snapshot(&self, id: &str) -> Result<Option<String>, RegistryError> {
        Ok(self
            .conn()
            .query_row("SELECT meta FROM snapshots WHERE id = ?1", [id], |r| {
                r.get(0)
            })
            .optional()?)
    }

    pub fn list_snapshots(&self) -> Result<Vec<String>, RegistryError> {
        let conn = self.conn();
        let mut st = conn.prepare("SELECT meta FROM snapshots ORDER BY created_at")?;
        let rows = st
            .query_map([], |r| r.get(0))?
            .collect::<Result<Vec<String>, _>>()?;
        Ok(rows)
    }

    pub fn delete_snapshot(&self, id: &str) -> Result<bool, RegistryError> {
        Ok(self
            .conn()
            .execute("DELETE FROM snapshots WHERE id = ?1", [id])?
            > 0)
    }

    /// A process's recorded exit code (`None` while running or unknown).
    pub fn process_exit(
        &self,
        sandbox_id: &str,
        process_id: u32,
    ) -> Result<Option<i32>, RegistryError> {
        Ok(self
            .conn()
            .prepare_cached(
                "SELECT exit_code FROM processes WHERE sandbox_id = ?1 AND process_id = ?2",
            )?
            .query_row(params![sandbox_id, process_id], |r| {
                r.get::<_, Option<i32>>(0)
            })
            .optional()?
            .flatten())
    }

    pub fn processes(&self, sandbox_id: &str) -> Result<Vec<ProcessRow>, RegistryError> {
        let conn = self.conn();
        let mut st = conn.prepare_cached(
            "SELECT sandbox_id, process_id, cmd, started_at, exit_code FROM processes WHERE sandbox_id = ?1 ORDER BY process_id",
        )?;
        let rows = st
            .query_map([sandbox_id], |r| {
                let cmd: String = r.get(2)?;
                Ok(ProcessRow {
                    sandbox_id: r.get(0)?,
                    process_id: r.get(1)?,
                    cmd: serde_json::from_str(&cmd).unwrap_or_default(),
                    started_at: r.get(3)?,
                    exit_code: r.get(4)?,
                })
            })?
            .collect::<Result<Vec<_>, _>>()?;
        Ok(rows)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(id: &str) -> SandboxRow {
        SandboxRow {
            id: id.into(),
            image: "busybox".into(),
            cmd: vec!["echo".into(), "hi".into()],
            env: vec![("A".into(), "1".into())],
            workdir: Some("/w".into()),
            created_at: 1.0,
            timeout: 300.0,
            deadline: 301.0,
            state: "starting".into(),
            exit_code: None,
            reason: None,
            message: None,
            exited_at: None,
            limits: Default::default(),
            network: Default::default(),
        }
    }

    #[test]
    fn sandboxes_and_processes_survive_reopen() {
        let dir = std::env::temp_dir().join(format!("gw-reg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("t.db");
        {
            let r = Registry::open(&path).unwrap();
            r.insert_sandbox(&row("sb-a")).unwrap();
            r.set_state("sb-a", "running").unwrap();
            r.upsert_process(&ProcessRow {
                sandbox_id: "sb-a".into(),
                process_id: 1,
                cmd: vec!["x".into()],
                started_at: 2.0,
                exit_code: None,
            })
            .unwrap();
            r.upsert_process(&ProcessRow {
                sandbox_id: "sb-a".into(),
                process_id: 1,
                cmd: vec!["x".into()],
                started_at: 2.0,
                exit_code: Some(3),
            })
            .unwrap();
            r.set_exited("sb-a", Some(0), "exited", None, 5.0).unwrap();
            // A second end does not overwrite the first.
            r.set_exited("sb-a", Some(137), "timeout", None, 6.0)
                .unwrap();
        }
        let r = Registry::open(&path).unwrap();
        let s = r.get_sandbox("sb-a").unwrap().unwrap();
        assert_eq!(
            (s.state.as_str(), s.exit_code, s.reason.as_deref()),
            ("exited", Some(0), Some("exited"))
        );
        assert_eq!(s.env, vec![("A".to_string(), "1".to_string())]);
        assert_eq!(r.processes("sb-a").unwrap()[0].exit_code, Some(3));
        assert!(r.delete_sandbox("sb-a").unwrap());
        assert!(r.processes("sb-a").unwrap().is_empty());
        assert!(r.get_sandbox("sb-a").unwrap().is_none());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
