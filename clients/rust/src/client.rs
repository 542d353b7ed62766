//! [`Client`]: the connection to one daemon. HTTP/1.1 over a unix socket or
//! TCP (hyper + hyper-util's pooled client, keep-alive), the bearer token, and
//! the mapping of answers to [`Error`]. Knows paths and JSON, nothing about
//! sandboxes' semantics (that is [`crate::sandbox`]).

use std::future::Future;
use std::io;
#[cfg(test)]
use std::path::Path;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::header::{HeaderValue, AUTHORIZATION, CONTENT_TYPE};
use hyper::{Method, Request, Response, Uri};
use hyper_util::client::legacy::connect::{Connected, Connection};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpStream, UnixStream};

use crate::error::{Error, Result};

/// A handle on one gworker daemon. Cheap to clone (shares one connection pool).
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

struct Inner {
    url: String,
    /// `http://host:port` for TCP; `http://localhost` for a unix socket (the
    /// connector ignores it, hyper needs an authority).
    base: String,
    token: Option<HeaderValue>,
    http: hyper_util::client::legacy::Client<Connector, Full<Bytes>>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the token.
        f.debug_struct("Client")
            .field("url", &self.inner.url)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Clone)]
enum Endpoint {
    Unix(PathBuf),
    Tcp(String),
}

impl Client {
    /// `url` is `unix:///path/to.sock` (or a plain absolute path) or
    /// `http://host:port`. `token` is sent as `Authorization: Bearer` (needed
    /// over TCP; harmless over a unix socket).
    pub fn new(url: &str, token: Option<&str>) -> Result<Client> {
        let (endpoint, base) = parse_url(url)?;
        let token = match token.filter(|t| !t.is_empty()) {
            Some(t) => {
                let mut v = HeaderValue::from_str(&format!("Bearer {t}")).map_err(|_| {
                    Error::Config(
                        "GWORKER_TOKEN contains characters not allowed in a header".into(),
                    )
                })?;
                v.set_sensitive(true);
                Some(v)
            }
            None => None,
        };
        let http = hyper_util::client::legacy::Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .pool_timer(TokioTimer::new())
            .build(Connector {
                endpoint: Arc::new(endpoint),
            });
        Ok(Client {
            inner: Arc::new(Inner {
                url: url.to_string(),
                base,
                token,
                http,
            }),
        })
    }

    /// From the environment: `GWORKER_URL` (default: the daemon's default
    /// unix socket, see [`gworker_api::default_socket_path`]) and `GWORKER_TOKEN`.
    pub fn from_env() -> Result<Client> {
        let url = match std::env::var("GWORKER_URL") {
            Ok(u) if !u.is_empty() => u,
            _ => default_url(),
        };
        let token = std::env::var("GWORKER_TOKEN").ok();
        Client::new(&url, token.as_deref())
    }

    /// The URL this client talks to, as given.
    pub fn url(&self) -> &str {
        &self.inner.url
    }

    /// `GET /v1/health`.
    pub async fn health(&self) -> Result<gworker_api::Health> {
        self.get_json("/v1/health").await
    }

    pub(crate) fn unavailable(&self, source: impl Into<crate::error::BoxError>) -> Error {
        Error::Unavailable {
            url: self.inner.url.clone(),
            source: source.into(),
        }
    }

    /// Sends a request; answers with an error status become [`Error`]s.
    pub(crate) async fn send(
        &self,
        method: Method,
        path_and_query: &str,
        body: Option<(Bytes, &'static str)>,
    ) -> Result<Response<Incoming>> {
        let uri: Uri = format!("{}{}", self.inner.base, path_and_query)
            .parse()
            .map_err(|e| Error::Config(format!("bad request path {path_and_query:?}: {e}")))?;
        let mut req = Request::builder().method(method).uri(uri);
        if let Some(t) = &self.inner.token {
            req = req.header(AUTHORIZATION, t.clone());
        }
        let req = match body {
            Some((b, ct)) => req.header(CONTENT_TYPE, ct).body(Full::new(b)),
            None => req.body(Full::new(Bytes::new())),
        }
        .map_err(|e| Error::Protocol(format!("cannot build request: {e}")))?;
        let resp = self
            .inner
            .http
            .request(req)
            .await
            .map_err(|e| self.unavailable(e))?;
        if resp.status().is_success() {
            return Ok(resp);
        }
        let status = resp.status().as_u16();
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| self.unavailable(e))?
            .to_bytes();
        Err(Error::from_response(status, &body))
    }

