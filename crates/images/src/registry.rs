//! Pulling images from OCI / Docker v2 registries into a layer store.
//!
//! ```text
//! let r = Reference::parse("python:3.12-slim")?;        // registry-1.docker.io/library/python:3.12-slim
//! let img = pull(&r, &PullOptions::default(), layers_root, &mut |line| eprintln!("{line}"))?;
//! // img.layers: bottom -> top keys; layers_root/<key>/diff are overlayfs lowerdirs
//! ```
//!
//! [`pull`] is blocking (HTTP with `ureq`): run it in `spawn_blocking`. It
//! resolves the reference to a manifest (a manifest list / OCI index is
//! resolved to its linux/amd64 entry), reads the image config (env, working
//! dir, user, entrypoint, cmd) and makes sure every layer is in the store,
//! downloading those that are not.
//!
//! Supported: Docker v2 schema 2 manifests and manifest lists, OCI manifests
//! and indexes (schema 1 is refused); layers that are gzip, zstd or
//! uncompressed tars (detected from the data's magic bytes, so a mislabelled
//! layer still works); sha256 digests only.
//!
//! # Layer store
//!
//! ```text
//! <layers_root>/<hex>/diff/        the layer's files, in overlayfs format
//! <layers_root>/<hex>/layer.json   LayerMeta: digest, diff_id, size_bytes (compressed),
//!                                  unpacked_bytes, media_type
//! <layers_root>/.tmp-<hex>-<pid>-<n>/   a download in progress (or a crashed one)
//! <layers_root>/.locks/<hex>.lock  flock(2) lock: one download of a layer at a time
//! ```
//!
//! `<hex>` (the layer key) is the hex part of the sha256 digest of the
//! compressed blob, as listed in the manifest. Names starting with `.` are
//! never layers. A layer directory appears (by `rename`) only once the blob
//! was downloaded, its digest (and, when the config lists it, the digest of
//! the uncompressed tar, the diff_id) verified, its files extracted and the
//! file system synced (`syncfs`); a layer directory that exists is complete and
//! is reused without any download. `<hex>` is mode 0700 (root only): the
//! layers hold setuid binaries meant for sandboxes, not for host users.
//! Concurrent pulls of one layer (threads or
//! processes) wait for each other through the lock file; should two still
//! race, the loser of the rename discards its copy. Temp directories left by
//! a process that no longer runs are removed by the next pull.
//!
//! Extraction turns OCI whiteouts into overlayfs ones: `.wh.NAME` becomes a
//! character device 0:0 named `NAME`, `.wh..wh..opq` becomes the xattr
//! `trusted.overlay.opaque=y` on its directory (other `.wh..wh.*` entries are
//! dropped). Regular files, directories, symlinks, hard links and FIFOs keep
//! their mode (incl. setuid/setgid/sticky), numeric uid/gid (`lchown`, never
//! following symlinks) and mtime; xattrs from PAX headers are kept only for
//! `user.*` and `security.capability` (never `trusted.*`, which could forge
//! overlayfs metadata). Character and block devices are skipped (the
//! per-layer progress line says how many). Entry paths are confined to the
//! layer: leading `/` and `.` components are dropped, a `..` component, a
//! path through a symlink, or a hard link to something outside the layer
//! fail the pull; the extraction never follows a symlink.
//!
//! # Transport and authentication
//!
//! Plain HTTP is used for loopback registries (`localhost`, 127.0.0.0/8,
//! `::1`) and those in [`PullOptions::insecure_registries`], HTTPS (rustls,
//! webpki roots) for all others. Any other request for plain HTTP (a token
//! realm or a redirect to `http://` on another host) is refused before
//! connecting, with a message naming `--insecure-registry`. Requests go out
//! anonymously first; on 401 a `Bearer` challenge is answered by fetching a
//! token from its realm (with Basic credentials when given) and a `Basic`
//! challenge with the credentials; expired tokens are renewed on the next 401.
//! Redirects (blob CDNs) are followed by hand: at most 5, the `Authorization`
//! header only goes to the registry's own host. [`PullOptions::timeout`]
//! bounds connecting, waiting for a response and every single read or write,
//! not the whole pull (a 1 GB layer may take longer than that). Proxies come
//! from the usual environment variables except for loopback registries.
//!
//! # Errors
//!
//! Everything fails as `ImageError::Build { image: <normalized reference>,
//! reason }`, the reason saying what failed, e.g. `cannot reach registry
//! 127.0.0.1:5999: connection refused`, `manifest unknown: 127.0.0.1:5000/foo:bar`,
//! `layer sha256:abcd1234… digest mismatch: got sha256:…`, `unauthorized: …;
//! give credentials with a Secret holding REGISTRY_USERNAME and REGISTRY_PASSWORD`.
//! A failed pull leaves no layer directory behind (complete layers pulled
//! before the failure stay: they are valid and will be reused).

use std::ffi::CString;
use std::fmt;
use std::fs;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, Ipv6Addr};
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, UNIX_EPOCH};

use base64::Engine as _;
use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use crate::ImageError;

/// Docker Hub's registry host (what `docker.io` and `index.docker.io` become).
pub const DOCKER_HUB: &str = "registry-1.docker.io";

pub const MEDIA_DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub const MEDIA_DOCKER_MANIFEST_LIST: &str =
    "application/vnd.docker.distribution.manifest.list.v2+json";
pub const MEDIA_OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const MEDIA_OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
const MEDIA_DOCKER_SCHEMA1: &str = "application/vnd.docker.distribution.manifest.v1+json";
const MEDIA_DOCKER_SCHEMA1_SIGNED: &str =
    "application/vnd.docker.distribution.manifest.v1+prettyjws";

/// Layer media types accepted (the compression is detected from the data).
const LAYER_MEDIA_TYPES: &[&str] = &[
    "application/vnd.docker.image.rootfs.diff.tar.gzip",
    "application/vnd.docker.image.rootfs.diff.tar",
    "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
    "application/vnd.oci.image.layer.v1.tar",
    "application/vnd.oci.image.layer.v1.tar+gzip",
    "application/vnd.oci.image.layer.v1.tar+zstd",
    "application/vnd.oci.image.layer.nondistributable.v1.tar",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd",
];

/// The platform pulled from manifest lists / indexes.
const WANT_OS: &str = "linux";
const WANT_ARCH: &str = "amd64";

const MAX_MANIFEST_BYTES: u64 = 4 << 20;
const MAX_CONFIG_BYTES: u64 = 32 << 20;
const MAX_TOKEN_BYTES: u64 = 1 << 20;
const MAX_REDIRECTS: u32 = 5;
const MAX_LAYERS: usize = 256;
const PROGRESS_EVERY: Duration = Duration::from_millis(500);
const COPY_BUF: usize = 1 << 20;
const LAYER_META_FILE: &str = "layer.json";

/// How to talk to registries.
#[derive(Debug, Clone)]
pub struct PullOptions {
    /// Registries (`host[:port]`) allowed over plain HTTP besides loopback
    /// ones (127.0.0.0/8, ::1, localhost). An entry without a port matches
    /// every port of that host.
    pub insecure_registries: Vec<String>,
    /// Username and password (from a user's Secret); used for Basic auth and
    /// for the Bearer token request.
    pub credentials: Option<(String, String)>,
    /// Bound for connecting, for a response to arrive and for each read or
    /// write on a connection; not for the whole pull.
    pub timeout: Duration,
}

impl Default for PullOptions {
    fn default() -> Self {
        PullOptions {
            insecure_registries: Vec::new(),
            credentials: None,
            timeout: Duration::from_secs(60),
        }
    }
}

/// A parsed, normalized image reference: `registry/repository[:tag][@digest]`.
///
/// Without tag and digest the tag is `latest`. Docker Hub references
/// (no registry, `docker.io`, `index.docker.io`) get registry
/// [`DOCKER_HUB`] and one-component repositories the `library/` prefix.
/// With a digest the image is pulled by digest (a tag next to it is kept
/// for display only).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Reference {
    /// `host[:port]`, e.g. `registry-1.docker.io`, `127.0.0.1:5000`.
    pub registry: String,
    /// e.g. `library/python`.
    pub repository: String,
    pub tag: Option<String>,
    /// `sha256:<64 hex>`.
    pub digest: Option<String>,
}

/// The result of a pull.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PulledImage {
    /// The normalized reference (`Reference::to_string`).
    pub reference: String,
    /// `sha256:…` of the platform (linux/amd64) manifest.
    pub manifest_digest: String,
    /// Bottom to top: layer keys (hex of the compressed blob's sha256); each
    /// one's files are in `layers_root/<key>/diff`.
    pub layers: Vec<String>,
    /// The config's `Env` (`K=V`; an entry without `=` gives an empty value).
    pub env: Vec<(String, String)>,
    /// The config's `WorkingDir`, `User` (None when empty).
    pub workdir: Option<String>,
    pub user: Option<String>,
    pub entrypoint: Vec<String>,
    pub cmd: Vec<String>,
    /// Compressed bytes of the layers this pull downloaded (0 when every
    /// layer was present; manifests and config are not counted).
    pub downloaded_bytes: u64,
}

