//! The daemon's side of the supervisor socket. A call sends one request line
//! and reads one answer line; its connection is kept for the next call (at
//! most [`IDLE_CONNS`] per supervisor), which saves a connect and an accept
//! (with their epoll registrations) on both sides of every exec and wait.
//! An output stream's connection is kept too once the stream ended cleanly;
//! stdin writes get a connection of their own. A kept
//! connection is only ever reused after its answer was read in full, so a
//! call dropped midway (its HTTP client went away) takes its connection
//! with it.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
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

/// Idle connections kept per supervisor.
const IDLE_CONNS: usize = 2;

#[derive(Debug, Clone)]
pub struct SupClient {
    sock: PathBuf,
    idle: Arc<Mutex<Vec<BufReader<UnixStream>>>>,
}

impl SupClient {
    pub fn new(sock: impl Into<PathBuf>) -> SupClient {
        SupClient {
            sock: sock.into(),
            idle: Arc::default(),
        }
    }

    pub fn socket(&self) -> &Path {
        &self.sock
    }

    /// A fresh connection with `line` (a request line) sent on it.
    async fn open(&self, line: &[u8]) -> Result<BufReader<UnixStream>, ClientError> {
        let mut conn = UnixStream::connect(&self.sock)
            .await
            .map_err(ClientError::Unreachable)?;
        conn.write_all(line)
            .await
            .map_err(ClientError::Unreachable)?;
        Ok(BufReader::new(conn))
    }

    fn line(req: &Request) -> Vec<u8> {
        let mut line = serde_json::to_vec(req).expect("request serializes");
        line.push(b'\n');
        line
    }

    async fn read_answer(
        conn: &mut BufReader<UnixStream>,
    ) -> Result<serde_json::Value, ClientError> {
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
        let (conn, answered) = self.request(req).await?;
        self.keep(conn, answered)
    }

    /// Sends `req` on a kept connection or a fresh one; returns the
    /// connection with its answer (an error answer included: the
    /// connection is fine), or the failure to get one.
    async fn request(
        &self,
        req: &Request,
    ) -> Result<
        (
            BufReader<UnixStream>,
            Result<serde_json::Value, ClientError>,
        ),
        ClientError,
    > {
        let line = Self::line(req);
        // A kept connection first. One that breaks before any answer was
        // never read by its supervisor (a supervisor from before connections
        // were kept answers one request per connection, then closes it):
        // the request goes on the next one, or a fresh one.
        loop {
            let kept = self.idle.lock().unwrap().pop();
            let Some(mut conn) = kept else { break };
            if conn.get_mut().write_all(&line).await.is_err() {
                continue;
            }
            match Self::read_answer(&mut conn).await {
                Err(ClientError::Unreachable(_)) => continue,
                answered => return Ok((conn, answered)),
            }
        }
        let mut conn = self.open(&line).await?;
        match Self::read_answer(&mut conn).await {
            Err(e @ ClientError::Unreachable(_)) => Err(e),
            answered => Ok((conn, answered)),
        }
    }

    /// Keeps `conn` for the next call after a complete answer.
    fn keep(
        &self,
        conn: BufReader<UnixStream>,
        answered: Result<serde_json::Value, ClientError>,
    ) -> Result<serde_json::Value, ClientError> {
        if matches!(answered, Ok(_) | Err(ClientError::Sup(_))) {
            keep_idle(&self.idle, conn);
        }
        answered
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
        let (conn, answered) = self.request(&Request::Read { id, stream, offset }).await?;
        if let Err(e) = answered {
            // An error answer (no such process, output discarded) leaves
            // the connection usable.
            return Err(self.keep(conn, Err(e)).unwrap_err());
        }
        Ok(OutputReader {
            conn: Some(conn),
            idle: self.idle.clone(),
        })
    }