    pub(crate) async fn read_json<T: DeserializeOwned>(
        &self,
        resp: Response<Incoming>,
    ) -> Result<T> {
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| self.unavailable(e))?
            .to_bytes();
        serde_json::from_slice(&body).map_err(|e| {
            Error::Protocol(format!(
                "unexpected answer ({e}): {}",
                String::from_utf8_lossy(&body[..body.len().min(200)])
            ))
        })
    }

    pub(crate) async fn get_json<T: DeserializeOwned>(&self, path: &str) -> Result<T> {
        let resp = self.send(Method::GET, path, None).await?;
        self.read_json(resp).await
    }

    pub(crate) async fn post_json<B: Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<T> {
        let resp = self.post(path, body).await?;
        self.read_json(resp).await
    }

    /// POSTs `body` as JSON; the answer's body is the caller's to read
    /// (e.g. a stream of events).
    pub(crate) async fn post<B: Serialize>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<Response<Incoming>> {
        let b = serde_json::to_vec(body)
            .map_err(|e| Error::Protocol(format!("cannot encode request: {e}")))?;
        self.send(Method::POST, path, Some((b.into(), "application/json")))
            .await
    }

    /// A request whose successful answer has no interesting body (204).
    pub(crate) async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<(Bytes, &'static str)>,
    ) -> Result<()> {
        let resp = self.send(method, path, body).await?;
        // Drain so the connection goes back to the pool.
        let _ = resp.into_body().collect().await;
        Ok(())
    }
}

/// `unix://` + the daemon's default socket.
pub fn default_url() -> String {
    format!("unix://{}", gworker_api::default_socket_path().display())
}

fn parse_url(url: &str) -> Result<(Endpoint, String)> {
    let bad = |why: &str| {
        Error::Config(format!(
            "bad daemon URL {url:?}: {why} (expected unix:///path/to.sock or http://host:port)"
        ))
    };
    if let Some(path) = url.strip_prefix("unix://") {
        if !path.starts_with('/') {
            return Err(bad("the socket path must be absolute"));
        }
        return Ok((Endpoint::Unix(path.into()), "http://localhost".into()));
    }
    if url.starts_with('/') {
        return Ok((Endpoint::Unix(url.into()), "http://localhost".into()));
    }
    if let Some(rest) = url.strip_prefix("http://") {
        let authority = rest.trim_end_matches('/');
        if authority.is_empty() || authority.contains('/') {
            return Err(bad("expected no path after host:port"));
        }
        let authority = if authority
            .rsplit_once(':')
            .is_some_and(|(_, p)| p.parse::<u16>().is_ok())
        {
            authority.to_string()
        } else {
            format!("{authority}:80")
        };
        return Ok((
            Endpoint::Tcp(authority.clone()),
            format!("http://{authority}"),
        ));
    }
    if url.starts_with("https://") {
        return Err(bad(
            "https is not supported; put a TLS proxy in front or use an SSH tunnel",
        ));
    }
    Err(bad("unknown scheme"))
}

/// Percent-encodes one path segment (sandbox ids are hex, but a user may type anything).
pub(crate) fn seg(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Connects to the daemon's unix socket or TCP address, whatever the URI says.
#[derive(Clone)]
struct Connector {
    endpoint: Arc<Endpoint>,
}

impl tower_service::Service<Uri> for Connector {
    type Response = TokioIo<Io>;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<TokioIo<Io>>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: Uri) -> Self::Future {
        let endpoint = self.endpoint.clone();
        Box::pin(async move {
            match &*endpoint {
                Endpoint::Unix(p) => Ok(TokioIo::new(Io::Unix(UnixStream::connect(p).await?))),
                Endpoint::Tcp(a) => {
                    let s = TcpStream::connect(a.as_str()).await?;
                    s.set_nodelay(true)?;
                    Ok(TokioIo::new(Io::Tcp(s)))
                }
            }
        })
    }
}

enum Io {
    Unix(UnixStream),
    Tcp(TcpStream),
}

impl Connection for Io {
    fn connected(&self) -> Connected {
        Connected::new()
    }
}

impl AsyncRead for Io {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Io::Unix(s) => Pin::new(s).poll_read(cx, buf),
            Io::Tcp(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Io {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Io::Unix(s) => Pin::new(s).poll_write(cx, buf),
            Io::Tcp(s) => Pin::new(s).poll_write(cx, buf),
        }
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Io::Unix(s) => Pin::new(s).poll_flush(cx),
            Io::Tcp(s) => Pin::new(s).poll_flush(cx),
        }
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Io::Unix(s) => Pin::new(s).poll_shutdown(cx),
            Io::Tcp(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        assert!(
            matches!(parse_url("unix:///run/x.sock").unwrap().0, Endpoint::Unix(p) if p == Path::new("/run/x.sock"))
        );
        assert!(matches!(
            parse_url("/run/x.sock").unwrap().0,
            Endpoint::Unix(_)
        ));
        let (e, base) = parse_url("http://127.0.0.1:7420/").unwrap();
        assert!(matches!(e, Endpoint::Tcp(a) if a == "127.0.0.1:7420"));
        assert_eq!(base, "http://127.0.0.1:7420");
        assert_eq!(parse_url("http://example").unwrap().1, "http://example:80");
        assert!(parse_url("unix://rel.sock").is_err());
        assert!(parse_url("https://x:1").is_err());
        assert!(parse_url("ftp://x").is_err());
    }

    #[test]
    fn segments_are_escaped() {
        assert_eq!(seg("sb-12ab"), "sb-12ab");
        assert_eq!(seg("a/b c"), "a%2Fb%20c");
    }

    #[test]
    fn token_is_not_printed() {
        let c = Client::new("unix:///x.sock", Some("s3cret")).unwrap();
        assert!(!format!("{c:?}").contains("s3cret"));
    }
}