/// `layers_root/<key>/layer.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LayerMeta {
    /// `sha256:<key>`, the compressed blob's digest.
    pub digest: String,
    /// `sha256:…` of the uncompressed tar (from the image config; verified).
    pub diff_id: Option<String>,
    /// Compressed size.
    pub size_bytes: u64,
    /// Sum of the sizes of the layer's regular files.
    pub unpacked_bytes: u64,
    pub media_type: String,
}

/// The directory holding layer `key`'s files (an overlayfs lowerdir).
pub fn layer_diff_dir(layers_root: &Path, key: &str) -> PathBuf {
    layers_root.join(key).join("diff")
}

/// The metadata of a stored layer, None if the layer is not in the store.
pub fn read_layer_meta(layers_root: &Path, key: &str) -> Result<Option<LayerMeta>, ImageError> {
    if !is_hex64(key) {
        return Ok(None);
    }
    let path = layers_root.join(key).join(LAYER_META_FILE);
    let text = match fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|e| ImageError::Metadata {
            image: format!("layer {key}"),
            path,
            reason: e.to_string(),
        })
}

// --- references ----------------------------------------------------------------

fn bad_reference(s: &str, why: impl fmt::Display) -> ImageError {
    ImageError::Build {
        image: s.to_string(),
        reason: format!("invalid image reference {s:?}: {why}"),
    }
}

impl Reference {
    /// Parse `[registry/]repository[:tag][@sha256:<hex>]` (Docker's grammar).
    /// A first component with a `.` or `:`, `localhost`, or an upper-case
    /// letter is a registry (e.g. `127.0.0.1:5000/a/b:t`); otherwise the
    /// reference is on Docker Hub (`python:3.12-slim`).
    pub fn parse(s: &str) -> Result<Reference, ImageError> {
        let bad = |why: &str| bad_reference(s, why);
        if s.is_empty() {
            return Err(bad("empty"));
        }
        if s.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(bad("contains whitespace or control characters"));
        }
        if let Some((scheme, _)) = s.split_once("://") {
            return Err(bad_reference(
                s,
                format!(
                    "a reference has no URL scheme: drop {scheme:?}:// (loopback registries and \
                     those given with --insecure-registry are used over plain HTTP, others over HTTPS)"
                ),
            ));
        }
        let (name_tag, digest) = match s.split_once('@') {
            Some((n, d)) => (n, Some(d)),
            None => (s, None),
        };
        if let Some(d) = digest {
            check_digest(d).map_err(|why| bad_reference(s, why))?;
        }
        let last_slash = name_tag.rfind('/');
        let (name, tag) = match name_tag.rfind(':') {
            Some(i) if last_slash.is_none_or(|j| i > j) => {
                (&name_tag[..i], Some(&name_tag[i + 1..]))
            }
            _ => (name_tag, None),
        };
        if let Some(t) = tag {
            check_tag(t).map_err(|why| bad_reference(s, why))?;
        }
        if name.is_empty() {
            return Err(bad("no repository name"));
        }
        let (registry, repo) = match name.split_once('/') {
            Some((first, rest))
                if first.contains(['.', ':'])
                    || first == "localhost"
                    || first.chars().any(|c| c.is_ascii_uppercase()) =>
            {
                check_registry(first).map_err(|why| bad_reference(s, why))?;
                (first.to_string(), rest.to_string())
            }
            _ => ("docker.io".to_string(), name.to_string()),
        };
        let registry = match registry.to_ascii_lowercase().as_str() {
            "docker.io" | "index.docker.io" | "registry-1.docker.io" => DOCKER_HUB.to_string(),
            _ => registry,
        };
        if repo.is_empty() {
            return Err(bad("no repository name after the registry"));
        }
        for comp in repo.split('/') {
            check_path_component(comp).map_err(|why| bad_reference(s, why))?;
        }
        let repository = if registry == DOCKER_HUB && !repo.contains('/') {
            format!("library/{repo}")
        } else {
            repo
        };
        if registry.len() + 1 + repository.len() > 255 {
            return Err(bad("name longer than 255 characters"));
        }
        let tag = match (tag, digest) {
            (None, None) => Some("latest".to_string()),
            (t, _) => t.map(str::to_string),
        };
        Ok(Reference {
            registry,
            repository,
            tag,
            digest: digest.map(str::to_string),
        })
    }

    /// The tag or digest to ask the registry for (the digest if there is one).
    fn manifest_ref(&self) -> &str {
        self.digest
            .as_deref()
            .or(self.tag.as_deref())
            .unwrap_or("latest")
    }
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.registry, self.repository)?;
        if let Some(t) = &self.tag {
            write!(f, ":{t}")?;
        }
        if let Some(d) = &self.digest {
            write!(f, "@{d}")?;
        }
        Ok(())
    }
}

impl std::str::FromStr for Reference {
    type Err = ImageError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Reference::parse(s)
    }
}

fn is_hex64(s: &str) -> bool {
    s.len() == 64
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// `sha256:<64 lowercase hex>` -> the hex part.
fn check_digest(d: &str) -> Result<&str, String> {
    let Some((algo, hex)) = d.split_once(':') else {
        return Err(format!("digest {d:?} is not ALGORITHM:HEX"));
    };
    if algo != "sha256" {
        return Err(format!(
            "digest {d:?}: unsupported algorithm {algo:?} (only sha256)"
        ));
    }
    if !is_hex64(hex) {
        return Err(format!(
            "digest {d:?}: a sha256 digest is 64 lower-case hex digits"
        ));
    }
    Ok(hex)
}

fn check_tag(t: &str) -> Result<(), String> {
    let ok_first = t
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_alphanumeric() || c == '_');
    if !ok_first
        || t.len() > 128
        || !t
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
    {
        return Err(format!(
            "tag {t:?}: a tag is 1-128 of [A-Za-z0-9_.-], not starting with . or -"
        ));
    }
    Ok(())
}

fn check_registry(r: &str) -> Result<(), String> {
    let (host, port) = split_host_port(r);
    if let Some(p) = port {
        if p.is_empty() || p.len() > 5 || !p.bytes().all(|b| b.is_ascii_digit()) {
            return Err(format!("registry {r:?}: bad port {p:?}"));
        }
        if p.parse::<u32>().map_or(true, |n| n == 0 || n > 65535) {
            return Err(format!("registry {r:?}: port {p} out of range"));
        }
    }
    if let Some(inner) = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        if inner.parse::<Ipv6Addr>().is_err() {
            return Err(format!("registry {r:?}: bad IPv6 address"));
        }
        return Ok(());
    }
    let ok = !host.is_empty()
        && host.split('.').all(|label| {
            !label.is_empty()
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        });
    if !ok {
        return Err(format!("registry {r:?}: bad host name"));
    }
    Ok(())
}

/// One `/`-separated repository component: `[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*`.
fn check_path_component(c: &str) -> Result<(), String> {
    if c.is_empty() {
        return Err("empty repository path component (\"//\" or a trailing \"/\")".into());
    }
    if c.chars().any(|ch| ch.is_ascii_uppercase()) {
        return Err(format!("repository name {c:?} must be lowercase"));
    }
    let bytes = c.as_bytes();
    let alnum = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    let bad = || {
        format!(
            "repository path component {c:?}: only [a-z0-9] runs separated by '.', '_', '__' or '-'"
        )
    };
    if !alnum(bytes[0]) || !alnum(bytes[bytes.len() - 1]) {
        return Err(bad());
    }
    let mut i = 0;
    while i < bytes.len() {
        if alnum(bytes[i]) {
            i += 1;
            continue;
        }
        let start = i;
        while i < bytes.len() && !alnum(bytes[i]) {
            i += 1;
        }
        let sep = &c[start..i];
        let ok = sep == "." || sep == "_" || sep == "__" || sep.bytes().all(|b| b == b'-');
        if !ok {
            return Err(bad());
        }
    }
    Ok(())
}

/// `host:port` -> (`host`, Some(`port`)); `[v6]:port` keeps the brackets.
fn split_host_port(r: &str) -> (&str, Option<&str>) {
    if r.starts_with('[') {
        if let Some(end) = r.find(']') {
            let rest = &r[end + 1..];
            return (&r[..=end], rest.strip_prefix(':'));
        }
        return (r, None);
    }
    match r.rsplit_once(':') {
        Some((h, p)) => (h, Some(p)),
        None => (r, None),
    }
}

