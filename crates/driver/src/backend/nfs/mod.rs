//! The NFS backend: one directory per volume on an NFSv3 export, managed over the wire
//! with nfs3_client (no kernel mount on the controller).
//!
//! - `params`: StorageClass parameters → a checked [`params::Placement`].
//! - `volume_id`: the id format that carries everything delete and the node need.
//! - `records`: per-export record index that makes CreateVolume idempotent by name.
//!
//! The NFSv3 protocol work (connection pool, timeouts, traversal-proof path walking;
//! the embedded server behind `stowage local`) is the `stowage-nfs` crate's.
//!
//! Where a volume's placement (server, share, `subDir`) lives, and who reads it: the
//! volume id (DeleteVolume, and the node, which mounts what the id says) and the record
//! (CreateVolume retried with the same name, which checks it asked for the same place;
//! ListVolumes). The volume context is empty.
//!
//! CreateVolume looks the name up in the record index first (no round trip). For a new
//! name the record and the directory are created concurrently — one round trip — and an
//! EXIST answer to either is verified, never trusted. A crash between the two leaves a
//! record or a directory that the retry adopts; DeleteVolume removes the directory first
//! and the record last, so a half-deleted volume is still listed and retried.
//! This module must not import tonic or kube.

pub mod params;
pub mod records;
pub mod volume_id;

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;

use self::params::{OnDelete, Placement};
use self::records::{Export, Record};
use self::volume_id::NfsVolumeId;
use super::{Backend, BackendError, NodeSource};
use stowage_api::volume::{AccessType, Bytes, Capability, CreateRequest, Volume};
use stowage_nfs::client::{ClientConfig, FileKind, NfsClient, NfsError, NfsTarget};

/// The export used when a StorageClass names no `server`/`share`.
#[derive(Debug, Clone)]
pub struct DefaultExport {
    pub target: NfsTarget,
    /// Where the export's root is on this host, when it is local (the embedded
    /// server of `stowage local`): the node then bind-mounts instead of NFS-mounting.
    pub local_dir: Option<PathBuf>,
}

/// Configuration of the NFS backend.
#[derive(Debug, Clone, Default)]
pub struct NfsConfig {
    pub default_export: Option<DefaultExport>,
    pub client: ClientConfig,
    /// How long resolving a server name may take.
    pub resolve_timeout: Duration,
}

pub struct NfsBackend {
    config: NfsConfig,
    default_export: Option<Arc<Export>>,
    /// One pool and index per (server, share) named by StorageClasses.
    exports: Mutex<HashMap<(String, String), Arc<Export>>>,
}

impl NfsBackend {
    pub fn new(config: NfsConfig) -> Self {
        let default_export = config.default_export.as_ref().map(|d| {
            Arc::new(Export::new(NfsClient::new(
                d.target.clone(),
                config.client.clone(),
            )))
        });
        Self {
            config,
            default_export,
            exports: Mutex::new(HashMap::new()),
        }
    }

