//! The NFS backend: one directory per volume on an NFSv3 export, managed over the wire
//! with nfs3_client (no kernel mount on the controller).
//!
//! - `params`: StorageClass parameters → a checked [`params::Placement`].
//! - `volume_id`: the id format that carries everything delete and the node need.
//! - `records`: per-export record index that makes CreateVolume idempotent by name.
//! - `snapshots`: snapshot ids, records and their layout on the export (copies of the
//!   tree made over the wire); `copies`: the copies under way (snapshots, restores,
//!   clones), which outlast the CSI call that started them.
//!
//! Restores and clones copy the source tree into `.stowage-work/clone-<name>`, rename
//! the finished copy into the volume's place and write the record last; a call that
//! finds the copy still going answers UNAVAILABLE with its progress (the caller
//! retries). Expansion only records the new capacity: an NFS directory has no quota.
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

pub mod copies;
pub mod params;
pub mod records;
pub mod snapshots;
pub mod volume_id;

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;

use self::copies::{Copies, Waited};
use self::params::{OnDelete, Placement, RECORDS_DIR, SNAPSHOTS_DIR, WORK_DIR};
use self::records::{Export, Record, RecordedSource};
use self::snapshots::{DATA, RECORD, SnapshotId, SnapshotRecord};
use self::volume_id::NfsVolumeId;
use super::{Backend, BackendError, Held, Inventory, InventoryHints, NodeSource};
use stowage_api::keys::RESERVED_PREFIX;
use stowage_api::volume::{
    AccessType, Bytes, Capability, CapacityRange, ContentSource, CreateRequest, Snapshot, Volume,
};
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
#[derive(Debug, Clone)]
pub struct NfsConfig {
    pub default_export: Option<DefaultExport>,
    pub client: ClientConfig,
    /// How long resolving a server name may take.
    pub resolve_timeout: Duration,
    /// How long a CreateSnapshot/CreateVolume waits for its copy before answering
    /// "not ready yet" (the copy goes on; the caller's retry joins it).
    pub copy_wait: Duration,
}

/// How long a call waits for a copy when the configuration does not say.
pub const DEFAULT_COPY_WAIT: Duration = Duration::from_secs(10);

impl Default for NfsConfig {
    fn default() -> Self {
        Self {
            default_export: None,
            client: ClientConfig::default(),
            resolve_timeout: Duration::from_secs(5),
            copy_wait: DEFAULT_COPY_WAIT,
        }
    }
}