fn is_loopback_host(host: &str) -> bool {
    let h = host.to_ascii_lowercase();
    if h == "localhost" || h.ends_with(".localhost") {
        return true;
    }
    if let Ok(ip) = h.parse::<Ipv4Addr>() {
        return ip.is_loopback();
    }
    if let Some(inner) = h.strip_prefix('[').and_then(|x| x.strip_suffix(']')) {
        return inner.parse::<Ipv6Addr>().is_ok_and(|ip| ip.is_loopback());
    }
    false
}

/// Whether plain HTTP may be used for `authority` (`host[:port]`).
pub fn plain_http_allowed(authority: &str, opts: &PullOptions) -> bool {
    let authority = authority.to_ascii_lowercase();
    let (host, _) = split_host_port(&authority);
    if is_loopback_host(host) {
        return true;
    }
    opts.insecure_registries.iter().any(|entry| {
        let e = entry.trim().to_ascii_lowercase();
        let e = e
            .strip_prefix("http://")
            .or_else(|| e.strip_prefix("https://"))
            .unwrap_or(&e)
            .trim_end_matches('/');
        e == authority || (split_host_port(e).1.is_none() && e == host)
    })
}

/// The base URL of a registry's API: `http://` for loopback and insecure
/// registries, otherwise `https://`.
pub fn registry_base_url(registry: &str, opts: &PullOptions) -> String {
    if plain_http_allowed(registry, opts) {
        format!("http://{registry}")
    } else {
        format!("https://{registry}")
    }
}

// --- URLs ----------------------------------------------------------------------

#[derive(Debug, Clone, PartialEq)]
struct Url {
    scheme: String,
    authority: String,
    /// Starts with `/`.
    path_query: String,
}

impl Url {
    fn parse(s: &str) -> Result<Url, String> {
        let (scheme, rest) = s
            .split_once("://")
            .ok_or_else(|| format!("URL {s:?} has no scheme"))?;
        let scheme = scheme.to_ascii_lowercase();
        if scheme != "http" && scheme != "https" {
            return Err(format!("URL {s:?}: unsupported scheme {scheme:?}"));
        }
        let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
        let authority = &rest[..end];
        if authority.is_empty() || authority.contains('@') {
            return Err(format!("URL {s:?}: bad host"));
        }
        let mut path_query = rest[end..].split('#').next().unwrap_or("").to_string();
        if !path_query.starts_with('/') {
            path_query.insert(0, '/');
        }
        Ok(Url {
            scheme,
            authority: authority.to_ascii_lowercase(),
            path_query,
        })
    }

    /// `Location` header value relative to this URL.
    fn join(&self, loc: &str) -> Result<Url, String> {
        if loc.contains("://") {
            Url::parse(loc)
        } else if let Some(rest) = loc.strip_prefix("//") {
            Url::parse(&format!("{}://{rest}", self.scheme))
        } else if loc.starts_with('/') {
            Url::parse(&format!("{}://{}{loc}", self.scheme, self.authority))
        } else {
            let path = self.path_query.split('?').next().unwrap_or("/");
            let dir = &path[..path.rfind('/').map_or(0, |i| i + 1)];
            Url::parse(&format!("{}://{}{dir}{loc}", self.scheme, self.authority))
        }
    }
}

impl fmt::Display for Url {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}://{}{}", self.scheme, self.authority, self.path_query)
    }
}

fn urlencode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Parse a `WWW-Authenticate` value: scheme (lower-cased) and parameters.
fn parse_challenge(h: &str) -> Option<(String, Vec<(String, String)>)> {
    let h = h.trim();
    let (scheme, rest) = match h.find(char::is_whitespace) {
        Some(i) => (&h[..i], &h[i..]),
        None => (h, ""),
    };
    if scheme.is_empty() {
        return None;
    }
    let mut params = Vec::new();
    let mut chars = rest.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| c.is_whitespace() || *c == ',') {
            chars.next();
        }
        let mut key = String::new();
        while let Some(&c) = chars.peek() {
            if c == '=' || c == ',' || c.is_whitespace() {
                break;
            }
            key.push(c);
            chars.next();
        }
        if key.is_empty() {
            break;
        }
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        let mut value = String::new();
        if chars.peek() == Some(&'=') {
            chars.next();
            while chars.peek().is_some_and(|c| c.is_whitespace()) {
                chars.next();
            }
            if chars.peek() == Some(&'"') {
                chars.next();
                while let Some(c) = chars.next() {
                    match c {
                        '\\' => {
                            if let Some(n) = chars.next() {
                                value.push(n);
                            }
                        }
                        '"' => break,
                        c => value.push(c),
                    }
                }
            } else {
                while let Some(&c) = chars.peek() {
                    if c == ',' {
                        break;
                    }
                    value.push(c);
                    chars.next();
                }
                value = value.trim().to_string();
            }
        }
        params.push((key.to_ascii_lowercase(), value));
    }
    Some((scheme.to_ascii_lowercase(), params))
}

// --- HTTP client -----------------------------------------------------------------

const CREDENTIALS_HINT: &str =
    "give credentials with a Secret holding REGISTRY_USERNAME and REGISTRY_PASSWORD";

struct Client<'a> {
    agent: ureq::Agent,
    opts: &'a PullOptions,
    reference: &'a Reference,
    base: Url,
    /// `Authorization` value for the registry's host, once known.
    auth: Option<String>,
}

