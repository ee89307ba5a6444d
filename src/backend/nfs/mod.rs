//! The NFS backend: one directory per volume on an NFSv3 export, managed over the wire
//! with nfs3_client (no kernel mount on the controller).
//!
//! - `params`: StorageClass parameters → a checked [`params::Placement`].
//! - `volume_id`: the id format that carries everything delete and the node need.
//! - `client`: connection pool, timeouts, traversal-proof path walking.
//! - `server`: the embedded NFSv3 server behind `stowage local`.
//!
//! Idempotency does not trust the server: each volume has a small JSON record under
//! `<share>/.stowage/<name>` (capacity and placement, written before the directory), so
//! a repeated CreateVolume finds the volume by name and a different size or placement is
//! ALREADY_EXISTS. This module must not import tonic or kube.

pub mod client;
pub mod params;
pub mod server;
pub mod volume_id;

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use self::client::{ClientConfig, NfsClient, NfsError, NfsTarget};
use self::params::{OnDelete, Placement, RECORDS_DIR};
use self::volume_id::NfsVolumeId;
use super::{Backend, BackendError, NodeSource};
use crate::volume::{AccessType, Bytes, Capability, CreateRequest, Volume};

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

/// What `.stowage/<name>` holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Record {
    name: String,
    capacity_bytes: u64,
    placement: Placement,
}

pub struct NfsBackend {
    config: NfsConfig,
    default_client: Option<Arc<NfsClient>>,
    /// One pool per (server, share) named by StorageClasses.
    clients: Mutex<HashMap<(String, String), Arc<NfsClient>>>,
}

impl NfsBackend {
    pub fn new(config: NfsConfig) -> Self {
        let default_client = config
            .default_export
            .as_ref()
            .map(|d| Arc::new(NfsClient::new(d.target.clone(), config.client.clone())));
        Self {
            config,
            default_client,
            clients: Mutex::new(HashMap::new()),
        }
    }

    /// The pool for an export; an empty server means the default export.
    async fn client(&self, server: &str, share: &str) -> Result<Arc<NfsClient>, BackendError> {
        if server.is_empty() {
            return self.default_client.clone().ok_or_else(|| {
                BackendError::InvalidParameter(
                    "this volume lives on the default NFS export, but none is configured (--nfs-server/--nfs-share)".into(),
                )
            });
        }
        let key = (server.to_owned(), share.to_owned());
        if let Some(client) = self
            .clients
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&key)
        {
            return Ok(Arc::clone(client));
        }
        let address = self.resolve(server).await?;
        let target = NfsTarget {
            server: address,
            share: share.to_owned(),
            port: None,
        };
        let client = Arc::new(NfsClient::new(target, self.config.client.clone()));
        let mut clients = self.clients.lock().unwrap_or_else(|e| e.into_inner());
        Ok(Arc::clone(clients.entry(key).or_insert(client)))
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

    async fn read_record(
        &self,
        client: &NfsClient,
        name: &str,
    ) -> Result<Option<Record>, BackendError> {
        let Some(bytes) = client
            .read_file(&[RECORDS_DIR, name])
            .await
            .map_err(map_error)?
        else {
            return Ok(None);
        };
        match serde_json::from_slice::<Record>(&bytes) {
            Ok(record) if record.name == name => Ok(Some(record)),
            // An empty or torn record (crash while writing) counts as absent.
            _ => {
                tracing::warn!(name, "ignoring an unreadable volume record");
                Ok(None)
            }
        }
    }

    async fn write_record(&self, client: &NfsClient, record: &Record) -> Result<(), BackendError> {
        client
            .mkdir_all(&[RECORDS_DIR], 0o700, None)
            .await
            .map_err(map_error)?;
        let bytes =
            serde_json::to_vec(record).map_err(|e| BackendError::Internal(e.to_string()))?;
        client
            .write_file(&[RECORDS_DIR, &record.name], &bytes, 0o600)
            .await
            .map_err(map_error)
    }