pub struct NfsBackend {
    config: NfsConfig,
    default_export: Option<Arc<Export>>,
    /// One pool and index per (server, share) named by StorageClasses.
    exports: Mutex<HashMap<(String, String), Arc<Export>>>,
    /// Snapshots, restores and clones being copied.
    copies: Copies,
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
            copies: Copies::default(),
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
    fn volume(id: &NfsVolumeId, capacity_bytes: u64, source: Option<&RecordedSource>) -> Volume {
        Volume {
            id: id.encode(),
            capacity_bytes,
            context: BTreeMap::new(),
            topology: vec![],
            source: source.map(ContentSource::from),
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
        if record.source.as_ref() != request.source.as_ref().map(RecordedSource::from).as_ref() {
            return Err(BackendError::AlreadyExists(format!(
                "volume {} already exists with another content source ({:?}); delete it or use another name",
                request.name, record.source
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

    /// Every export this process has used (the default one first).
    fn exports_in_use(&self) -> Vec<Arc<Export>> {
        let mut exports: Vec<Arc<Export>> = self.default_export.iter().cloned().collect();
        exports.extend(
            self.exports
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .values()
                .cloned(),
        );
        exports
    }

    /// A volume made from a snapshot or another volume: the source's tree copied into
    /// `.stowage-work/clone-<name>`, renamed into the volume's place, then recorded.
    /// The copy outlasts this call (see `copies`): until it is done, UNAVAILABLE.
    async fn create_from(
        &self,
        request: &CreateRequest,
        source: &ContentSource,
        placement: Placement,
        export: Arc<Export>,
    ) -> Result<Volume, BackendError> {
        let not_found =
            |what: &str, id: &str| BackendError::NotFound(format!("{what} {id} does not exist"));
        let same_export = |server: &str, share: &str, what: &str| {
            if (server, share) == (placement.server.as_str(), placement.share.as_str()) {
                Ok(())
            } else {
                Err(BackendError::InvalidParameter(format!(
                    "{what} is on another NFS export than the one the StorageClass names ({}:{}); NFS volumes are restored and cloned on their source's export",
                    placement.server, placement.share
                )))
            }
        };
        let (from, size): (Vec<String>, u64) = match source {
            ContentSource::Snapshot(snapshot_id) => {
                let sid = SnapshotId::parse(snapshot_id)
                    .map_err(|_| not_found("snapshot", snapshot_id))?;
                same_export(&sid.server, &sid.share, &format!("snapshot {snapshot_id}"))?;
                let key = copy_key("snapshot", &sid.server, &sid.share, &sid.name);
                if self.copies.get(&key).is_some() {
                    return Err(BackendError::Unavailable(format!(
                        "snapshot {snapshot_id} is not ready yet (still being copied); retry"
                    )));
                }
                let record = read_snapshot_record(&export.client, &sid)
                    .await?
                    .ok_or_else(|| not_found("snapshot", snapshot_id))?;
                let data = sid.data().iter().map(|c| (*c).to_owned()).collect();
                (data, record.size_bytes)
            }
            ContentSource::Volume(volume_id) => {
                let vid =
                    NfsVolumeId::parse(volume_id).map_err(|_| not_found("volume", volume_id))?;
                same_export(&vid.server, &vid.share, &format!("volume {volume_id}"))?;
                match export
                    .client
                    .stat(&components(&vid.sub_dir))
                    .await
                    .map_err(map_error)?
                {
                    Some(attr) if attr.is_dir() => {}
                    _ => return Err(not_found("volume", volume_id)),
                }
                let size = export
                    .lookup(&vid.name)
                    .await?
                    .filter(|r| r.placement.sub_dir == vid.sub_dir)
                    .map_or(0, |r| r.capacity_bytes);
                (vid.sub_dir.clone(), size)
            }
        };
        if let Some(limit) = request.capacity.limit
            && limit < size
        {
            return Err(BackendError::OutOfRange(format!(
                "the source holds {} but the requested capacity is at most {}",
                Bytes(size),
                Bytes(limit)
            )));
        }
        let id = NfsVolumeId::new(&request.name, &placement);
        let recorded_source = RecordedSource::from(source);
        let record = Record {
            capacity_bytes: request.capacity.required.max(size),
            placement: placement.clone(),
            source: Some(recorded_source.clone()),
        };
        if let Some(existing) = export.lookup(&request.name).await? {
            Self::check_existing(request, &placement, &existing)?;
            return Ok(Self::volume(
                &id,
                existing.capacity_bytes,
                existing.source.as_ref(),
            ));
        }
        let source_id = match source {
            ContentSource::Snapshot(id) | ContentSource::Volume(id) => id.clone(),
        };
        let key = copy_key("clone", &placement.server, &placement.share, &request.name);
        let job_export = Arc::clone(&export);
        let (name, job_record) = (request.name.clone(), record.clone());
        let copy = self
            .copies
            .start_or_join(&key, &source_id, move |progress, _| async move {
                clone_into_place(&job_export, &from, &name, &job_record, &progress).await
            })
            .map_err(|other| {
                BackendError::AlreadyExists(format!(
                    "volume {} is being made from {other}, not from {source_id}",
                    request.name
                ))
            })?;
        match self.copies.wait(&key, &copy, self.config.copy_wait).await {
            Waited::Done => {
                let stored = export.lookup(&request.name).await?.unwrap_or(record);
                Self::check_existing(request, &placement, &stored)?;
                Ok(Self::volume(
                    &id,
                    stored.capacity_bytes,
                    stored.source.as_ref(),
                ))
            }
            Waited::Failed(e) => Err(e),
            Waited::Running(copied) => Err(BackendError::Unavailable(format!(
                "volume {} is still being copied from {source_id} ({} so far); retry",
                request.name,
                Bytes(copied)
            ))),
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

    async fn check(&self) -> Result<String, String> {
        let exports = self.exports_in_use();
        if exports.is_empty() {
            return Ok("no export in use yet".to_owned());
        }
        let mut answers = Vec::new();
        for export in &exports {
            let target = export.client.target().to_string();
            answers.push(match export.client.fsstat().await {
                Ok(_) => Ok(target),
                Err(e) => Err(format!("{target}: FSSTAT failed: {e}")),
            });
        }
        let (up, down): (Vec<_>, Vec<_>) = answers.into_iter().partition(Result::is_ok);
        let down: Vec<String> = down.into_iter().filter_map(Result::err).collect();
        if down.is_empty() {
            let up: Vec<String> = up.into_iter().filter_map(Result::ok).collect();
            Ok(format!("FSSTAT answered by {}", up.join(", ")))
        } else {
            Err(down.join("; "))
        }
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
        let placement = params::placement(&request.name, &request.parameters, self.has_default())?;
        let export = self.export(&placement.server, &placement.share).await?;
        if let Some(source) = &request.source {
            return self.create_from(request, source, placement, export).await;
        }
        let id = NfsVolumeId::new(&request.name, &placement);
        // Look up first: a known name is checked, never created again.
        if let Some(record) = export.lookup(&request.name).await? {
            Self::check_existing(request, &placement, &record)?;
            Self::make_dir(&export.client, &placement).await?;
            return Ok(Self::volume(&id, record.capacity_bytes, None));
        }
        let record = Record {
            capacity_bytes: match request.capacity.required {
                0 => request.capacity.limit.unwrap_or(0),
                required => required,
            },
            placement: placement.clone(),
            source: None,
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
        Ok(Self::volume(&id, capacity, None))
    }

    async fn delete_volume(&self, volume_id: &str) -> Result<(), BackendError> {
        // An id that names no directory stowage could have made (`..`, the records) is
        // refused, not "already deleted": a PV with such a handle must not vanish
        // quietly, and nothing is touched.
        let id = NfsVolumeId::parse(volume_id).map_err(BackendError::InvalidParameter)?;
        let export = self.export(&id.server, &id.share).await?;
        let client = &export.client;
        // A restore or clone still copying into this volume is stopped first.
        let clone = clone_scratch(&id.name);
        self.copies
            .cancel(&copy_key("clone", &id.server, &id.share, &id.name))
            .await;
        client
            .remove_all(&[WORK_DIR, &clone])
            .await
            .map_err(map_error)?;
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
            return Ok(Some(Self::volume(
                &id,
                record.capacity_bytes,
                record.source.as_ref(),
            )));
        }
        // A directory without a record: a statically provisioned volume.
        let found = export
            .client
            .stat(&components(&id.sub_dir))
            .await
            .map_err(map_error)?;
        Ok(found
            .filter(|a| a.kind == FileKind::Dir)
            .map(|_| Self::volume(&id, 0, None)))
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
                volumes.push(Self::volume(
                    &id,
                    record.capacity_bytes,
                    record.source.as_ref(),
                ));
            }
        }
        volumes.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(volumes)
    }

    async fn inventory(&self, hints: &InventoryHints) -> Result<Inventory, BackendError> {
        // The exports named by the classes and the volumes, and the default one.
        let mut places: std::collections::BTreeSet<(String, String)> =
            std::collections::BTreeSet::new();
        if self.has_default() {
            places.insert((String::new(), String::new()));
        }
        for parameters in &hints.class_parameters {
            if let Ok(place) = params::export(parameters, self.has_default()) {
                places.insert(place);
            }
        }
        for id in &hints.volume_ids {
            if let Ok(id) = NfsVolumeId::parse(id) {
                places.insert((id.server, id.share));
            }
        }
        let mut inventory = Inventory::default();
        // One export named two ways (the default, and a class naming the same server
        // and share) is listed once, under the name classes use (sorted first).
        let mut seen = std::collections::BTreeSet::new();
        let mut places: Vec<(String, String)> = places.into_iter().collect();
        places.sort_by_key(|(server, _)| server.is_empty());
        for (server, share) in places {
            let export = self.export(&server, &share).await?;
            let place = export.client.target().to_string();
            if !seen.insert(place.clone()) {
                continue;
            }
            for (name, record) in export.all().await? {
                let id = NfsVolumeId::new(&name, &record.placement);
                let created = export
                    .client
                    .stat(&[RECORDS_DIR, &name])
                    .await
                    .map_err(map_error)?
                    .map(|attr| attr.mtime);
                inventory.volumes.push(Held {
                    id: id.encode(),
                    name,
                    capacity_bytes: record.capacity_bytes,
                    created,
                    place: place.clone(),
                });
            }
            // `onDelete: archive` leaves `archived-<dir>` beside the volume's directory;
            // those at the export's top level are listed (deeper ones are not walked).
            for entry in export
                .client
                .read_dir(&[])
                .await
                .map_err(map_error)?
                .unwrap_or_default()
            {
                if !entry.starts_with("archived-") {
                    continue;
                }
                let attr = export.client.stat(&[&entry]).await.map_err(map_error)?;
                inventory.archived.push(Held {
                    id: format!("{place}/{entry}"),
                    name: entry,
                    capacity_bytes: 0,
                    created: attr.map(|a| a.mtime),
                    place: place.clone(),
                });
            }
        }
        inventory.volumes.sort_by(|a, b| a.id.cmp(&b.id));
        inventory.archived.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(inventory)
    }

    async fn capacity(&self, parameters: &BTreeMap<String, String>) -> Result<u64, BackendError> {
        let (server, share) = params::export(parameters, self.has_default())?;
        let export = self.export(&server, &share).await?;
        let stat = export.client.fsstat().await.map_err(map_error)?;
        Ok(stat.avail_bytes)
    }

    fn can_clone(&self) -> bool {
        true
    }

    fn can_expand(&self) -> bool {
        true
    }

    /// NFS has no quota: the new capacity is recorded (what ListVolumes and the PV
    /// say), nothing stops a volume from using more, and the node has nothing to grow.
    async fn expand_volume(
        &self,
        volume_id: &str,
        capacity: CapacityRange,
    ) -> Result<(u64, bool), BackendError> {
        let id = NfsVolumeId::parse(volume_id).map_err(BackendError::InvalidParameter)?;
        let export = self.export(&id.server, &id.share).await?;
        let record = export
            .lookup(&id.name)
            .await?
            .filter(|r| NfsVolumeId::new(&id.name, &r.placement) == id);
        let Some(record) = record else {
            // A directory without a record (a static volume): nothing to record.
            return match export
                .client
                .stat(&components(&id.sub_dir))
                .await
                .map_err(map_error)?
            {
                Some(attr) if attr.is_dir() => Ok((capacity.required, false)),
                _ => Err(BackendError::NotFound(format!(
                    "volume {volume_id} does not exist"
                ))),
            };
        };
        if record.capacity_bytes >= capacity.required {
            return Ok((record.capacity_bytes, false));
        }
        let grown = Record {
            capacity_bytes: capacity.required,
            ..record
        };
        export.update(&id.name, &grown).await?;
        Ok((grown.capacity_bytes, false))
    }

    fn can_snapshot(&self) -> bool {
        true
    }

    fn owns_snapshot(&self, snapshot_id: &str) -> bool {
        SnapshotId::is_nfs(snapshot_id)
    }

    /// A copy of the volume's tree (see `snapshots`), made in the background: ready
    /// at once for a small volume, else `ready: false` until a later call finds it done.
    async fn create_snapshot(
        &self,
        source_volume_id: &str,
        name: &str,
        parameters: &BTreeMap<String, String>,
    ) -> Result<Snapshot, BackendError> {
        if let Some(key) = parameters.keys().find(|k| !k.starts_with(RESERVED_PREFIX)) {
            return Err(BackendError::InvalidParameter(format!(
                "VolumeSnapshotClass parameter `{key}` is not known: NFS snapshots take no parameters"
            )));
        }
        snapshots::check_name(name)
            .map_err(|e| BackendError::InvalidParameter(format!("snapshot name: {e}")))?;
        let source =
            NfsVolumeId::parse(source_volume_id).map_err(BackendError::InvalidParameter)?;
        let export = self.export(&source.server, &source.share).await?;
        let sid = SnapshotId {
            server: source.server.clone(),
            share: source.share.clone(),
            name: name.to_owned(),
        };
        let snapshot = |record: &SnapshotRecord, ready: bool| Snapshot {
            id: sid.encode(),
            source_volume_id: record.source_volume_id.clone(),
            size_bytes: record.size_bytes,
            created: record.created,
            ready,
        };
        let other_source = |other: &str| {
            BackendError::AlreadyExists(format!(
                "snapshot {name} already exists of volume {other}, not of {source_volume_id}"
            ))
        };
        let key = copy_key("snapshot", &sid.server, &sid.share, name);
        if self.copies.get(&key).is_none()
            && let Some(record) = read_snapshot_record(&export.client, &sid).await?
        {
            if record.source_volume_id != source_volume_id {
                return Err(other_source(&record.source_volume_id));
            }
            return Ok(snapshot(&record, true));
        }
        match export
            .client
            .stat(&components(&source.sub_dir))
            .await
            .map_err(map_error)?
        {
            Some(attr) if attr.is_dir() => {}
            _ => {
                return Err(BackendError::NotFound(format!(
                    "volume {source_volume_id} does not exist"
                )));
            }
        }
        let size = export
            .lookup(&source.name)
            .await?
            .filter(|r| r.placement.sub_dir == source.sub_dir)
            .map(|r| r.capacity_bytes);
        let (job_export, job_sid, from) =
            (Arc::clone(&export), sid.clone(), source.sub_dir.clone());
        let source_id = source_volume_id.to_owned();
        let copy = self
            .copies
            .start_or_join(
                &key,
                source_volume_id,
                move |progress, started| async move {
                    make_snapshot(
                        &job_export,
                        &job_sid,
                        &from,
                        &source_id,
                        size,
                        started,
                        &progress,
                    )
                    .await
                },
            )
            .map_err(|other| other_source(&other))?;
        let started = copy.started;
        match self.copies.wait(&key, &copy, self.config.copy_wait).await {
            Waited::Done => {
                let record = read_snapshot_record(&export.client, &sid)
                    .await?
                    .ok_or_else(|| {
                        BackendError::Internal(format!(
                            "snapshot {name} was copied but its record is missing"
                        ))
                    })?;
                Ok(snapshot(&record, true))
            }
            Waited::Failed(e) => Err(e),
            Waited::Running(copied) => Ok(snapshot(
                &SnapshotRecord {
                    source_volume_id: source_volume_id.to_owned(),
                    size_bytes: size.unwrap_or(copied),
                    created: started,
                },
                false,
            )),
        }
    }

    /// Stops a copy still under way, then removes the snapshot and any scratch copy
    /// of it. Refused while a volume is being restored from it.
    async fn delete_snapshot(&self, snapshot_id: &str) -> Result<(), BackendError> {
        let sid = SnapshotId::parse(snapshot_id).map_err(BackendError::InvalidParameter)?;
        let restoring = self
            .copies
            .under_way(&copy_key("clone", &sid.server, &sid.share, ""))
            .into_iter()
            .find(|(_, copy)| copy.source == snapshot_id);
        if let Some((key, _)) = restoring {
            return Err(BackendError::InUse(format!(
                "snapshot {snapshot_id} is being restored ({key}); delete it once that is done"
            )));
        }
        let export = self.export(&sid.server, &sid.share).await?;
        self.copies
            .cancel(&copy_key("snapshot", &sid.server, &sid.share, &sid.name))
            .await;
        let scratch = sid.scratch_name();
        export
            .client
            .remove_all(&[WORK_DIR, &scratch])
            .await
            .map_err(map_error)?;
        export
            .client
            .remove_all(&sid.dir())
            .await
            .map_err(map_error)?;
        Ok(())
    }

    /// Finished snapshots on every export in use, and those still being copied.
    async fn list_snapshots(&self) -> Result<Vec<Snapshot>, BackendError> {
        let mut found = Vec::new();
        for export in self.exports_in_use() {
            let target = export.client.target();
            let (server, share) = if self
                .default_export
                .as_ref()
                .is_some_and(|d| Arc::ptr_eq(d, &export))
            {
                (String::new(), String::new())
            } else {
                self.exports
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .iter()
                    .find(|(_, e)| Arc::ptr_eq(e, &export))
                    .map(|((server, share), _)| (server.clone(), share.clone()))
                    .unwrap_or_else(|| (target.server.to_string(), target.share.clone()))
            };
            let names = export
                .client
                .read_dir(&[SNAPSHOTS_DIR])
                .await
                .map_err(map_error)?
                .unwrap_or_default();
            for name in names {
                let sid = SnapshotId {
                    server: server.clone(),
                    share: share.clone(),
                    name,
                };
                if let Some(record) = read_snapshot_record(&export.client, &sid).await? {
                    found.push(Snapshot {
                        id: sid.encode(),
                        source_volume_id: record.source_volume_id,
                        size_bytes: record.size_bytes,
                        created: record.created,
                        ready: true,
                    });
                }
            }
        }
        for (key, copy) in self.copies.under_way("snapshot ") {
            let mut parts = key.splitn(4, ' ').skip(1);
            let (Some(server), Some(share), Some(name)) =
                (parts.next(), parts.next(), parts.next())
            else {
                continue;
            };
            let sid = SnapshotId {
                server: server.to_owned(),
                share: share.to_owned(),
                name: name.to_owned(),
            };
            if !found.iter().any(|s| s.id == sid.encode()) {
                found.push(Snapshot {
                    id: sid.encode(),
                    source_volume_id: copy.source.clone(),
                    size_bytes: copy.copied(),
                    created: copy.started,
                    ready: false,
                });
            }
        }
        Ok(found)
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

/// The key of a copy: `<kind> <server> <share> <name>` (empty server and share: the
/// default export).
fn copy_key(kind: &str, server: &str, share: &str, name: &str) -> String {
    format!("{kind} {server} {share} {name}")
}

/// `.stowage-work/clone-<name>`'s last component.
fn clone_scratch(name: &str) -> String {
    format!("clone-{name}")
}

/// A finished snapshot's record; `None` when there is no such snapshot.
async fn read_snapshot_record(
    client: &NfsClient,
    sid: &SnapshotId,
) -> Result<Option<SnapshotRecord>, BackendError> {
    match client.readlink(&sid.record()).await {
        Ok(Some(text)) => SnapshotRecord::decode(&text).map(Some),
        Ok(None) | Err(NfsError::NotADirectory { .. }) => Ok(None),
        Err(e) => Err(map_error(e)),
    }
}

/// Copy `from` into `.stowage-work/snapshot-<name>/data`, write its record beside
/// it, rename the whole into `.stowage-snapshots/<name>`. What a crash leaves in the
/// scratch directory is removed first.
async fn make_snapshot(
    export: &Export,
    sid: &SnapshotId,
    from: &[String],
    source_volume_id: &str,
    size: Option<u64>,
    created: (i64, i32),
    progress: &std::sync::atomic::AtomicU64,
) -> Result<(), BackendError> {
    let client = &export.client;
    let scratch_name = sid.scratch_name();
    let scratch = [WORK_DIR, scratch_name.as_str()];
    client.remove_all(&scratch).await.map_err(map_error)?;
    client
        .create_dir_all(&scratch, 0o700, None)
        .await
        .map_err(map_error)?;
    let copied = client
        .copy_tree(
            &components(from),
            &[WORK_DIR, &scratch_name, DATA],
            progress,
        )
        .await
        .map_err(map_error)?;
    let record = SnapshotRecord {
        source_volume_id: source_volume_id.to_owned(),
        size_bytes: size.unwrap_or(copied.bytes),
        created,
    };
    client
        .symlink(&[WORK_DIR, &scratch_name, RECORD], &record.encode())
        .await
        .map_err(map_error)?;
    client
        .create_dir_all(&[SNAPSHOTS_DIR], 0o700, None)
        .await
        .map_err(map_error)?;
    client
        .rename(&scratch, &sid.dir())
        .await
        .map_err(map_error)?;
    tracing::info!(
        snapshot = %sid.encode(),
        files = copied.files,
        bytes = copied.bytes,
        skipped = copied.skipped,
        "snapshot copied"
    );
    Ok(())
}

/// Copy `from` into `.stowage-work/clone-<name>`, rename it into the volume's place
/// and record the volume. A directory already in that place is the rename of an
/// earlier attempt that crashed before its record: adopted.
async fn clone_into_place(
    export: &Export,
    from: &[String],
    name: &str,
    record: &Record,
    progress: &std::sync::atomic::AtomicU64,
) -> Result<(), BackendError> {
    let client = &export.client;
    let placement = &record.placement;
    let to = components(&placement.sub_dir);
    match client.stat(&to).await.map_err(map_error)? {
        Some(attr) if attr.is_dir() => {}
        Some(_) => {
            return Err(BackendError::AlreadyExists(format!(
                "{} exists on the export and is not a directory",
                placement.sub_dir.join("/")
            )));
        }
        None => {
            let scratch_name = clone_scratch(name);
            let scratch = [WORK_DIR, scratch_name.as_str()];
            client.remove_all(&scratch).await.map_err(map_error)?;
            client
                .create_dir_all(&[WORK_DIR], 0o700, None)
                .await
                .map_err(map_error)?;
            let copied = client
                .copy_tree(&components(from), &scratch, progress)
                .await
                .map_err(map_error)?;
            if let Some((_, parent)) = to.split_last()
                && !parent.is_empty()
            {
                client
                    .create_dir_all(parent, placement.mode, placement.owner)
                    .await
                    .map_err(map_error)?;
            }
            client.rename(&scratch, &to).await.map_err(map_error)?;
            tracing::info!(
                volume = name,
                files = copied.files,
                bytes = copied.bytes,
                "volume copied"
            );
        }
    }
    match export.create(name, record).await? {
        None => Ok(()),
        Some(existing) if existing == *record => Ok(()),
        Some(existing) => Err(BackendError::AlreadyExists(format!(
            "volume {name} already exists with other parameters ({existing:?})"
        ))),
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