impl<'a> Client<'a> {
    fn new(reference: &'a Reference, opts: &'a PullOptions) -> Result<Client<'a>, String> {
        let base = Url::parse(&registry_base_url(&reference.registry, opts))?;
        let (host, _) = split_host_port(&reference.registry);
        let t = Some(opts.timeout);
        let mut cfg = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .max_redirects(0)
            .user_agent(concat!("gworker/", env!("CARGO_PKG_VERSION")))
            .timeout_resolve(t)
            .timeout_connect(t)
            .timeout_send_request(t)
            .timeout_recv_response(t)
            .timeout_per_read(t)
            .timeout_per_write(t);
        if is_loopback_host(host) {
            cfg = cfg.proxy(None);
        }
        Ok(Client {
            agent: cfg.build().into(),
            opts,
            reference,
            base,
            auth: None,
        })
    }

    fn registry(&self) -> &str {
        &self.reference.registry
    }

    /// Refuse plain HTTP where it is not allowed (before any connection).
    fn check_url(&self, url: &Url) -> Result<(), String> {
        if url.scheme == "http" && !plain_http_allowed(&url.authority, self.opts) {
            return Err(format!(
                "refusing plain HTTP to {} ({url}): only loopback registries and those given with \
                 --insecure-registry {} are used without TLS",
                url.authority, url.authority
            ));
        }
        Ok(())
    }

    fn net_error(&self, url: &Url, e: ureq::Error) -> String {
        let host = &url.authority;
        let tls_hint =
            || format!("; if {host} serves plain HTTP, allow that with --insecure-registry {host}");
        match e {
            ureq::Error::Io(e) => match e.kind() {
                io::ErrorKind::ConnectionRefused => {
                    format!("cannot reach registry {host}: connection refused")
                }
                io::ErrorKind::TimedOut => format!(
                    "cannot reach registry {host}: timed out after {:?}",
                    self.opts.timeout
                ),
                _ => format!("cannot reach registry {host}: {e}"),
            },
            ureq::Error::HostNotFound => {
                format!("cannot reach registry {host}: host name not found")
            }
            ureq::Error::ConnectionFailed => {
                format!("cannot reach registry {host}: connection failed")
            }
            ureq::Error::Timeout(t) => format!(
                "cannot reach registry {host}: timed out ({t}) after {:?}",
                self.opts.timeout
            ),
            ureq::Error::Tls(m) => format!("TLS error with registry {host}: {m}{}", tls_hint()),
            ureq::Error::Rustls(e) => {
                format!("TLS error with registry {host}: {e}{}", tls_hint())
            }
            ureq::Error::Protocol(e) if url.scheme == "https" => {
                format!("bad answer from registry {host}: {e}{}", tls_hint())
            }
            e => format!("request to registry {host} ({url}) failed: {e}"),
        }
    }

    /// GET `url`, answering auth challenges and following redirects.
    /// Returns only 2xx responses; `noun` (manifest, blob, layer) and `name`
    /// name the object in errors.
    fn get(
        &mut self,
        url: Url,
        accept: Option<&str>,
        noun: &str,
        name: &str,
    ) -> Result<ureq::http::Response<ureq::Body>, String> {
        let what = format!("{noun} {name}");
        let mut url = url;
        let mut same_host = true;
        let mut redirects = 0;
        let mut reauthed = false;
        loop {
            self.check_url(&url)?;
            let mut req = self.agent.get(url.to_string());
            if let Some(a) = accept {
                req = req.header("Accept", a);
            }
            if same_host {
                if let Some(auth) = &self.auth {
                    req = req.header("Authorization", auth.as_str());
                }
            }
            let resp = req.call().map_err(|e| self.net_error(&url, e))?;
            let status = resp.status().as_u16();
            match status {
                200..=299 => return Ok(resp),
                301 | 302 | 303 | 307 | 308 => {
                    redirects += 1;
                    if redirects > MAX_REDIRECTS {
                        return Err(format!(
                            "{what}: more than {MAX_REDIRECTS} redirects from registry {}",
                            self.registry()
                        ));
                    }
                    let loc = resp
                        .headers()
                        .get("location")
                        .and_then(|v| v.to_str().ok())
                        .ok_or_else(|| {
                            format!("{what}: redirect (HTTP {status}) without a Location")
                        })?;
                    let next = url.join(loc)?;
                    same_host = same_host && next.authority == self.base.authority;
                    url = next;
                }
                401 if same_host && !reauthed => {
                    let challenge = resp
                        .headers()
                        .get("www-authenticate")
                        .and_then(|v| v.to_str().ok())
                        .map(str::to_string);
                    self.authenticate(challenge.as_deref())?;
                    reauthed = true;
                }
                _ => return Err(self.status_error(resp, noun, name)),
            }
        }
    }

    fn unauthorized(&self, detail: &str) -> String {
        let r = self.reference;
        match &self.opts.credentials {
            None => format!("unauthorized: {r}: {detail}; {CREDENTIALS_HINT}"),
            Some((user, _)) => format!(
                "unauthorized: {r}: {detail}; registry {} rejected the credentials of user {user:?} \
                 (check REGISTRY_USERNAME and REGISTRY_PASSWORD in the Secret)",
                self.registry()
            ),
        }
    }

    fn basic(&self) -> Option<String> {
        self.opts.credentials.as_ref().map(|(u, p)| {
            format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode(format!("{u}:{p}"))
            )
        })
    }

    /// Answer a 401's challenge: sets `self.auth`.
    fn authenticate(&mut self, challenge: Option<&str>) -> Result<(), String> {
        let Some((scheme, params)) = challenge.and_then(parse_challenge) else {
            return Err(self.unauthorized("registry answered 401 without an auth challenge"));
        };
        let param = |k: &str| {
            params
                .iter()
                .find(|(key, _)| key == k)
                .map(|(_, v)| v.clone())
        };
        match scheme.as_str() {
            "basic" => match self.basic() {
                Some(b) if self.auth.as_deref() != Some(b.as_str()) => {
                    self.auth = Some(b);
                    Ok(())
                }
                Some(_) => Err(self.unauthorized("Basic authentication failed")),
                None => Err(self.unauthorized("the registry requires authentication")),
            },
            "bearer" => {
                let realm = param("realm")
                    .ok_or_else(|| self.unauthorized("Bearer challenge without realm"))?;
                let mut url = Url::parse(&realm)
                    .map_err(|e| format!("registry {}: bad token realm: {e}", self.registry()))?;
                self.check_url(&url)?;
                let scope = param("scope")
                    .unwrap_or_else(|| format!("repository:{}:pull", self.reference.repository));
                let mut query = Vec::new();
                if let Some(service) = param("service") {
                    query.push(format!("service={}", urlencode(&service)));
                }
                for s in scope.split(' ').filter(|s| !s.is_empty()) {
                    query.push(format!("scope={}", urlencode(s)));
                }
                if !query.is_empty() {
                    let sep = if url.path_query.contains('?') {
                        '&'
                    } else {
                        '?'
                    };
                    url.path_query = format!("{}{sep}{}", url.path_query, query.join("&"));
                }
                let token = self.fetch_token(url)?;
                self.auth = Some(format!("Bearer {token}"));
                Ok(())
            }
            other => {
                Err(self.unauthorized(&format!("unsupported authentication scheme {other:?}")))
            }
        }
    }

    fn fetch_token(&mut self, url: Url) -> Result<String, String> {
        let mut req = self.agent.get(url.to_string());
        if let Some(b) = self.basic() {
            req = req.header("Authorization", b);
        }
        let mut resp = req.call().map_err(|e| self.net_error(&url, e))?;
        let status = resp.status().as_u16();
        if status == 401 || status == 403 {
            return Err(self.unauthorized(&format!(
                "the token service {} refused a token (HTTP {status})",
                url.authority
            )));
        }
        if !(200..300).contains(&status) {
            return Err(format!(
                "token service {} answered HTTP {status}: {}",
                url.authority,
                error_detail(resp.body_mut())
            ));
        }
        #[derive(Deserialize)]
        struct TokenResponse {
            token: Option<String>,
            access_token: Option<String>,
        }
        let body = resp
            .body_mut()
            .with_config()
            .limit(MAX_TOKEN_BYTES)
            .read_to_vec()
            .map_err(|e| format!("token service {}: {e}", url.authority))?;
        let t: TokenResponse = serde_json::from_slice(&body)
            .map_err(|e| format!("token service {}: bad answer: {e}", url.authority))?;
        t.token
            .filter(|s| !s.is_empty())
            .or(t.access_token.filter(|s| !s.is_empty()))
            .ok_or_else(|| format!("token service {} sent no token", url.authority))
    }

    fn status_error(
        &self,
        mut resp: ureq::http::Response<ureq::Body>,
        noun: &str,
        name: &str,
    ) -> String {
        let status = resp.status().as_u16();
        let detail = error_detail(resp.body_mut());
        let detail = if detail.is_empty() {
            String::new()
        } else {
            format!(" (registry says: {detail})")
        };
        match status {
            401 => self.unauthorized(&format!("{noun} access denied{detail}")),
            403 => format!("forbidden: {noun} {name}{detail}"),
            404 => format!("{noun} unknown: {name}{detail}"),
            429 => format!(
                "too many requests: registry {} rate-limits pulls; try again later{detail}",
                self.registry()
            ),
            _ => format!(
                "registry {} answered HTTP {status} for {noun} {name}{detail}",
                self.registry()
            ),
        }
    }

    fn api_url(&self, path: &str) -> Url {
        let mut u = self.base.clone();
        u.path_query = format!("/v2/{}/{path}", self.reference.repository);
        u
    }

    /// Fetch a manifest by tag or digest: (bytes, media type, digest).
    fn manifest(&mut self, tag_or_digest: &str) -> Result<(Vec<u8>, String, String), String> {
        let accept = [
            MEDIA_OCI_INDEX,
            MEDIA_DOCKER_MANIFEST_LIST,
            MEDIA_OCI_MANIFEST,
            MEDIA_DOCKER_MANIFEST,
        ]
        .join(", ");
        let shown = format!(
            "{}/{}{}{tag_or_digest}",
            self.registry(),
            self.reference.repository,
            if tag_or_digest.contains(':') {
                "@"
            } else {
                ":"
            }
        );
        let url = self.api_url(&format!("manifests/{tag_or_digest}"));
        let mut resp = self.get(url, Some(&accept), "manifest", &shown)?;
        let content_type = resp
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .map(|v| v.split(';').next().unwrap_or("").trim().to_string())
            .unwrap_or_default();
        let header_digest = resp
            .headers()
            .get("docker-content-digest")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let body = resp
            .body_mut()
            .with_config()
            .limit(MAX_MANIFEST_BYTES)
            .read_to_vec()
            .map_err(|e| format!("manifest {shown}: {}", body_error(e)))?;
        let digest = format!("sha256:{}", hex::encode(Sha256::digest(&body)));
        if tag_or_digest.contains(':') && digest != tag_or_digest {
            return Err(format!("manifest {shown} digest mismatch: got {digest}"));
        }
        if let Some(h) = header_digest.filter(|h| h.starts_with("sha256:")) {
            if h != digest {
                return Err(format!(
                    "manifest {shown}: registry says digest {h} but the content's is {digest}"
                ));
            }
        }
        Ok((body, content_type, digest))
    }

    /// Fetch a small blob (the config) and verify it.
    fn small_blob(&mut self, desc: &Descriptor, what: &str) -> Result<Vec<u8>, String> {
        check_digest(&desc.digest).map_err(|e| format!("{what}: {e}"))?;
        let url = self.api_url(&format!("blobs/{}", desc.digest));
        let mut resp = self.get(url, None, what, &desc.digest)?;
        let body = resp
            .body_mut()
            .with_config()
            .limit(MAX_CONFIG_BYTES)
            .read_to_vec()
            .map_err(|e| format!("{what} {}: {}", desc.digest, body_error(e)))?;
        let got = format!("sha256:{}", hex::encode(Sha256::digest(&body)));
        if got != desc.digest {
            return Err(format!("{what} {} digest mismatch: got {got}", desc.digest));
        }
        Ok(body)
    }
}

