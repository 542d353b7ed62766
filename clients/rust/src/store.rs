//! Volumes (named, persistent directories, with host-side file access) and
//! secrets (stored by the daemon, or given with a create request).

use std::collections::BTreeMap;
use std::path::Path;

use bytes::Bytes;
use gworker_api as api;
use http_body_util::BodyExt;
use hyper::Method;
use tokio::io::AsyncWriteExt;

use crate::client::{seg, Client};
use crate::error::{Error, Result};

/// A secret for [`crate::CreateOptions::secrets`]. Its `Debug` never shows values.
#[derive(Clone, PartialEq)]
pub struct Secret(pub(crate) api::SecretRef);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (&self.0.name, &self.0.values) {
            (Some(n), _) => write!(f, "Secret::from_name({n:?})"),
            (_, Some(v)) => write!(f, "Secret::from_dict(<{} values>)", v.len()),
            _ => write!(f, "Secret(?)"),
        }
    }
}

impl Secret {
    /// The secret the daemon stores under `name` (unknown → `NotFound` at create).
    pub fn from_name(name: impl Into<String>) -> Secret {
        Secret(api::SecretRef {
            name: Some(name.into()),
            values: None,
        })
    }

    /// Values sent with the create request, used for that sandbox only.
    pub fn from_dict<K: Into<String>, V: Into<String>>(
        values: impl IntoIterator<Item = (K, V)>,
    ) -> Secret {
        Secret(api::SecretRef {
            name: None,
            values: Some(
                values
                    .into_iter()
                    .map(|(k, v)| (k.into(), v.into()))
                    .collect(),
            ),
        })
    }
}

/// The daemon's stored secrets (listed by name only).
pub struct Secrets;

impl Secrets {
    pub async fn create(
        client: &Client,
        name: &str,
        values: BTreeMap<String, String>,
        overwrite: bool,
    ) -> Result<api::SecretInfo> {
        let req = api::CreateSecret {
            name: name.into(),
            values,
            overwrite,
        };
        client.post_json("/v1/secrets", &req).await
    }

    pub async fn list(client: &Client) -> Result<Vec<api::SecretInfo>> {
        let l: api::SecretList = client.get_json("/v1/secrets").await?;
        Ok(l.secrets)
    }

    pub async fn delete(client: &Client, name: &str) -> Result<()> {
        client
            .call(Method::DELETE, &format!("/v1/secrets/{}", seg(name)), None)
            .await
    }
}

/// A named volume on the daemon.
#[derive(Debug, Clone)]
pub struct Volume {
    client: Client,
    name: String,
}

impl Volume {
    /// The volume called `name`; with `create_if_missing` it is created
    /// (without quota) if needed, else it must exist (`NotFound`).
    pub async fn from_name(client: &Client, name: &str, create_if_missing: bool) -> Result<Volume> {
        if create_if_missing {
            Volume::create(client, name, None, true).await?;
        } else {
            let _: api::Volume = client
                .get_json(&format!("/v1/volumes/{}", seg(name)))
                .await?;
        }
        Ok(Volume {
            client: client.clone(),
            name: name.into(),
        })
    }

    /// Creates a volume; `quota_bytes` limits its size (ENOSPC inside).
    pub async fn create(
        client: &Client,
        name: &str,
        quota_bytes: Option<u64>,
        exist_ok: bool,
    ) -> Result<api::Volume> {
        let req = api::CreateVolume {
            name: name.into(),
            quota_bytes,
            exist_ok,
        };
        client.post_json("/v1/volumes", &req).await
    }

    pub async fn list(client: &Client) -> Result<Vec<api::Volume>> {
        let l: api::VolumeList = client.get_json("/v1/volumes").await?;
        Ok(l.volumes)
    }