    /// An export by name; an empty server means the default export.
    async fn export(&self, server: &str, share: &str) -> Result<Arc<Export>, BackendError> {
        if server.is_empty() {
            return self.default_export.clone().ok_or_else(|| {
                BackendError::InvalidParameter(
                    "this volume lives on the default NFS export, but none is configured (--nfs-server/--nfs-share)".into(),
                )
            });
        }
        let key = (server.to_owned(), share.to_owned());
        if let Some(export) = self
            .exports
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&key)
        {
            return Ok(Arc::clone(export));
        }
        let target = NfsTarget {
            server: self.resolve(server).await?,
            share: share.to_owned(),
            port: None,
        };
        let export = Arc::new(Export::new(NfsClient::new(
            target,
            self.config.client.clone(),
        )));
        let mut exports = self.exports.lock().unwrap_or_else(|e| e.into_inner());
        Ok(Arc::clone(exports.entry(key).or_insert(export)))
    }

    /// IP literals as they are; names through the resolver, IPv4 preferred.
    async fn resolve(&self, server: &str) -> Result<IpAddr, BackendError> {
        let literal = server.trim_start_matches('[').trim_end_matches(']');
        if let Ok(ip) = literal.parse::<IpAddr>() {
            return Ok(ip);
        }
        let lookup = tokio::net::lookup_host((server, 0));
        let addresses: Vec<IpAddr> = tokio::time::timeout(self.config.resolve_timeout, lookup)
            .await
            .map_err(|_| {
                BackendError::Unavailable(format!("resolving NFS server {server:?} timed out"))
            })?
            .map_err(|e| {
                BackendError::Unavailable(format!("resolving NFS server {server:?}: {e}"))
            })?
            .map(|a| a.ip())
            .collect();
        addresses
            .iter()
            .find(|ip| ip.is_ipv4())
            .or(addresses.first())
            .copied()
            .ok_or_else(|| {
                BackendError::Unavailable(format!("NFS server {server:?} has no address"))
            })
    }

    fn has_default(&self) -> bool {
        self.config.default_export.is_some()
    }

    /// The volume as CSI reports it. No volume context: the id carries the server,
    /// share and sub-directory, and its readers (DeleteVolume, the node) read the id.
    fn volume(id: &NfsVolumeId, capacity_bytes: u64) -> Volume {
        Volume {
            id: id.encode(),
            capacity_bytes,
            context: BTreeMap::new(),
            topology: vec![],
            source_snapshot: None,
        }
    }

    /// Make the volume's directory: one MKDIR when its parent exists. EXIST is
    /// verified with a lookup; a missing parent (nested subDir) is created.
    /// `Ok(true)` when this call created it.
    async fn make_dir(client: &NfsClient, placement: &Placement) -> Result<bool, BackendError> {
        let path = components(&placement.sub_dir);
        match client
            .create_dir(&path, placement.mode, placement.owner)
            .await
        {
            Ok(_) => Ok(true),
            Err(NfsError::AlreadyExists { .. }) => {
                match client.stat(&path).await.map_err(map_error)? {
                    Some(attr) if attr.kind == FileKind::Dir => Ok(false),
                    _ => Err(BackendError::AlreadyExists(format!(
                        "{} exists on the export and is not a directory",
                        path.join("/")
                    ))),
                }
            }
            Err(NfsError::NotFound { .. }) if path.len() > 1 => client
                .create_dir_all(&path, placement.mode, placement.owner)
                .await
                .map(|made| made.created())
                .map_err(map_error),
            Err(e) => Err(map_error(e)),
        }
    }

    /// A record that names the volume must match the request.
    fn check_existing(
        request: &CreateRequest,
        placement: &Placement,
        record: &Record,
    ) -> Result<(), BackendError> {
        if &record.placement != placement {
            return Err(BackendError::AlreadyExists(format!(
                "volume {} already exists with other parameters (directory {}); delete it or use another name",
                request.name,
                record.placement.sub_dir.join("/")
            )));
        }
        if !request.capacity.admits(record.capacity_bytes) {
            return Err(BackendError::AlreadyExists(format!(
                "volume {} already exists with capacity {}, outside the requested range",
                request.name,
                Bytes(record.capacity_bytes)
            )));
        }
        Ok(())
    }
}

/// Errors from the wire, in backend terms (with what to do about them).
fn map_error(error: NfsError) -> BackendError {
    let message = error.to_string();
    match error {
        NfsError::InvalidName { .. } => BackendError::InvalidParameter(message),
        NfsError::NotFound { .. } => BackendError::NotFound(message),
        NfsError::AlreadyExists { .. } | NfsError::NotADirectory { .. } => {
            BackendError::AlreadyExists(message)
        }
        NfsError::PermissionDenied { .. } => BackendError::PermissionDenied(format!(
            "{message} (is the export root-squashed? export it with no_root_squash, or make the share writable for the squashed user)"
        )),
        NfsError::NoSpace => BackendError::Exhausted(message),
        NfsError::Timeout { .. } => BackendError::Timeout(message),
        NfsError::Connect { .. } | NfsError::Io { .. } => BackendError::Unavailable(message),
        _ => BackendError::Internal(message),
    }
}

fn components(path: &[String]) -> Vec<&str> {
    path.iter().map(String::as_str).collect()
}