fn body_error(e: ureq::Error) -> String {
    match e {
        ureq::Error::BodyExceedsLimit(n) => format!("larger than {n} bytes"),
        e => e.to_string(),
    }
}

/// The `errors` of a registry's error body, as `CODE: message (detail)`.
fn error_detail(body: &mut ureq::Body) -> String {
    let Ok(bytes) = body.with_config().limit(64 << 10).read_to_vec() else {
        return String::new();
    };
    #[derive(Deserialize)]
    struct Errors {
        errors: Vec<ErrorEntry>,
    }
    #[derive(Deserialize)]
    struct ErrorEntry {
        #[serde(default)]
        code: String,
        #[serde(default)]
        message: String,
        #[serde(default)]
        detail: serde_json::Value,
    }
    if let Ok(e) = serde_json::from_slice::<Errors>(&bytes) {
        return e
            .errors
            .iter()
            .map(|e| {
                let mut s = format!("{}: {}", e.code, e.message);
                // Structured details ({"Tag": ...}) only repeat the request.
                if let serde_json::Value::String(d) = &e.detail {
                    if !d.is_empty() {
                        let d: String = d.chars().take(200).collect();
                        s.push_str(&format!(" ({d})"));
                    }
                }
                s
            })
            .collect::<Vec<_>>()
            .join("; ");
    }
    String::from_utf8_lossy(&bytes)
        .chars()
        .filter(|c| !c.is_control())
        .take(200)
        .collect::<String>()
        .trim()
        .to_string()
}

// --- manifests and config ----------------------------------------------------------

#[derive(Debug, Clone, Deserialize)]
struct Descriptor {
    #[serde(rename = "mediaType", default)]
    media_type: String,
    digest: String,
    #[serde(default)]
    size: u64,
    #[serde(default)]
    platform: Option<Platform>,
}

#[derive(Debug, Clone, Deserialize)]
struct Platform {
    #[serde(default)]
    architecture: String,
    #[serde(default)]
    os: String,
    #[serde(default)]
    variant: Option<String>,
}

#[derive(Debug, Deserialize)]
struct ManifestDoc {
    #[serde(rename = "schemaVersion", default)]
    schema_version: Option<u32>,
    #[serde(rename = "mediaType", default)]
    media_type: Option<String>,
    #[serde(default)]
    manifests: Option<Vec<Descriptor>>,
    #[serde(default)]
    config: Option<Descriptor>,
    #[serde(default)]
    layers: Option<Vec<Descriptor>>,
}

#[derive(Debug, Default, Deserialize)]
struct ImageConfigFile {
    #[serde(default)]
    architecture: String,
    #[serde(default)]
    os: String,
    #[serde(default)]
    config: Option<ContainerConfig>,
    #[serde(default)]
    rootfs: Option<RootFs>,
}

#[derive(Debug, Default, Deserialize)]
struct ContainerConfig {
    #[serde(rename = "Env", default)]
    env: Option<Vec<String>>,
    #[serde(rename = "WorkingDir", default)]
    working_dir: Option<String>,
    #[serde(rename = "User", default)]
    user: Option<String>,
    #[serde(rename = "Entrypoint", default)]
    entrypoint: Option<Vec<String>>,
    #[serde(rename = "Cmd", default)]
    cmd: Option<Vec<String>>,
}

#[derive(Debug, Default, Deserialize)]
struct RootFs {
    #[serde(default)]
    diff_ids: Vec<String>,
}

enum Manifest {
    Index(Vec<Descriptor>),
    Image {
        config: Descriptor,
        layers: Vec<Descriptor>,
    },
}

fn parse_manifest(bytes: &[u8], content_type: &str, shown: &str) -> Result<Manifest, String> {
    let doc: ManifestDoc = serde_json::from_slice(bytes)
        .map_err(|e| format!("manifest {shown} is not valid JSON: {e}"))?;
    let media = doc
        .media_type
        .clone()
        .filter(|m| !m.is_empty())
        .unwrap_or_else(|| content_type.to_string());
    if doc.schema_version == Some(1)
        || media == MEDIA_DOCKER_SCHEMA1
        || media == MEDIA_DOCKER_SCHEMA1_SIGNED
    {
        return Err(format!(
            "manifest {shown} is Docker schema 1 ({media}), which is not supported; push the image again with a current tool"
        ));
    }
    let is_index = media == MEDIA_OCI_INDEX || media == MEDIA_DOCKER_MANIFEST_LIST;
    let is_image = media == MEDIA_OCI_MANIFEST || media == MEDIA_DOCKER_MANIFEST;
    if is_index || (!is_image && doc.manifests.is_some()) {
        return Ok(Manifest::Index(doc.manifests.unwrap_or_default()));
    }
    match (doc.config, doc.layers) {
        (Some(config), Some(layers)) if is_image || media.is_empty() || media.contains("json") => {
            Ok(Manifest::Image { config, layers })
        }
        _ => Err(format!(
            "manifest {shown} has unsupported media type {media:?}"
        )),
    }
}

fn pick_platform(entries: &[Descriptor], shown: &str) -> Result<Descriptor, String> {
    let matching: Vec<&Descriptor> = entries
        .iter()
        .filter(|d| {
            d.platform
                .as_ref()
                .is_some_and(|p| p.os == WANT_OS && p.architecture == WANT_ARCH)
        })
        .collect();
    // Prefer an entry without a variant (amd64 has none; "v1" is the baseline).
    let best = matching
        .iter()
        .find(|d| {
            d.platform
                .as_ref()
                .and_then(|p| p.variant.as_deref())
                .is_none_or(|v| v.is_empty() || v == "v1")
        })
        .or(matching.first());
    match best {
        Some(d) => Ok((*d).clone()),
        None => {
            let platforms: Vec<String> = entries
                .iter()
                .filter_map(|d| d.platform.as_ref())
                .filter(|p| p.os != "unknown")
                .map(|p| match &p.variant {
                    Some(v) if !v.is_empty() => format!("{}/{}/{v}", p.os, p.architecture),
                    _ => format!("{}/{}", p.os, p.architecture),
                })
                .collect();
            Err(format!(
                "no {WANT_OS}/{WANT_ARCH} image in {shown} (it has: {})",
                if platforms.is_empty() {
                    "none".to_string()
                } else {
                    platforms.join(", ")
                }
            ))
        }
    }
}

fn split_env(env: &[String]) -> Vec<(String, String)> {
    env.iter()
        .filter(|e| !e.is_empty())
        .map(|e| match e.split_once('=') {
            Some((k, v)) => (k.to_string(), v.to_string()),
            None => (e.clone(), String::new()),
        })
        .collect()
}

// --- pull --------------------------------------------------------------------------

fn mb(n: u64) -> String {
    format!("{:.1}", n as f64 / 1e6)
}

fn short(digest: &str) -> &str {
    // "sha256:" + 8 hex
    &digest[..digest.len().min(15)]
}

/// Pull `reference` into `layers_root` (created if missing). Blocking.
///
/// Resolves the reference (manifest list / OCI index -> linux/amd64),
/// downloads each layer not already present, verifies its sha256 digest
/// (mismatch -> error naming the layer, nothing stored) and extracts it.
/// `progress` gets human-readable lines (per layer at most every ~0.5 s).
pub fn pull(
    reference: &Reference,
    opts: &PullOptions,
    layers_root: &Path,
    progress: &mut dyn FnMut(&str),
) -> Result<PulledImage, ImageError> {
    pull_inner(reference, opts, layers_root, progress).map_err(|reason| ImageError::Build {
        image: reference.to_string(),
        reason,
    })
}