    /// Deletes a volume and its files (`Conflict` while a sandbox mounts it).
    pub async fn delete(client: &Client, name: &str) -> Result<()> {
        client
            .call(Method::DELETE, &format!("/v1/volumes/{}", seg(name)), None)
            .await
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// What goes into [`crate::CreateOptions::volumes`].
    pub fn mount(&self) -> api::VolumeRef {
        api::VolumeRef {
            name: self.name.clone(),
            create_if_missing: false,
        }
    }

    fn url(&self, what: &str, path: &str, recursive: bool) -> String {
        format!(
            "/v1/volumes/{}/{what}?path={}{}",
            seg(&self.name),
            seg(path),
            if recursive { "&recursive=true" } else { "" }
        )
    }

    /// Entries under `path` (the volume's root is `/`).
    pub async fn listdir(&self, path: &str, recursive: bool) -> Result<Vec<api::VolumeEntry>> {
        let l: api::VolumeListing = self
            .client
            .get_json(&self.url("files", path, recursive))
            .await?;
        Ok(l.entries)
    }

    pub async fn read_file(&self, path: &str) -> Result<Bytes> {
        let resp = self
            .client
            .send(Method::GET, &self.url("file", path, false), None)
            .await?;
        Ok(resp
            .into_body()
            .collect()
            .await
            .map_err(|e| self.client.unavailable(e))?
            .to_bytes())
    }

    /// Streams a file of the volume into `out`; returns the bytes written.
    pub async fn read_file_into<W: tokio::io::AsyncWrite + Unpin>(
        &self,
        path: &str,
        out: &mut W,
    ) -> Result<u64> {
        let mut body = self
            .client
            .send(Method::GET, &self.url("file", path, false), None)
            .await?
            .into_body();
        let mut n = 0;
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| self.client.unavailable(e))?;
            if let Ok(data) = frame.into_data() {
                out.write_all(&data)
                    .await
                    .map_err(|e| Error::Config(format!("cannot write: {e}")))?;
                n += data.len() as u64;
            }
        }
        Ok(n)
    }

    /// Writes a file (parents are created); it is replaced atomically and is
    /// durable when this returns.
    pub async fn write_file(&self, path: &str, data: impl Into<Bytes>) -> Result<()> {
        self.client
            .call(
                Method::PUT,
                &self.url("file", path, false),
                Some((data.into(), "application/octet-stream")),
            )
            .await
    }

    pub async fn mkdir(&self, path: &str) -> Result<()> {
        self.client
            .call(Method::PUT, &self.url("dir", path, false), None)
            .await
    }

    /// Removes a file, symlink or empty directory (any directory if `recursive`).
    pub async fn remove_file(&self, path: &str, recursive: bool) -> Result<()> {
        self.client
            .call(Method::DELETE, &self.url("file", path, recursive), None)
            .await
    }

    /// Uploads a local file or directory (recursively) to `remote`; returns
    /// the number of files written.
    pub async fn put(&self, local: &Path, remote: &str) -> Result<u64> {
        let meta = tokio::fs::metadata(local)
            .await
            .map_err(|e| Error::Config(format!("{}: {e}", local.display())))?;
        if meta.is_file() {
            let data = tokio::fs::read(local)
                .await
                .map_err(|e| Error::Config(format!("{}: {e}", local.display())))?;
            self.write_file(remote, data).await?;
            return Ok(1);
        }
        if !meta.is_dir() {
            return Err(Error::Config(format!(
                "{}: neither a file nor a directory",
                local.display()
            )));
        }
        self.mkdir(remote).await?;
        let mut n = 0;
        let mut rd = tokio::fs::read_dir(local)
            .await
            .map_err(|e| Error::Config(format!("{}: {e}", local.display())))?;
        while let Some(e) = rd
            .next_entry()
            .await
            .map_err(|e| Error::Config(format!("{}: {e}", local.display())))?
        {
            let name = e.file_name().to_string_lossy().into_owned();
            let sub = format!("{}/{name}", remote.trim_end_matches('/'));
            let ft = e
                .file_type()
                .await
                .map_err(|e| Error::Config(e.to_string()))?;
            if ft.is_symlink() {
                continue;
            }
            n += Box::pin(self.put(&e.path(), &sub)).await?;
        }
        Ok(n)
    }

    /// Downloads a file or directory (recursively) of the volume to `local`;
    /// returns the number of files written.
    pub async fn get(&self, remote: &str, local: &Path) -> Result<u64> {
        let top = self.listdir(remote, false).await?;
        let is_file = top.len() == 1
            && top[0].kind == api::EntryKind::File
            && top[0].path == remote.trim_matches('/');
        let io = |e: std::io::Error| Error::Config(format!("{}: {e}", local.display()));
        if is_file {
            if let Some(dir) = local.parent().filter(|d| !d.as_os_str().is_empty()) {
                tokio::fs::create_dir_all(dir).await.map_err(io)?;
            }
            let mut f = tokio::fs::File::create(local).await.map_err(io)?;
            self.read_file_into(remote, &mut f).await?;
            f.flush().await.map_err(io)?;
            return Ok(1);
        }
        tokio::fs::create_dir_all(local).await.map_err(io)?;
        let base = remote.trim_matches('/');
        let mut n = 0;
        for e in self.listdir(remote, true).await? {
            let rel = e
                .path
                .strip_prefix(base)
                .unwrap_or(&e.path)
                .trim_start_matches('/');
            let dest = local.join(rel);
            match e.kind {
                api::EntryKind::Dir => tokio::fs::create_dir_all(&dest).await.map_err(io)?,
                api::EntryKind::File => {
                    if let Some(d) = dest.parent() {
                        tokio::fs::create_dir_all(d).await.map_err(io)?;
                    }
                    let mut f = tokio::fs::File::create(&dest).await.map_err(io)?;
                    self.read_file_into(&e.path, &mut f).await?;
                    f.flush().await.map_err(io)?;
                    n += 1;
                }
                _ => {}
            }
        }
        Ok(n)
    }
}
