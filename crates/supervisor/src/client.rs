//! The daemon's side of the supervisor socket. Each call is one short-lived
//! connection, so a daemon restart or a supervisor that went away never leaves
//! a half-used channel behind.

use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

use crate::wire::*;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The supervisor is not there (it ended, or never started).
    #[error("supervisor unreachable: {0}")]
    Unreachable(std::io::Error),
    /// The supervisor answered with an error.
    #[error("{}", .0.message)]
    Sup(SupError),
    #[error("supervisor protocol error: {0}")]
    Protocol(String),
}

#[derive(Debug, Clone)]
pub struct SupClient {
    sock: PathBuf,
}

impl SupClient {
    pub fn new(sock: impl Into<PathBuf>) -> SupClient {
        SupClient { sock: sock.into() }
    }

    pub fn socket(&self) -> &Path {
        &self.sock
    }

    async fn open(&self, req: &Request) -> Result<BufReader<UnixStream>, ClientError> {
        let mut conn = UnixStream::connect(&self.sock)
            .await
            .map_err(ClientError::Unreachable)?;
        let mut line = serde_json::to_vec(req).expect("request serializes");
        line.push(b'\n');
        conn.write_all(&line)
            .await
            .map_err(ClientError::Unreachable)?;
        Ok(BufReader::new(conn))
    }

    async fn answer(conn: &mut BufReader<UnixStream>) -> Result<serde_json::Value, ClientError> {
        let mut line = String::new();
        let n = conn
            .read_line(&mut line)
            .await
            .map_err(ClientError::Unreachable)?;
        if n == 0 {
            return Err(ClientError::Unreachable(
                std::io::ErrorKind::UnexpectedEof.into(),
            ));
        }
        match serde_json::from_str::<Answer>(&line) {
            Ok(Answer::Ok(v)) => Ok(v),
            Ok(Answer::Err(e)) => Err(ClientError::Sup(e)),
            Err(e) => Err(ClientError::Protocol(e.to_string())),
        }
    }

    async fn call(&self, req: &Request) -> Result<serde_json::Value, ClientError> {
        let mut conn = self.open(req).await?;
        Self::answer(&mut conn).await
    }

    fn parse<T: serde::de::DeserializeOwned>(v: serde_json::Value) -> Result<T, ClientError> {
        serde_json::from_value(v).map_err(|e| ClientError::Protocol(e.to_string()))
    }

    pub async fn status(&self) -> Result<Status, ClientError> {
        Self::parse(self.call(&Request::Status).await?)
    }

    /// Starts a process; returns its process id.
    pub async fn spawn(&self, spec: ProcSpec) -> Result<u32, ClientError> {
        let v = self.call(&Request::Spawn { spec }).await?;
        v.get("id")
            .and_then(|v| v.as_u64())
            .map(|v| v as u32)
            .ok_or_else(|| ClientError::Protocol("spawn answer without id".into()))
    }

    /// Waits for process `id` (the sandbox when `None`). `Ok(None)` when the
    /// timeout elapsed first; `Ok(Some(None))` when the sandbox ended without
    /// an exit code (it never started).
    pub async fn wait(
        &self,
        id: Option<u32>,
        timeout: Duration,
    ) -> Result<Option<Option<i32>>, ClientError> {
        let req = Request::Wait {
            id,
            timeout_ms: timeout.as_millis() as u64,
        };
        match self.call(&req).await {
            Ok(v) => Ok(Some(
                v.get("exit_code")
                    .and_then(|c| c.as_i64())
                    .map(|c| c as i32),
            )),
            Err(ClientError::Sup(e)) if e.code == "wait_timeout" => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Opens a stream of a process's output from `offset`.
    pub async fn read(
        &self,
        id: u32,
        stream: StreamName,
        offset: u64,
    ) -> Result<OutputReader, ClientError> {
        let mut conn = self.open(&Request::Read { id, stream, offset }).await?;
        Self::answer(&mut conn).await?;
        Ok(OutputReader { conn })
    }

    pub async fn stdin(&self, id: u32, data: &[u8]) -> Result<(), ClientError> {
        let mut conn = self
            .open(&Request::Stdin {
                id,
                len: data.len() as u64,
            })
            .await?;
        conn.get_mut()
            .write_all(data)
            .await
            .map_err(ClientError::Unreachable)?;
        Self::answer(&mut conn).await.map(|_| ())
    }

    pub async fn stdin_close(&self, id: u32) -> Result<(), ClientError> {
        self.call(&Request::StdinClose { id }).await.map(|_| ())
    }

    pub async fn signal(&self, id: u32, signo: i32) -> Result<(), ClientError> {
        self.call(&Request::Signal { id, signo }).await.map(|_| ())
    }

    pub async fn kill(&self, reason: &str) -> Result<(), ClientError> {
        self.call(&Request::Kill {
            reason: reason.to_string(),
        })
        .await
        .map(|_| ())
    }

    /// Hands a warm-pool sandbox to its user (see `Request::Claim`).
    pub async fn claim(
        &self,
        entry: Option<ProcSpec>,
        deadline: f64,
        limits: gworker_runtime::Limits,
    ) -> Result<(), ClientError> {
        self.call(&Request::Claim {
            entry,
            deadline,
            limits,
        })
        .await
        .map(|_| ())
    }

    /// Takes a memory checkpoint into `image_path`; the sandbox goes on.
    pub async fn checkpoint(&self, image_path: &Path) -> Result<CheckpointInfo, ClientError> {
        Self::parse(
            self.call(&Request::Checkpoint {
                image_path: image_path.to_path_buf(),
            })
            .await?,
        )
    }

    pub async fn shutdown(&self) -> Result<(), ClientError> {
        self.call(&Request::Shutdown).await.map(|_| ())
    }
}

/// Chunks of one output stream, as the supervisor sends them.
pub struct OutputReader {
    conn: BufReader<UnixStream>,
}

impl OutputReader {
    /// The next chunk; `Ok(None)` when the stream ended cleanly, an error when
    /// the connection broke (the caller may resume from its offset).
    pub async fn next_chunk(&mut self) -> Result<Option<Bytes>, ClientError> {
        let mut len = [0u8; 4];
        self.conn
            .read_exact(&mut len)
            .await
            .map_err(ClientError::Unreachable)?;
        let n = u32::from_le_bytes(len) as usize;
        if n == 0 {
            return Ok(None);
        }
        let mut buf = vec![0u8; n];
        self.conn
            .read_exact(&mut buf)
            .await
            .map_err(ClientError::Unreachable)?;
        Ok(Some(Bytes::from(buf)))
    }
}