fn pull_inner(
    reference: &Reference,
    opts: &PullOptions,
    layers_root: &Path,
    progress: &mut dyn FnMut(&str),
) -> Result<PulledImage, String> {
    let mut client = Client::new(reference, opts)?;
    progress(&format!("resolving {reference}"));

    // Manifest (through at most two levels of indexes).
    let mut want = reference.manifest_ref().to_string();
    let mut depth = 0;
    let (manifest_digest, config_desc, layer_descs) = loop {
        let (bytes, ctype, digest) = client.manifest(&want)?;
        let shown = format!("{}/{}@{digest}", reference.registry, reference.repository);
        match parse_manifest(&bytes, &ctype, &shown)? {
            Manifest::Index(entries) => {
                depth += 1;
                if depth > 2 {
                    return Err(format!("manifest {shown}: indexes nested too deep"));
                }
                let d = pick_platform(&entries, &reference.to_string())?;
                check_digest(&d.digest)
                    .map_err(|e| format!("manifest list of {reference}: {e}"))?;
                progress(&format!(
                    "{reference}: manifest list, using {WANT_OS}/{WANT_ARCH} {}",
                    short(&d.digest)
                ));
                want = d.digest;
            }
            Manifest::Image { config, layers } => break (digest, config, layers),
        }
    };
    if layer_descs.len() > MAX_LAYERS {
        return Err(format!(
            "image {reference} has {} layers, more than the {MAX_LAYERS} supported",
            layer_descs.len()
        ));
    }
    let mut keys = Vec::with_capacity(layer_descs.len());
    for d in &layer_descs {
        let hex = check_digest(&d.digest).map_err(|e| format!("layer of {reference}: {e}"))?;
        if !LAYER_MEDIA_TYPES.contains(&d.media_type.as_str()) {
            return Err(format!(
                "layer {} has unsupported media type {:?}",
                d.digest, d.media_type
            ));
        }
        keys.push(hex.to_string());
    }

    // Config.
    let cfg_bytes = client.small_blob(&config_desc, "image config")?;
    let cfg: ImageConfigFile = serde_json::from_slice(&cfg_bytes)
        .map_err(|e| format!("image config {} is not valid: {e}", config_desc.digest))?;
    if !cfg.architecture.is_empty() && (cfg.architecture != WANT_ARCH || cfg.os != WANT_OS) {
        return Err(format!(
            "image {reference} is {}/{}, this host runs {WANT_OS}/{WANT_ARCH}",
            cfg.os, cfg.architecture
        ));
    }
    let diff_ids = cfg.rootfs.map(|r| r.diff_ids).unwrap_or_default();
    let diff_ids: Vec<Option<String>> = if diff_ids.len() == layer_descs.len() {
        diff_ids
            .into_iter()
            .map(|d| check_digest(&d).is_ok().then_some(d))
            .collect()
    } else {
        vec![None; layer_descs.len()]
    };
    let total: u64 = layer_descs.iter().map(|d| d.size).sum();
    progress(&format!(
        "{reference}: manifest {}, {} layers, {} MB",
        short(&manifest_digest),
        layer_descs.len(),
        mb(total)
    ));

    // Layers.
    fs::create_dir_all(layers_root)
        .map_err(|e| format!("cannot create layer store {layers_root:?}: {e}"))?;
    remove_stale_tmp(layers_root);
    let mut downloaded = 0u64;
    let n = layer_descs.len();
    for (i, (desc, key)) in layer_descs.iter().zip(&keys).enumerate() {
        let label = format!("layer {}/{n} {}", i + 1, short(&desc.digest));
        downloaded += ensure_layer(
            &mut client,
            desc,
            key,
            diff_ids[i].as_deref(),
            layers_root,
            &label,
            progress,
        )?;
    }

    let c = cfg.config.unwrap_or_default();
    let non_empty = |s: Option<String>| s.filter(|s| !s.is_empty());
    Ok(PulledImage {
        reference: reference.to_string(),
        manifest_digest,
        layers: keys,
        env: split_env(&c.env.unwrap_or_default()),
        workdir: non_empty(c.working_dir),
        user: non_empty(c.user),
        entrypoint: c.entrypoint.unwrap_or_default(),
        cmd: c.cmd.unwrap_or_default(),
        downloaded_bytes: downloaded,
    })
}

static UNIQUE: AtomicU64 = AtomicU64::new(0);

/// Remove `.tmp-<hex>-<pid>-<n>` dirs whose process is gone. Only this
/// module's own (a full 64-hex key): other writers of the directory (image
/// builds) name theirs differently and clean them up themselves.
fn remove_stale_tmp(layers_root: &Path) {
    let Ok(rd) = fs::read_dir(layers_root) else {
        return;
    };
    for entry in rd.flatten() {
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        let Some(rest) = name.strip_prefix(".tmp-") else {
            continue;
        };
        let parts: Vec<&str> = rest.split('-').collect();
        let [hex, pid, n] = parts[..] else {
            continue;
        };
        if !is_hex64(hex) || !n.bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        let Ok(pid) = pid.parse::<u32>() else {
            continue;
        };
        if pid == std::process::id() || Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        let _ = fs::remove_dir_all(entry.path());
    }
}

/// Make layer `key` present; returns the bytes downloaded (0 if present).
fn ensure_layer(
    client: &mut Client<'_>,
    desc: &Descriptor,
    key: &str,
    diff_id: Option<&str>,
    layers_root: &Path,
    label: &str,
    progress: &mut dyn FnMut(&str),
) -> Result<u64, String> {
    let final_dir = layers_root.join(key);
    if final_dir.symlink_metadata().is_ok() {
        progress(&format!("{label} already present"));
        return Ok(0);
    }
    let locks = layers_root.join(".locks");
    fs::create_dir_all(&locks).map_err(|e| format!("cannot create {locks:?}: {e}"))?;
    let lock_path = locks.join(format!("{key}.lock"));
    let file = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(|e| format!("cannot open lock {lock_path:?}: {e}"))?;
    let _lock = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
        Ok(l) => l,
        Err((file, Errno::EWOULDBLOCK)) => {
            progress(&format!("{label} waiting for a concurrent pull of it"));
            Flock::lock(file, FlockArg::LockExclusive)
                .map_err(|(_, e)| format!("cannot lock {lock_path:?}: {e}"))?
        }
        Err((_, e)) => return Err(format!("cannot lock {lock_path:?}: {e}")),
    };
    if final_dir.symlink_metadata().is_ok() {
        progress(&format!("{label} already present"));
        return Ok(0);
    }
    let tmp = layers_root.join(format!(
        ".tmp-{key}-{}-{}",
        std::process::id(),
        UNIQUE.fetch_add(1, Ordering::Relaxed)
    ));
    let result = download_layer(client, desc, diff_id, &tmp, label, progress);
    let (size, stats, secs) = match result {
        Ok(r) => r,
        Err(e) => {
            let _ = fs::remove_dir_all(&tmp);
            return Err(e);
        }
    };
    match fs::rename(&tmp, &final_dir) {
        Ok(()) => {}
        Err(e)
            if final_dir.symlink_metadata().is_ok()
                && matches!(e.raw_os_error(), Some(libc::ENOTEMPTY) | Some(libc::EEXIST)) =>
        {
            let _ = fs::remove_dir_all(&tmp);
            progress(&format!("{label} already present (pulled concurrently)"));
            return Ok(size);
        }
        Err(e) => {
            let _ = fs::remove_dir_all(&tmp);
            return Err(format!(
                "cannot store {label}: rename into {final_dir:?}: {e}"
            ));
        }
    }
    let mut line = format!(
        "{label} {}/{} MB done in {secs:.1} s, {} MB unpacked",
        mb(size),
        mb(size),
        mb(stats.unpacked_bytes)
    );
    if stats.skipped_devices > 0 {
        line.push_str(&format!(
            ", {} device node(s) skipped",
            stats.skipped_devices
        ));
    }
    progress(&line);
    Ok(size)
}

/// Reads the blob, hashing and counting it, failing past `limit` bytes and
/// reporting progress.
struct BlobReader<'p, R> {
    inner: R,
    hasher: Sha256,
    count: u64,
    limit: u64,
    label: &'p str,
    last: Instant,
    progress: &'p mut dyn FnMut(&str),
}

impl<R: Read> Read for BlobReader<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        self.count += n as u64;
        if self.count > self.limit {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "blob is larger than the {} bytes the manifest says",
                    self.limit
                ),
            ));
        }
        if self.last.elapsed() >= PROGRESS_EVERY {
            self.last = Instant::now();
            (self.progress)(&format!(
                "{} {}/{} MB",
                self.label,
                mb(self.count),
                mb(self.limit)
            ));
        }
        Ok(n)
    }
}

/// Hashes and counts what passes through.
struct HashReader<R> {
    inner: R,
    hasher: Sha256,
}

impl<R: Read> Read for HashReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
}