#[async_trait]
impl Backend for NfsBackend {
    fn kind(&self) -> &'static str {
        "nfs"
    }

    fn owns(&self, volume_id: &str) -> bool {
        NfsVolumeId::is_nfs(volume_id)
    }

    fn volumes_share_filesystem(&self) -> bool {
        true
    }

    fn supports(&self, capability: &Capability) -> Result<(), String> {
        match capability.access_type {
            AccessType::Mount { .. } => Ok(()),
            AccessType::Block => Err(
                "NFS volumes are filesystems, not block devices: use volumeMode: Filesystem".into(),
            ),
        }
    }

    async fn create_volume(&self, request: &CreateRequest) -> Result<Volume, BackendError> {
        if let Some(snapshot) = &request.source_snapshot {
            return Err(BackendError::InvalidParameter(format!(
                "NFS volumes can't be created from snapshots (asked for {snapshot})"
            )));
        }
        let placement = params::placement(&request.name, &request.parameters, self.has_default())?;
        let export = self.export(&placement.server, &placement.share).await?;
        let id = NfsVolumeId::new(&request.name, &placement);
        // Look up first: a known name is checked, never created again.
        if let Some(record) = export.lookup(&request.name).await? {
            Self::check_existing(request, &placement, &record)?;
            Self::make_dir(&export.client, &placement).await?;
            return Ok(Self::volume(&id, record.capacity_bytes));
        }
        let record = Record {
            capacity_bytes: match request.capacity.required {
                0 => request.capacity.limit.unwrap_or(0),
                required => required,
            },
            placement: placement.clone(),
        };
        let (recorded, made) = tokio::join!(
            export.create(&request.name, &record),
            Self::make_dir(&export.client, &placement)
        );
        let capacity = match recorded {
            Ok(None) => Ok(record.capacity_bytes),
            Ok(Some(existing)) => Self::check_existing(request, &placement, &existing)
                .map(|()| existing.capacity_bytes),
            Err(e) => Err(e),
        };
        if capacity.is_err() && matches!(made, Ok(true)) {
            // Don't leave a directory this call made for a volume it can't record.
            let _ = export
                .client
                .remove_dir(&components(&placement.sub_dir))
                .await;
        }
        let capacity = capacity?;
        made?;
        Ok(Self::volume(&id, capacity))
    }

    async fn delete_volume(&self, volume_id: &str) -> Result<(), BackendError> {
        // An id that names no directory stowage could have made (`..`, the records) is
        // refused, not "already deleted": a PV with such a handle must not vanish
        // quietly, and nothing is touched.
        let id = NfsVolumeId::parse(volume_id).map_err(BackendError::InvalidParameter)?;
        let export = self.export(&id.server, &id.share).await?;
        let client = &export.client;
        let dir = components(&id.sub_dir);
        match id.on_delete {
            OnDelete::Retain => {}
            OnDelete::Delete => {
                client.remove_all(&dir).await.map_err(map_error)?;
            }
            OnDelete::Archive => {
                if client.stat(&dir).await.map_err(map_error)?.is_some() {
                    let (leaf, parent) = dir.split_last().expect("sub_dir is never empty");
                    let mut archived = format!("archived-{leaf}");
                    let mut to: Vec<&str> = parent.to_vec();
                    to.push(&archived);
                    if client.stat(&to).await.map_err(map_error)?.is_some() {
                        let stamp = std::time::SystemTime::now()
                            .duration_since(std::time::UNIX_EPOCH)
                            .unwrap_or_default()
                            .as_secs();
                        archived = format!("archived-{leaf}-{stamp}");
                        to = parent.to_vec();
                        to.push(&archived);
                    }
                    client.rename(&dir, &to).await.map_err(map_error)?;
                }
            }
        }
        // The record goes last: until then the volume is listed and can be retried.
        export.remove(&id.name).await
    }

    async fn get_volume(&self, volume_id: &str) -> Result<Option<Volume>, BackendError> {
        let id = NfsVolumeId::parse(volume_id).map_err(BackendError::InvalidParameter)?;
        let export = self.export(&id.server, &id.share).await?;
        if let Some(record) = export.lookup(&id.name).await?
            && NfsVolumeId::new(&id.name, &record.placement) == id
        {
            return Ok(Some(Self::volume(&id, record.capacity_bytes)));
        }
        // A directory without a record: a statically provisioned volume.
        let found = export
            .client
            .stat(&components(&id.sub_dir))
            .await
            .map_err(map_error)?;
        Ok(found
            .filter(|a| a.kind == FileKind::Dir)
            .map(|_| Self::volume(&id, 0)))
    }

    async fn list_volumes(&self) -> Result<Vec<Volume>, BackendError> {
        let mut exports: Vec<Arc<Export>> = self.default_export.iter().cloned().collect();
        exports.extend(
            self.exports
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .values()
                .cloned(),
        );
        let mut volumes = Vec::new();
        for export in exports {
            for (name, record) in export.all().await? {
                let id = NfsVolumeId::new(&name, &record.placement);
                volumes.push(Self::volume(&id, record.capacity_bytes));
            }
        }
        volumes.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(volumes)
    }

    async fn capacity(&self, parameters: &BTreeMap<String, String>) -> Result<u64, BackendError> {
        let (server, share) = params::export(parameters, self.has_default())?;
        let export = self.export(&server, &share).await?;
        let stat = export.client.fsstat().await.map_err(map_error)?;
        Ok(stat.avail_bytes)
    }

    fn node_source(
        &self,
        volume_id: &str,
        _context: &BTreeMap<String, String>,
        capability: &Capability,
    ) -> Result<NodeSource, BackendError> {
        let id = NfsVolumeId::parse(volume_id).map_err(BackendError::InvalidParameter)?;
        let mount_flags = match &capability.access_type {
            AccessType::Mount { mount_flags, .. } => mount_flags.clone(),
            AccessType::Block => vec![],
        };
        let (server, share) = if id.server.is_empty() {
            let default = self.config.default_export.as_ref().ok_or_else(|| {
                BackendError::InvalidParameter(
                    "volume is on the default NFS export, but this node has none configured".into(),
                )
            })?;
            if let Some(dir) = &default.local_dir {
                return Ok(NodeSource::ExportDir {
                    root: dir.clone(),
                    sub_dir: id.sub_dir.clone(),
                });
            }
            (
                default.target.server.to_string(),
                default.target.share.clone(),
            )
        } else {
            (id.server.clone(), id.share.clone())
        };
        Ok(NodeSource::Mount {
            source: nfs_source(&server, &share, &id.sub_dir),
            fs_type: "nfs".into(),
            options: nfs_mount_options(mount_flags),
        })
    }
}