    pub async fn stdin(&self, id: u32, data: &[u8]) -> Result<(), ClientError> {
        let req = Request::Stdin {
            id,
            len: data.len() as u64,
        };
        let mut conn = self.open(&Self::line(&req)).await?;
        conn.get_mut()
            .write_all(data)
            .await
            .map_err(ClientError::Unreachable)?;
        Self::read_answer(&mut conn).await.map(|_| ())
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
        secrets: Vec<(String, String)>,
        network: Option<gworker_runtime::net::NetPolicy>,
        volumes: Vec<crate::VolumeMount>,
    ) -> Result<(), ClientError> {
        self.call(&Request::Claim {
            entry,
            deadline,
            limits,
            secrets: crate::wire::SecretEnv(secrets),
            network,
            volumes,
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

/// Keeps `conn` (its last answer read in full) for a next call, up to
/// [`IDLE_CONNS`].
fn keep_idle(idle: &Mutex<Vec<BufReader<UnixStream>>>, conn: BufReader<UnixStream>) {
    if conn.buffer().is_empty() {
        let mut idle = idle.lock().unwrap();
        if idle.len() < IDLE_CONNS {
            idle.push(conn);
        }
    }
}

/// Chunks of one output stream, as the supervisor sends them. Its
/// connection serves the supervisor's next call once the stream ended
/// cleanly (supervisors keep the connection after the end marker).
pub struct OutputReader {
    conn: Option<BufReader<UnixStream>>,
    idle: Arc<Mutex<Vec<BufReader<UnixStream>>>>,
}

impl OutputReader {
    /// The next chunk; `Ok(None)` when the stream ended cleanly, an error when
    /// the connection broke (the caller may resume from its offset).
    pub async fn next_chunk(&mut self) -> Result<Option<Bytes>, ClientError> {
        let Some(conn) = self.conn.as_mut() else {
            return Ok(None);
        };
        let mut len = [0u8; 4];
        conn.read_exact(&mut len)
            .await
            .map_err(ClientError::Unreachable)?;
        let n = u32::from_le_bytes(len) as usize;
        if n == 0 {
            if let Some(conn) = self.conn.take() {
                keep_idle(&self.idle, conn);
            }
            return Ok(None);
        }
        let mut buf = vec![0u8; n];
        conn.read_exact(&mut buf)
            .await
            .map_err(ClientError::Unreachable)?;
        Ok(Some(Bytes::from(buf)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::net::UnixListener;

    /// A stand-in supervisor answering every `signal` request with `{}` and
    /// every `read` with a stream of "hi";
    /// `per_conn` requests per connection (then it closes it, as
    /// supervisors before kept connections did after one). Counts accepts.
    fn serve(dir: &Path, per_conn: usize) -> (PathBuf, Arc<AtomicUsize>) {
        let sock = dir.join("sup.sock");
        let listener = UnixListener::bind(&sock).unwrap();
        let accepts = Arc::new(AtomicUsize::new(0));
        let counted = accepts.clone();
        tokio::spawn(async move {
            loop {
                let (conn, _) = listener.accept().await.unwrap();
                counted.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let mut conn = BufReader::new(conn);
                    for _ in 0..per_conn {
                        let mut line = String::new();
                        if conn.read_line(&mut line).await.unwrap_or(0) == 0 {
                            return;
                        }
                        if line.contains("\"op\":\"read\"") {
                            // The answer, one chunk "hi", the end marker.
                            let mut out = b"{\"ok\":{\"offset\":0}}\n".to_vec();
                            out.extend_from_slice(&2u32.to_le_bytes());
                            out.extend_from_slice(b"hi");
                            out.extend_from_slice(&0u32.to_le_bytes());
                            conn.get_mut().write_all(&out).await.unwrap();
                            continue;
                        }
                        assert!(line.contains("\"op\":\"signal\""), "{line}");
                        conn.get_mut().write_all(b"{\"ok\":{}}\n").await.unwrap();
                    }
                });
            }
        });
        (sock, accepts)
    }

    fn tmp(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("gw-supclient-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[tokio::test]
    async fn calls_in_a_row_share_one_connection() {
        let d = tmp("keep");
        let (sock, accepts) = serve(&d, usize::MAX);
        let c = SupClient::new(&sock);
        for _ in 0..5 {
            c.signal(1, 15).await.unwrap();
        }
        assert_eq!(accepts.load(Ordering::SeqCst), 1);
        // Concurrent calls open their own; at most IDLE_CONNS stay.
        let (a, b, e) = tokio::join!(c.signal(1, 15), c.signal(1, 15), c.signal(1, 15));
        a.and(b).and(e).unwrap();
        assert!(c.idle.lock().unwrap().len() <= IDLE_CONNS);
        let _ = std::fs::remove_dir_all(&d);
    }

    #[tokio::test]
    async fn an_output_stream_read_to_its_end_leaves_its_connection_for_the_next_call() {
        let d = tmp("read");
        let (sock, accepts) = serve(&d, usize::MAX);
        let c = SupClient::new(&sock);
        for _ in 0..3 {
            let mut r = c.read(1, StreamName::Stdout, 0).await.unwrap();
            assert_eq!(r.next_chunk().await.unwrap().as_deref(), Some(&b"hi"[..]));
            assert_eq!(r.next_chunk().await.unwrap(), None);
            assert_eq!(r.next_chunk().await.unwrap(), None);
            c.signal(1, 15).await.unwrap();
        }
        assert_eq!(accepts.load(Ordering::SeqCst), 1);
        // A stream dropped before its end takes its connection with it.
        let r = c.read(1, StreamName::Stdout, 0).await.unwrap();
        drop(r);
        c.signal(1, 15).await.unwrap();
        assert_eq!(accepts.load(Ordering::SeqCst), 2);
        let _ = std::fs::remove_dir_all(&d);
    }

    #[tokio::test]
    async fn a_supervisor_that_closes_after_each_answer_still_gets_every_call() {
        let d = tmp("one");
        let (sock, accepts) = serve(&d, 1);
        let c = SupClient::new(&sock);
        for _ in 0..4 {
            c.signal(1, 15).await.unwrap();
        }
        // Each call after the first found its kept connection closed and
        // went on a fresh one.
        assert_eq!(accepts.load(Ordering::SeqCst), 4);
        let _ = std::fs::remove_dir_all(&d);
    }
}