/// Download, verify and extract one layer into `tmp`; (size, stats, seconds).
fn download_layer(
    client: &mut Client<'_>,
    desc: &Descriptor,
    diff_id: Option<&str>,
    tmp: &Path,
    label: &str,
    progress: &mut dyn FnMut(&str),
) -> Result<(u64, ExtractStats, f64), String> {
    let started = Instant::now();
    // 0700: the layer's files (setuid binaries included) are for sandboxes,
    // not for the host's other users.
    fs::DirBuilder::new()
        .mode(0o700)
        .create(tmp)
        .map_err(|e| format!("cannot create {tmp:?}: {e}"))?;
    let diff = tmp.join("diff");
    fs::create_dir(&diff).map_err(|e| format!("cannot create {diff:?}: {e}"))?;
    progress(&format!("{label} 0.0/{} MB", mb(desc.size)));
    let url = client.api_url(&format!("blobs/{}", desc.digest));
    let resp = client.get(url, None, "layer", &desc.digest)?;
    let registry = client.registry().to_string();
    let body = resp.into_body().into_reader();
    let blob = BlobReader {
        inner: body,
        hasher: Sha256::new(),
        count: 0,
        limit: if desc.size > 0 { desc.size } else { u64::MAX },
        label,
        last: Instant::now(),
        progress,
    };
    let mut br = BufReader::with_capacity(256 << 10, blob);

    let extracted = (|| -> Result<(ExtractStats, String), String> {
        let magic = br
            .fill_buf()
            .map_err(|e| format!("download of {label} from {registry} failed: {e}"))?
            .to_vec();
        let decoder: Box<dyn Read + '_> = if magic.starts_with(&[0x1f, 0x8b]) {
            Box::new(flate2::bufread::MultiGzDecoder::new(&mut br))
        } else if magic.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
            Box::new(
                zstd::stream::read::Decoder::with_buffer(&mut br)
                    .map_err(|e| format!("{label}: zstd: {e}"))?,
            )
        } else {
            Box::new(&mut br)
        };
        let mut tar_stream = HashReader {
            inner: decoder,
            hasher: Sha256::new(),
        };
        let stats = extract_tar(&mut tar_stream, &diff).map_err(|e| format!("{label}: {e}"))?;
        // The rest of the tar stream (padding after the end marker).
        io::copy(&mut tar_stream, &mut io::sink())
            .map_err(|e| format!("{label}: reading the layer: {e}"))?;
        Ok((
            stats,
            format!("sha256:{}", hex::encode(tar_stream.hasher.finalize())),
        ))
    })();
    // Whatever happened, read the blob to its end to learn its digest: a
    // corrupt blob is reported as such, not as the tar error it caused.
    let drained = io::copy(&mut br, &mut io::sink());
    let blob = br.into_inner();
    let size = blob.count;
    let got = format!("sha256:{}", hex::encode(blob.hasher.finalize()));
    if let Err(e) = drained {
        return Err(format!("download of {label} from {registry} failed: {e}"));
    }
    if desc.size > 0 && size < desc.size {
        // Cut short: the connection, not the content, is to blame.
        let why = match &extracted {
            Err(e) => format!(": {e}"),
            Ok(_) => String::new(),
        };
        return Err(format!(
            "download of {label} from {registry} failed after {size} of {} bytes{why}",
            desc.size
        ));
    }
    if got != desc.digest {
        return Err(format!(
            "layer {} digest mismatch: got {got} ({size} bytes); nothing stored",
            desc.digest
        ));
    }
    let (stats, got_diff_id) = extracted?;
    if let Some(want) = diff_id {
        if got_diff_id != want {
            return Err(format!(
                "layer {}: uncompressed content digest mismatch: got {got_diff_id}, the image config says {want}",
                desc.digest
            ));
        }
    }
    let meta = LayerMeta {
        digest: desc.digest.clone(),
        diff_id: Some(got_diff_id),
        size_bytes: size,
        unpacked_bytes: stats.unpacked_bytes,
        media_type: desc.media_type.clone(),
    };
    let meta_path = tmp.join(LAYER_META_FILE);
    let json = serde_json::to_vec_pretty(&meta).map_err(|e| e.to_string())?;
    fs::write(&meta_path, json).map_err(|e| format!("cannot write {meta_path:?}: {e}"))?;
    // Durable before it becomes visible under its final name.
    let dir = fs::File::open(tmp).map_err(|e| format!("cannot open {tmp:?}: {e}"))?;
    // SAFETY: syncfs on a valid open file descriptor.
    if unsafe { libc::syncfs(dir.as_raw_fd()) } != 0 {
        return Err(format!("syncfs {tmp:?}: {}", io::Error::last_os_error()));
    }
    Ok((size, stats, started.elapsed().as_secs_f64()))
}

// --- extraction ----------------------------------------------------------------------

/// What an extraction did.
#[derive(Debug, Default, Clone, PartialEq)]
pub(crate) struct ExtractStats {
    pub entries: u64,
    pub unpacked_bytes: u64,
    pub skipped_devices: u64,
    pub whiteouts: u64,
}