/// `server:/share/sub/dir` (IPv6 literals in brackets).
fn nfs_source(server: &str, share: &str, sub_dir: &[String]) -> String {
    let host = if server.contains(':') && !server.starts_with('[') {
        format!("[{server}]")
    } else {
        server.to_owned()
    };
    format!(
        "{host}:{}/{}",
        share.trim_end_matches('/'),
        sub_dir.join("/")
    )
}

/// NFSv3 unless the StorageClass mountOptions pick a version.
fn nfs_mount_options(mut flags: Vec<String>) -> Vec<String> {
    let picks_version = flags.iter().any(|f| {
        let key = f.split('=').next().unwrap_or_default();
        matches!(key, "vers" | "nfsvers") || f == "v3" || f == "v4"
    });
    if !picks_version {
        flags.insert(0, "vers=3".into());
    }
    flags
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mount_sources_and_options() {
        let sub = vec!["prod".to_owned(), "data-db-0".to_owned()];
        assert_eq!(
            nfs_source("10.0.0.5", "/export", &sub),
            "10.0.0.5:/export/prod/data-db-0"
        );
        assert_eq!(
            nfs_source("fd00::5", "/", &sub),
            "[fd00::5]:/prod/data-db-0"
        );
        assert_eq!(nfs_mount_options(vec![]), ["vers=3"]);
        assert_eq!(nfs_mount_options(vec!["hard".into()]), ["vers=3", "hard"]);
        assert_eq!(
            nfs_mount_options(vec!["nfsvers=4.1".into()]),
            ["nfsvers=4.1"]
        );
    }
}