    fn volume(id: &NfsVolumeId, capacity_bytes: u64) -> Volume {
        let mut context = BTreeMap::new();
        if !id.server.is_empty() {
            context.insert("server".to_owned(), id.server.clone());
            context.insert("share".to_owned(), id.share.clone());
        }
        context.insert("subDir".to_owned(), id.sub_dir.join("/"));
        Volume {
            id: id.encode(),
            capacity_bytes,
            context,
        }
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

    fn supports(&self, capability: &Capability) -> Result<(), String> {
        match capability.access_type {
            AccessType::Mount { .. } => Ok(()),
            AccessType::Block => Err(
                "NFS volumes are filesystems, not block devices: use volumeMode: Filesystem".into(),
            ),
        }
    }

    async fn create_volume(&self, request: &CreateRequest) -> Result<Volume, BackendError> {
        let placement = params::placement(&request.name, &request.parameters, self.has_default())
            .map_err(BackendError::InvalidParameter)?;
        let client = self.client(&placement.server, &placement.share).await?;
        let id = NfsVolumeId::new(&request.name, &placement);
        let capacity = match self.read_record(&client, &request.name).await? {
            Some(record) => {
                if record.placement != placement {
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
                record.capacity_bytes
            }
            None => {
                let capacity_bytes = match request.capacity.required {
                    0 => request.capacity.limit.unwrap_or(0),
                    required => required,
                };
                let record = Record {
                    name: request.name.clone(),
                    capacity_bytes,
                    placement: placement.clone(),
                };
                self.write_record(&client, &record).await?;
                capacity_bytes
            }
        };
        let created = client
            .mkdir_all(
                &components(&placement.sub_dir),
                placement.mode,
                placement.owner,
            )
            .await
            .map_err(map_error)?;
        tracing::debug!(?created, "directory ready");
        Ok(Self::volume(&id, capacity))
    }

    async fn delete_volume(&self, volume_id: &str) -> Result<(), BackendError> {
        let Ok(id) = NfsVolumeId::parse(volume_id) else {
            tracing::info!(volume_id, "not a valid NFS volume id; nothing to delete");
            return Ok(());
        };
        let client = self.client(&id.server, &id.share).await?;
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
        client
            .remove_all(&[RECORDS_DIR, &id.name])
            .await
            .map_err(map_error)?;
        Ok(())
    }

    async fn get_volume(&self, volume_id: &str) -> Result<Option<Volume>, BackendError> {
        let Ok(id) = NfsVolumeId::parse(volume_id) else {
            return Ok(None);
        };
        let client = self.client(&id.server, &id.share).await?;
        if let Some(record) = self.read_record(&client, &id.name).await?
            && NfsVolumeId::new(&record.name, &record.placement) == id
        {
            return Ok(Some(Self::volume(&id, record.capacity_bytes)));
        }
        // A directory without a record: a statically provisioned volume.
        let found = client
            .stat(&components(&id.sub_dir))
            .await
            .map_err(map_error)?;
        Ok(found
            .filter(|a| a.kind == client::FileKind::Dir)
            .map(|_| Self::volume(&id, 0)))
    }

    async fn list_volumes(&self) -> Result<Vec<Volume>, BackendError> {
        let mut clients: Vec<Arc<NfsClient>> = self.default_client.iter().cloned().collect();
        clients.extend(
            self.clients
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .values()
                .cloned(),
        );
        let mut volumes = Vec::new();
        for client in clients {
            let names = client
                .read_dir(&[RECORDS_DIR])
                .await
                .map_err(map_error)?
                .unwrap_or_default();
            for name in names {
                if let Some(record) = self.read_record(&client, &name).await? {
                    let id = NfsVolumeId::new(&record.name, &record.placement);
                    volumes.push(Self::volume(&id, record.capacity_bytes));
                }
            }
        }
        volumes.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(volumes)
    }

    async fn capacity(&self, parameters: &BTreeMap<String, String>) -> Result<u64, BackendError> {
        let (server, share) = params::export(parameters, self.has_default())
            .map_err(BackendError::InvalidParameter)?;
        let client = self.client(&server, &share).await?;
        let stat = client.fsstat().await.map_err(map_error)?;
        Ok(stat.avail_bytes)
    }

    fn node_source(
        &self,
        volume_id: &str,
        _context: &BTreeMap<String, String>,
        capability: &Capability,
    ) -> Result<NodeSource, BackendError> {
        let id = NfsVolumeId::parse(volume_id).map_err(BackendError::NotFound)?;
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
                return Ok(NodeSource::Bind {
                    path: id.sub_dir.iter().fold(dir.clone(), |p, c| p.join(c)),
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