fn cpath(p: &Path) -> io::Result<CString> {
    CString::new(p.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains NUL"))
}

fn check(ret: libc::c_int) -> io::Result<()> {
    if ret == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

fn lchown(p: &Path, uid: u64, gid: u64) -> io::Result<()> {
    let uid = u32::try_from(uid).map_err(|_| io::Error::other("uid out of range"))?;
    let gid = u32::try_from(gid).map_err(|_| io::Error::other("gid out of range"))?;
    std::os::unix::fs::lchown(p, Some(uid), Some(gid))
}

fn set_times(p: &Path, mtime: u64, nofollow: bool) -> io::Result<()> {
    let c = cpath(p)?;
    let secs = libc::time_t::try_from(mtime).unwrap_or(libc::time_t::MAX);
    let ts = libc::timespec {
        tv_sec: secs,
        tv_nsec: 0,
    };
    let times = [ts, ts];
    let flags = if nofollow {
        libc::AT_SYMLINK_NOFOLLOW
    } else {
        0
    };
    // SAFETY: valid C string and a two-element timespec array.
    check(unsafe { libc::utimensat(libc::AT_FDCWD, c.as_ptr(), times.as_ptr(), flags) })
}

fn mknod(p: &Path, mode: libc::mode_t, dev: libc::dev_t) -> io::Result<()> {
    let c = cpath(p)?;
    // SAFETY: valid C string.
    check(unsafe { libc::mknod(c.as_ptr(), mode, dev) })
}

fn lsetxattr(p: &Path, name: &str, value: &[u8]) -> io::Result<()> {
    let c = cpath(p)?;
    let n = CString::new(name).map_err(|_| io::Error::other("xattr name contains NUL"))?;
    // SAFETY: valid C strings, value pointer and length from a slice.
    check(unsafe {
        libc::lsetxattr(
            c.as_ptr(),
            n.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    })
}

/// Split a tar path into safe components (no `..`, no leading `/`, no `.`).
fn sanitize(raw: &[u8]) -> Result<Vec<&[u8]>, String> {
    let mut comps = Vec::new();
    for c in raw.split(|&b| b == b'/') {
        match c {
            b"" | b"." => {}
            b".." => {
                return Err(format!(
                    "unsafe path {:?} in layer (\"..\")",
                    String::from_utf8_lossy(raw)
                ))
            }
            c => comps.push(c),
        }
    }
    Ok(comps)
}

/// Make sure every directory on `comps` under `root` exists and none is a
/// symlink (creating missing ones 0755 root:root); returns the path.
fn ensure_dirs(root: &Path, comps: &[&[u8]], entry: &str) -> Result<PathBuf, String> {
    let mut p = root.to_path_buf();
    for c in comps {
        p.push(std::ffi::OsStr::from_bytes(c));
        match p.symlink_metadata() {
            Ok(m) if m.is_dir() => {}
            Ok(m) if m.file_type().is_symlink() => {
                return Err(format!(
                    "entry {entry:?} goes through the symlink {:?}; refused",
                    p.strip_prefix(root).unwrap_or(&p)
                ))
            }
            Ok(_) => {
                return Err(format!(
                    "entry {entry:?}: {:?} is not a directory",
                    p.strip_prefix(root).unwrap_or(&p)
                ))
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                fs::create_dir(&p).map_err(|e| format!("mkdir {p:?}: {e}"))?;
                fs::set_permissions(&p, fs::Permissions::from_mode(0o755))
                    .map_err(|e| format!("chmod {p:?}: {e}"))?;
            }
            Err(e) => return Err(format!("lstat {p:?}: {e}")),
        }
    }
    Ok(p)
}

/// Remove whatever is at `p` (a later tar entry replaces an earlier one);
/// a directory stays if `keep_dir`.
fn clear(p: &Path, keep_dir: bool) -> Result<(), String> {
    match p.symlink_metadata() {
        Ok(m) if m.is_dir() => {
            if !keep_dir {
                fs::remove_dir_all(p).map_err(|e| format!("remove {p:?}: {e}"))?;
            }
        }
        Ok(_) => fs::remove_file(p).map_err(|e| format!("remove {p:?}: {e}"))?,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(format!("lstat {p:?}: {e}")),
    }
    Ok(())
}

fn wanted_xattr(name: &str) -> bool {
    name.starts_with("user.") || name == "security.capability"
}

/// Extract a layer tar into `root` (which exists) in overlayfs format.
pub(crate) fn extract_tar<R: Read>(reader: R, root: &Path) -> Result<ExtractStats, String> {
    use tar::EntryType;
    let mut ar = tar::Archive::new(reader);
    let mut stats = ExtractStats::default();
    let mut dir_times: Vec<(PathBuf, u64)> = Vec::new();
    let mut buf = vec![0u8; COPY_BUF];
    let entries = ar.entries().map_err(|e| format!("bad tar stream: {e}"))?;
    for entry in entries {
        let mut entry = entry.map_err(|e| format!("bad tar stream: {e}"))?;
        let raw = entry.path_bytes().into_owned();
        let shown = String::from_utf8_lossy(&raw).into_owned();
        let kind = entry.header().entry_type();
        if matches!(
            kind,
            EntryType::XGlobalHeader
                | EntryType::XHeader
                | EntryType::GNULongName
                | EntryType::GNULongLink
        ) {
            continue;
        }
        stats.entries += 1;
        let comps = sanitize(&raw)?;
        let hdr = entry.header();
        let mode = hdr
            .mode()
            .map_err(|e| format!("entry {shown:?}: mode: {e}"))?
            & 0o7777;
        let uid = hdr
            .uid()
            .map_err(|e| format!("entry {shown:?}: uid: {e}"))?;
        let gid = hdr
            .gid()
            .map_err(|e| format!("entry {shown:?}: gid: {e}"))?;
        let mtime = hdr.mtime().unwrap_or(0);
        let mut xattrs: Vec<(String, Vec<u8>)> = Vec::new();
        if let Ok(Some(pax)) = entry.pax_extensions() {
            for ext in pax.flatten() {
                if let Ok(k) = ext.key() {
                    if let Some(name) = k.strip_prefix("SCHILY.xattr.") {
                        if wanted_xattr(name) {
                            xattrs.push((name.to_string(), ext.value_bytes().to_vec()));
                        }
                    }
                }
            }
        }

        let Some((name, parents)) = comps.split_last() else {
            // The layer's root directory itself.
            if kind == EntryType::Directory {
                lchown(root, uid, gid).map_err(|e| format!("chown {root:?}: {e}"))?;
                fs::set_permissions(root, fs::Permissions::from_mode(mode))
                    .map_err(|e| format!("chmod {root:?}: {e}"))?;
                dir_times.push((root.to_path_buf(), mtime));
            }
            continue;
        };
        let parent = ensure_dirs(root, parents, &shown)?;

        // Whiteouts.
        if let Some(rest) = name.strip_prefix(b".wh.") {
            if rest == b".wh..opq" {
                lsetxattr(&parent, "trusted.overlay.opaque", b"y").map_err(|e| {
                    format!("cannot mark {parent:?} opaque (trusted.overlay.opaque): {e}")
                })?;
                stats.whiteouts += 1;
            } else if rest.starts_with(b".wh.") {
                // AUFS metadata (.wh..wh.plnk, .wh..wh.aufs): not content.
            } else if rest.is_empty() || rest == b"." || rest == b".." {
                return Err(format!("bad whiteout entry {shown:?}"));
            } else {
                let target = parent.join(std::ffi::OsStr::from_bytes(rest));
                clear(&target, false)?;
                mknod(&target, libc::S_IFCHR, libc::makedev(0, 0))
                    .map_err(|e| format!("whiteout {target:?}: mknod: {e}"))?;
                stats.whiteouts += 1;
            }
            continue;
        }

        let path = parent.join(std::ffi::OsStr::from_bytes(name));
        let ctx = |what: &str, e: io::Error| format!("entry {shown:?}: {what}: {e}");
        match kind {
            EntryType::Regular | EntryType::Continuous | EntryType::GNUSparse => {
                clear(&path, false)?;
                let mut f = fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .custom_flags(libc::O_NOFOLLOW)
                    .open(&path)
                    .map_err(|e| ctx("create", e))?;
                loop {
                    let n = match entry.read(&mut buf) {
                        Ok(0) => break,
                        Ok(n) => n,
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                        Err(e) => return Err(ctx("read", e)),
                    };
                    f.write_all(&buf[..n]).map_err(|e| ctx("write", e))?;
                    stats.unpacked_bytes += n as u64;
                }
                let uid32 =
                    u32::try_from(uid).map_err(|_| format!("entry {shown:?}: uid out of range"))?;
                let gid32 =
                    u32::try_from(gid).map_err(|_| format!("entry {shown:?}: gid out of range"))?;
                std::os::unix::fs::fchown(&f, Some(uid32), Some(gid32))
                    .map_err(|e| ctx("chown", e))?;
                // After chown, which clears setuid/setgid.
                f.set_permissions(fs::Permissions::from_mode(mode))
                    .map_err(|e| ctx("chmod", e))?;
                for (k, v) in &xattrs {
                    set_xattr_lenient(&path, k, v).map_err(|e| ctx("xattr", e))?;
                }
                let t = UNIX_EPOCH + Duration::from_secs(mtime);
                f.set_times(fs::FileTimes::new().set_accessed(t).set_modified(t))
                    .map_err(|e| ctx("utimes", e))?;
            }
            EntryType::Directory => {
                clear(&path, true)?;
                if path.symlink_metadata().is_err() {
                    fs::create_dir(&path).map_err(|e| ctx("mkdir", e))?;
                }
                lchown(&path, uid, gid).map_err(|e| ctx("chown", e))?;
                fs::set_permissions(&path, fs::Permissions::from_mode(mode))
                    .map_err(|e| ctx("chmod", e))?;
                for (k, v) in &xattrs {
                    set_xattr_lenient(&path, k, v).map_err(|e| ctx("xattr", e))?;
                }
                dir_times.push((path, mtime));
            }
            EntryType::Symlink => {
                let target = entry
                    .link_name_bytes()
                    .ok_or_else(|| format!("symlink {shown:?} without a target"))?
                    .into_owned();
                clear(&path, false)?;
                std::os::unix::fs::symlink(std::ffi::OsStr::from_bytes(&target), &path)
                    .map_err(|e| ctx("symlink", e))?;
                lchown(&path, uid, gid).map_err(|e| ctx("chown", e))?;
                set_times(&path, mtime, true).map_err(|e| ctx("utimes", e))?;
            }
            EntryType::Link => {
                let target_raw = entry
                    .link_name_bytes()
                    .ok_or_else(|| format!("hard link {shown:?} without a target"))?
                    .into_owned();
                let tcomps = sanitize(&target_raw)?;
                let Some((tname, tparents)) = tcomps.split_last() else {
                    return Err(format!("hard link {shown:?} to the layer's root"));
                };
                let tparent = ensure_existing_dirs(root, tparents, &shown)?;
                let target = tparent.join(std::ffi::OsStr::from_bytes(tname));
                match target.symlink_metadata() {
                    Ok(m) if !m.is_dir() => {}
                    Ok(_) => return Err(format!("hard link {shown:?} to a directory")),
                    Err(_) => {
                        return Err(format!(
                            "hard link {shown:?} -> {:?}: target not in this layer",
                            String::from_utf8_lossy(&target_raw)
                        ))
                    }
                }
                if target == path {
                    continue;
                }
                clear(&path, false)?;
                // linkat without AT_SYMLINK_FOLLOW: links a symlink itself.
                fs::hard_link(&target, &path).map_err(|e| ctx("link", e))?;
            }
            EntryType::Fifo => {
                clear(&path, false)?;
                mknod(&path, libc::S_IFIFO | 0o600, 0).map_err(|e| ctx("mkfifo", e))?;
                lchown(&path, uid, gid).map_err(|e| ctx("chown", e))?;
                fs::set_permissions(&path, fs::Permissions::from_mode(mode))
                    .map_err(|e| ctx("chmod", e))?;
                set_times(&path, mtime, true).map_err(|e| ctx("utimes", e))?;
            }
            EntryType::Char | EntryType::Block => {
                stats.skipped_devices += 1;
            }
            _ => {
                // Other types (GNU volume labels, ...): not file system content.
            }
        }
    }
    // Directory times last: creating entries changed them.
    for (p, t) in dir_times.iter().rev() {
        set_times(p, *t, true).map_err(|e| format!("utimes {p:?}: {e}"))?;
    }
    Ok(stats)
}

/// Like `ensure_dirs` but creates nothing: every component must be a real
/// directory already (for hard link targets).
fn ensure_existing_dirs(root: &Path, comps: &[&[u8]], entry: &str) -> Result<PathBuf, String> {
    let mut p = root.to_path_buf();
    for c in comps {
        p.push(std::ffi::OsStr::from_bytes(c));
        match p.symlink_metadata() {
            Ok(m) if m.is_dir() => {}
            _ => {
                return Err(format!(
                "hard link {entry:?}: its target's directory {:?} is not a directory of this layer",
                p.strip_prefix(root).unwrap_or(&p)
            ))
            }
        }
    }
    Ok(p)
}

/// Set an xattr; file systems without support for it are not an error.
fn set_xattr_lenient(p: &Path, name: &str, value: &[u8]) -> io::Result<()> {
    match lsetxattr(p, name, value) {
        Err(e) if e.raw_os_error() == Some(libc::ENOTSUP) => Ok(()),
        r => r,
    }
}

#[cfg(test)]
mod tests;
