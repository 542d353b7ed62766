//! [`OutputStream`]: a process's stdout or stderr as a `Stream` of byte
//! chunks that survives broken connections and daemon restarts.
//!
//! The daemon sends a stream's bytes from a given offset and ends the body
//! cleanly when the process has closed the stream. This module counts the
//! bytes it has handed out; when a body breaks mid-way it reconnects with
//! `?offset=<that count>`, so nothing is lost or repeated. While the daemon is
//! unreachable it keeps retrying for [`RESUME_WINDOW`].

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::{Stream, StreamExt};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::Method;

use crate::client::{seg, Client};
use crate::error::{Error, Result};
use crate::sandbox::EntryGate;

/// How long a broken stream keeps trying to reach the daemon again.
pub const RESUME_WINDOW: Duration = Duration::from_secs(30);
const RETRY_PAUSE: Duration = Duration::from_millis(200);

/// Which output of a process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamKind {
    Stdout,
    Stderr,
}

impl StreamKind {
    fn as_str(self) -> &'static str {
        match self {
            StreamKind::Stdout => "stdout",
            StreamKind::Stderr => "stderr",
        }
    }
}

/// The bytes a process writes to stdout or stderr, from an offset until the
/// process closes the stream. Each item is a chunk as it was produced.
/// Several readers of one stream may exist at once.
pub struct OutputStream {
    inner: Pin<Box<dyn Stream<Item = Result<Bytes>> + Send>>,
    offset: Arc<AtomicU64>,
}

impl std::fmt::Debug for OutputStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OutputStream")
            .field("offset", &self.offset())
            .finish_non_exhaustive()
    }
}

impl OutputStream {
    pub(crate) fn new(
        client: Client,
        sandbox_id: String,
        pid: u32,
        kind: StreamKind,
        offset: u64,
    ) -> OutputStream {
        let shared = Arc::new(AtomicU64::new(offset));
        let state = State {
            client,
            path: format!(
                "/v1/sandboxes/{}/processes/{pid}/{}",
                seg(&sandbox_id),
                kind.as_str()
            ),
            sandbox_id,
            pid,
            offset,
            shared: shared.clone(),
            body: None,
            connected_once: false,
            broken_since: None,
            entry_gate: EntryGate::default(),
            done: false,
        };
        let inner = futures::stream::unfold(state, State::next).boxed();
        OutputStream {
            inner,
            offset: shared,
        }
    }

    /// Bytes handed out so far, counted from the stream's start (the offset
    /// the next chunk starts at).
    pub fn offset(&self) -> u64 {
        self.offset.load(Ordering::Relaxed)
    }

    /// The next chunk, `None` once the process has closed the stream (the
    /// same as `StreamExt::next`, without importing `futures`).
    pub async fn next_chunk(&mut self) -> Option<Result<Bytes>> {
        self.next().await
    }

    /// Reads until the process closes the stream.
    pub async fn read_to_end(mut self) -> Result<Vec<u8>> {
        let mut out = Vec::new();
        while let Some(chunk) = self.next().await {
            out.extend_from_slice(&chunk?);
        }
        Ok(out)
    }

    /// [`read_to_end`](Self::read_to_end), as UTF-8 (invalid sequences replaced).
    pub async fn read_to_string(self) -> Result<String> {
        let v = self.read_to_end().await?;
        Ok(match String::from_utf8(v) {
            Ok(s) => s,
            Err(e) => String::from_utf8_lossy(e.as_bytes()).into_owned(),
        })
    }
}

impl Stream for OutputStream {
    type Item = Result<Bytes>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.inner.as_mut().poll_next(cx)
    }
}

struct State {
    client: Client,
    path: String,
    sandbox_id: String,
    pid: u32,
    offset: u64,
    shared: Arc<AtomicU64>,
    body: Option<Incoming>,
    /// Set once a body has started: from then on an unreachable daemon is
    /// waited for (it is restarting), not reported at once.
    connected_once: bool,
    /// When the current run of failures began.
    broken_since: Option<Instant>,
    entry_gate: EntryGate,
    done: bool,
}

impl State {
    async fn next(mut self) -> Option<(Result<Bytes>, State)> {
        if self.done {
            return None;
        }
        loop {
            let Some(body) = self.body.as_mut() else {
                match self.connect().await {
                    Ok(b) => {
                        self.body = Some(b);
                        self.connected_once = true;
                        self.broken_since = None;
                        continue;
                    }
                    Err(e) => {
                        if self.should_retry(&e).await {
                            tokio::time::sleep(RETRY_PAUSE).await;
                            continue;
                        }
                        self.done = true;
                        return Some((Err(e), self));
                    }
                }
            };
            match body.frame().await {
                // The final chunk: the process closed the stream.
                None => return None,
                Some(Ok(frame)) => {
                    let Ok(data) = frame.into_data() else {
                        continue;
                    };
                    if data.is_empty() {
                        continue;
                    }
                    self.offset += data.len() as u64;
                    self.shared.store(self.offset, Ordering::Relaxed);
                    self.broken_since = None;
                    return Some((Ok(data), self));
                }
                // The body broke (daemon killed, connection reset): resume.
                Some(Err(_)) => {
                    self.body = None;
                    self.broken_since.get_or_insert_with(Instant::now);
                }
            }
        }
    }

    async fn connect(&self) -> Result<Incoming> {
        let resp = self
            .client
            .send(
                Method::GET,
                &format!("{}?offset={}", self.path, self.offset),
                None,
            )
            .await?;
        if let Some(h) = resp.headers().get(gworker_api::OFFSET_HEADER) {
            let got = h.to_str().ok().and_then(|s| s.parse::<u64>().ok());
            if got != Some(self.offset) {
                return Err(Error::Protocol(format!(
                    "asked for output from offset {} but the daemon answered from {h:?}",
                    self.offset
                )));
            }
        }
        Ok(resp.into_body())
    }

    /// Whether a failed (re)connect is worth another try.
    async fn should_retry(&mut self, e: &Error) -> bool {
        // The entry process (0) of a sandbox still starting is not readable
        // yet; it will be once the sandbox runs.
        if self
            .entry_gate
            .should_retry(&self.client, &self.sandbox_id, self.pid, e)
            .await
        {
            return true;
        }
        if !self.connected_once {
            return false;
        }
        let transient = match e {
            Error::Unavailable { .. } => true,
            // A daemon that has just restarted may answer before it has
            // recovered everything.
            Error::Api { status, .. } => *status >= 500,
            _ => false,
        };
        transient && self.broken_since.get_or_insert_with(Instant::now).elapsed() < RESUME_WINDOW
    }
}
