//! The EBS backend: one EC2 volume per CSI volume, attached to the node's instance on
//! ControllerPublish and found, formatted and mounted by the node.
//!
//! - `params`: StorageClass keys (as aws-ebs-csi-driver names them) → a checked
//!   [`params::EbsSpec`]; every EC2 rule is enforced here, before any call.
//! - `cloud`: every EC2 call, error mapping, call counting, the batched waiter.
//! - `metadata`: who this node is on EC2 (flags, else IMDSv2) and its attach limit.
//!
//! Idempotent by name without trusting EC2: volumes carry `CSIVolumeName` and cluster
//! tags; the cluster's volumes are read once into an index (one DescribeVolumes), so a
//! repeated CreateVolume finds the volume with no call, and a different size or type
//! is ALREADY_EXISTS. The ClientToken derived from the name makes real EC2 answer a
//! retry after a crash with the same volume too. Volume ids are EC2's (`vol-…`).
//! This module must not import tonic or kube.

pub mod cloud;
pub mod metadata;
pub mod params;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;

use self::cloud::{Cloud, CloudVolume, Want};
use self::params::{EbsSpec, FsOptions};
use super::{Backend, BackendError, Held, Inventory, InventoryHints, NodeSource};
use stowage_api::volume::{
    AccessType, Bytes, Capability, CapacityRange, ContentSource, CreateRequest, GIB, Segments,
    Snapshot, Volume,
};

/// The topology key for the zone (what Kubernetes nodes are labelled with).
pub const ZONE_KEY: &str = "topology.kubernetes.io/zone";
/// Tag recording the snapshot a volume was created from.
const SOURCE_SNAPSHOT_TAG: &str = "stowage.csi.dev/source-snapshot";
/// Tag on a volume cloned from another: the source volume's id.
const SOURCE_VOLUME_TAG: &str = "stowage.csi.dev/source-volume";
/// Name of the snapshot a clone goes through where EC2 offers no CopyVolumes.
fn clone_snapshot_name(volume_name: &str) -> String {
    format!("clone-{volume_name}")
}
/// publish_context key with the device name ControllerPublish attached the volume as.
pub const DEVICE_PATH_KEY: &str = "devicePath";

/// Device names handed out for attachments, in order (as EC2 Linux instances use).
fn device_candidates() -> impl Iterator<Item = String> {
    ('b'..='z').flat_map(|a| ('a'..='z').map(move |b| format!("/dev/xvd{a}{b}")))
}

pub struct EbsBackend {
    cloud: Arc<Cloud>,
    default_zone: Option<String>,
    /// name → volume, read from EC2 (cluster tag) on first use.
    index: tokio::sync::OnceCell<Mutex<HashMap<String, CloudVolume>>>,
    /// Device names being attached per instance, not yet visible in EC2.
    reserved: Mutex<HashMap<String, HashSet<String>>>,
    /// Names whose CreateVolume failed without a clear answer (timeout, transport
    /// error): EC2 may have created the volume, so the next attempt asks EC2 by name
    /// instead of trusting the index.
    uncertain: Mutex<HashSet<String>>,
    /// EC2 answered that it offers no CopyVolumes: clones go through a snapshot.
    no_copy_volumes: std::sync::atomic::AtomicBool,
}

impl EbsBackend {
    pub fn new(cloud: Arc<Cloud>, default_zone: Option<String>) -> Self {
        Self {
            cloud,
            default_zone,
            index: tokio::sync::OnceCell::new(),
            reserved: Mutex::new(HashMap::new()),
            uncertain: Mutex::new(HashSet::new()),
            no_copy_volumes: std::sync::atomic::AtomicBool::new(false),
        }
    }

    pub fn cloud(&self) -> &Arc<Cloud> {
        &self.cloud
    }

    async fn index(&self) -> Result<&Mutex<HashMap<String, CloudVolume>>, BackendError> {
        self.index
            .get_or_try_init(|| async {
                let volumes = self.cloud.cluster_volumes().await?;
                let index = volumes
                    .into_iter()
                    .filter_map(|v| Some((v.name.clone()?, v)))
                    .collect();
                Ok(Mutex::new(index))
            })
            .await
    }

    fn remember(index: &Mutex<HashMap<String, CloudVolume>>, volume: &CloudVolume) {
        if let Some(name) = &volume.name {
            index
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(name.clone(), volume.clone());
        }
    }

    /// The zone for a new volume: first preferred, else first requisite, else the default.
    fn zone(&self, request: &CreateRequest) -> Result<String, BackendError> {
        let from = |list: &[Segments]| list.iter().find_map(|s| s.get(ZONE_KEY).cloned());
        from(&request.accessibility.preferred)
            .or_else(|| from(&request.accessibility.requisite))
            .or_else(|| self.default_zone.clone())
            .ok_or_else(|| {
                BackendError::InvalidParameter(format!(
                    "no zone for the volume: the request has no {ZONE_KEY} topology and no --zone default is set"
                ))
            })
    }

    /// A clone is made in its source's zone; the request's topology must allow it.
    fn clone_zone(request: &CreateRequest, source: &CloudVolume) -> Result<String, BackendError> {
        let zones: Vec<&String> = request
            .accessibility
            .requisite
            .iter()
            .filter_map(|s| s.get(ZONE_KEY))
            .collect();
        if !zones.is_empty() && !zones.contains(&&source.zone) {
            return Err(BackendError::InvalidParameter(format!(
                "volume {} is in zone {}; its clone is made there, but the request allows only {}",
                source.id,
                source.zone,
                zones
                    .iter()
                    .map(|z| z.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        }
        Ok(source.zone.clone())
    }

    /// A copy of `source` named `name`: CopyVolumes where EC2 offers it (instant, in
    /// the source's zone), else a snapshot of the source (`clone-<name>`, reused by a
    /// retry) and a volume from it. A snapshot still pending is UNAVAILABLE: the caller
    /// retries, and finds the same snapshot.
    async fn clone_volume(
        &self,
        name: &str,
        spec: &EbsSpec,
        source: &CloudVolume,
    ) -> Result<CloudVolume, BackendError> {
        if !self.no_copy_volumes.load(Ordering::Relaxed) {
            match self.cloud.copy_volume(source, name, spec).await? {
                Some(copy) => return Ok(copy),
                None => self.no_copy_volumes.store(true, Ordering::Relaxed),
            }
        }
        let snapshot_name = clone_snapshot_name(name);
        let existing = self
            .cloud
            .snapshots(Some(&snapshot_name))
            .await?
            .into_iter()
            .find(|s| s.volume_id == source.id);
        let snapshot = match existing {
            Some(snapshot) => snapshot,
            None => {
                self.cloud
                    .create_snapshot(&source.id, &snapshot_name)
                    .await?
            }
        };
        if !snapshot.ready() {
            return Err(BackendError::Unavailable(format!(
                "cloning volume {} through snapshot {}, which is {}; retry",
                source.id, snapshot.id, snapshot.state
            )));
        }
        self.cloud
            .create(name, spec, &source.zone, Some(&snapshot.id))
            .await
    }

    /// Delete the snapshot a clone went through (best effort: a leftover is only space,
    /// and the next CreateVolume of the same name tries again).
    async fn forget_clone_snapshot(&self, name: &str) {
        let snapshot_name = clone_snapshot_name(name);
        match self.cloud.snapshots(Some(&snapshot_name)).await {
            Ok(snapshots) => {
                for snapshot in snapshots {
                    if let Err(e) = self.cloud.delete_snapshot(&snapshot.id).await {
                        tracing::warn!(snapshot = %snapshot.id, error = %e, "could not delete the snapshot a clone went through");
                    }
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "could not list the snapshot a clone went through")
            }
        }
    }

    fn volume(volume: &CloudVolume, fs: &FsOptions) -> Volume {
        Volume {
            id: volume.id.clone(),
            capacity_bytes: volume.size_gib * GIB,
            context: fs.to_context(),
            topology: vec![Segments::from([(ZONE_KEY.to_owned(), volume.zone.clone())])],
            source: match (
                volume.tags.get(SOURCE_SNAPSHOT_TAG),
                volume.tags.get(SOURCE_VOLUME_TAG),
            ) {
                (Some(snapshot), _) => Some(ContentSource::Snapshot(snapshot.clone())),
                (None, Some(source)) => Some(ContentSource::Volume(source.clone())),
                (None, None) => None,
            },
        }
    }

    /// Does an existing volume match what the request asks for?
    fn check_existing(
        name: &str,
        existing: &CloudVolume,
        spec: &EbsSpec,
        zone: &str,
    ) -> Result<(), BackendError> {
        let mut differences = Vec::new();
        if existing.size_gib != spec.size_gib {
            differences.push(format!(
                "size {} GiB (asked {} GiB)",
                existing.size_gib, spec.size_gib
            ));
        }
        if existing.volume_type != spec.volume_type.as_str() {
            differences.push(format!(
                "type {} (asked {})",
                existing.volume_type,
                spec.volume_type.as_str()
            ));
        }
        if spec.iops.is_some() && existing.iops != spec.iops {
            differences.push(format!("iops {:?} (asked {:?})", existing.iops, spec.iops));
        }
        if spec.throughput_mibps.is_some() && existing.throughput != spec.throughput_mibps {
            differences.push(format!(
                "throughput {:?} (asked {:?})",
                existing.throughput, spec.throughput_mibps
            ));
        }
        if existing.encrypted != spec.encrypted {
            differences.push(format!(
                "encrypted {} (asked {})",
                existing.encrypted, spec.encrypted
            ));
        }
        if existing.zone != zone {
            differences.push(format!("zone {} (asked {zone})", existing.zone));
        }
        if differences.is_empty() {
            Ok(())
        } else {
            Err(BackendError::AlreadyExists(format!(
                "volume {name} already exists as {} with {}; delete it or use another name",
                existing.id,
                differences.join(", ")
            )))
        }
    }

    /// Pick a device name free on `instance` and reserve it until released.
    async fn reserve_device(&self, instance: &str) -> Result<String, BackendError> {
        let in_use: HashSet<String> = self
            .cloud
            .instance_devices(instance)
            .await?
            .into_iter()
            .collect();
        let mut reserved = self.reserved.lock().unwrap_or_else(|e| e.into_inner());
        let taken = reserved.entry(instance.to_owned()).or_default();
        let device = device_candidates()
            .find(|d| !in_use.contains(d) && !taken.contains(d))
            .ok_or_else(|| {
                BackendError::Exhausted(format!("instance {instance} has no free device name left"))
            })?;
        taken.insert(device.clone());
        Ok(device)
    }

    fn release_device(&self, instance: &str, device: &str) {
        let mut reserved = self.reserved.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(taken) = reserved.get_mut(instance) {
            taken.remove(device);
        }
    }
}

fn to_snapshot(snapshot: &cloud::CloudSnapshot) -> Snapshot {
    Snapshot {
        id: snapshot.id.clone(),
        source_volume_id: snapshot.volume_id.clone(),
        size_bytes: snapshot.size_gib * GIB,
        created: snapshot.started,
        ready: snapshot.ready(),
    }
}

fn capability_fs_type(capabilities: &[Capability]) -> Option<&str> {
    capabilities.iter().find_map(|c| match &c.access_type {
        AccessType::Mount { fs_type, .. } => fs_type.as_deref(),
        AccessType::Block => None,
    })
}

#[async_trait]
impl Backend for EbsBackend {
    fn kind(&self) -> &'static str {
        "ebs"
    }

    async fn check(&self) -> Result<String, String> {
        self.cloud
            .zones()
            .await
            .map(|zones| format!("EC2 answered ({} zones)", zones.len()))
            .map_err(|e| format!("EC2 does not answer: {e}"))
    }

    fn owns(&self, volume_id: &str) -> bool {
        volume_id.starts_with("vol-")
    }

    fn needs_attach(&self) -> bool {
        true
    }

    fn needs_stage(&self) -> bool {
        true
    }

    fn can_expand(&self) -> bool {
        true
    }

    fn expands_on_node(&self) -> bool {
        true
    }

    fn can_clone(&self) -> bool {
        true
    }

    fn api_calls(&self) -> BTreeMap<String, u64> {
        self.cloud.call_counts()
    }

    fn can_snapshot(&self) -> bool {
        true
    }

    fn can_modify(&self) -> bool {
        true
    }

    async fn modify_volume(
        &self,
        volume_id: &str,
        mutable: &BTreeMap<String, String>,
    ) -> Result<(), BackendError> {
        const MUTABLE: [&str; 3] = ["type", "iops", "throughput"];
        if let Some(key) = mutable.keys().find(|k| !MUTABLE.contains(&k.as_str())) {
            return Err(BackendError::InvalidParameter(format!(
                "mutable parameter `{key}` is not known (known: type, iops, throughput)"
            )));
        }
        let volume =
            self.cloud.get(volume_id).await?.ok_or_else(|| {
                BackendError::NotFound(format!("volume {volume_id} does not exist"))
            })?;
        if mutable.is_empty() {
            return Ok(());
        }
        // Check the result against the same rules as a new volume of this size.
        let mut parameters = mutable.clone();
        parameters
            .entry("type".to_owned())
            .or_insert_with(|| volume.volume_type.clone());
        let size = volume.size_gib * GIB;
        let spec = params::spec(
            CapacityRange {
                required: size,
                limit: Some(size),
            },
            &parameters,
            None,
        )?;
        self.cloud
            .modify(
                volume_id,
                spec.volume_type.as_str(),
                spec.iops,
                spec.throughput_mibps,
            )
            .await
    }

    fn owns_snapshot(&self, snapshot_id: &str) -> bool {
        snapshot_id.starts_with("snap-")
    }

    async fn create_snapshot(
        &self,
        source_volume_id: &str,
        name: &str,
        parameters: &BTreeMap<String, String>,
    ) -> Result<Snapshot, BackendError> {
        if let Some(key) = parameters
            .keys()
            .find(|k| !k.starts_with(stowage_api::keys::RESERVED_PREFIX))
        {
            return Err(BackendError::InvalidParameter(format!(
                "VolumeSnapshotClass parameter `{key}` is not known (EBS snapshots take none)"
            )));
        }
        let snapshot = match self.cloud.snapshots(Some(name)).await?.into_iter().next() {
            Some(existing) if existing.volume_id == source_volume_id => existing,
            Some(existing) => {
                return Err(BackendError::AlreadyExists(format!(
                    "snapshot {name} already exists as {} of volume {}",
                    existing.id, existing.volume_id
                )));
            }
            None => {
                if self.cloud.get(source_volume_id).await?.is_none() {
                    return Err(BackendError::NotFound(format!(
                        "volume {source_volume_id} does not exist"
                    )));
                }
                self.cloud.create_snapshot(source_volume_id, name).await?
            }
        };
        Ok(to_snapshot(&snapshot))
    }

    async fn delete_snapshot(&self, snapshot_id: &str) -> Result<(), BackendError> {
        self.cloud.delete_snapshot(snapshot_id).await
    }

    async fn list_snapshots(&self) -> Result<Vec<Snapshot>, BackendError> {
        Ok(self
            .cloud
            .snapshots(None)
            .await?
            .iter()
            .map(to_snapshot)
            .collect())
    }

    async fn expand_volume(
        &self,
        volume_id: &str,
        capacity: CapacityRange,
    ) -> Result<(u64, bool), BackendError> {
        let volume =
            self.cloud.get(volume_id).await?.ok_or_else(|| {
                BackendError::NotFound(format!("volume {volume_id} does not exist"))
            })?;
        let wanted = capacity.required.div_ceil(GIB).max(1);
        if let Some(limit) = capacity.limit
            && wanted * GIB > limit
        {
            return Err(BackendError::OutOfRange(format!(
                "volume {volume_id}: {wanted} GiB (whole GiB) exceeds limit_bytes {limit}"
            )));
        }
        if volume.size_gib >= wanted {
            return Ok((volume.size_gib * GIB, true));
        }
        params::check_size(&volume.volume_type, wanted)?;
        self.cloud.resize(volume_id, wanted).await?;
        let grown = self
            .cloud
            .wait(volume_id, Want::SizeAtLeast(wanted))
            .await?;
        if let Some(index) = self.index.get() {
            Self::remember(index, &grown);
        }
        Ok((grown.size_gib * GIB, true))
    }

    fn supports(&self, capability: &Capability) -> Result<(), String> {
        use stowage_api::volume::AccessMode::*;
        match capability.access_mode {
            SingleNodeWriter
            | SingleNodeReaderOnly
            | SingleNodeSingleWriter
            | SingleNodeMultiWriter => Ok(()),
            other => Err(format!(
                "EBS volumes attach to one node at a time: access mode {other:?} is not supported (use ReadWriteOnce or ReadWriteOncePod)"
            )),
        }
    }

    async fn create_volume(&self, request: &CreateRequest) -> Result<Volume, BackendError> {
        let mut spec = params::spec(
            request.capacity,
            &request.parameters,
            capability_fs_type(&request.capabilities),
        )?;
        let (source_snapshot, source_volume) = match &request.source {
            None => (None, None),
            Some(ContentSource::Snapshot(id)) => (Some(id.clone()), None),
            Some(ContentSource::Volume(id)) => {
                let source =
                    self.cloud.get(id).await?.ok_or_else(|| {
                        BackendError::NotFound(format!("volume {id} does not exist"))
                    })?;
                (None, Some(source))
            }
        };
        if let Some(source) = &source_volume {
            // A clone is at least as large as its source.
            if let Some(limit) = request.capacity.limit
                && limit < source.size_gib * GIB
            {
                return Err(BackendError::OutOfRange(format!(
                    "volume {} holds {} GiB; a clone of it can't be smaller (asked at most {})",
                    source.id,
                    source.size_gib,
                    Bytes(limit)
                )));
            }
            spec.size_gib = spec.size_gib.max(source.size_gib);
            spec.tags
                .insert(SOURCE_VOLUME_TAG.to_owned(), source.id.clone());
        }
        if let Some(snapshot_id) = &source_snapshot {
            let snapshot = self.cloud.snapshot(snapshot_id).await?.ok_or_else(|| {
                BackendError::NotFound(format!("snapshot {snapshot_id} does not exist"))
            })?;
            if !snapshot.ready() {
                return Err(BackendError::Unavailable(format!(
                    "snapshot {snapshot_id} is {}; retry when it is completed",
                    snapshot.state
                )));
            }
            // A volume from a snapshot is at least as large as the snapshot.
            spec.size_gib = spec.size_gib.max(snapshot.size_gib);
            spec.tags
                .insert(SOURCE_SNAPSHOT_TAG.to_owned(), snapshot_id.clone());
        }
        let block = request
            .capabilities
            .iter()
            .any(|c| c.access_type == AccessType::Block);
        let fs = &spec.fs;
        if block
            && (fs.block_size.is_some()
                || fs.inode_size.is_some()
                || fs.bytes_per_inode.is_some()
                || fs.number_of_inodes.is_some())
        {
            return Err(BackendError::InvalidParameter(
                "blockSize, inodeSize, bytesPerInode and numberOfInodes format a filesystem; a raw block volume (volumeMode: Block) has none".into(),
            ));
        }
        let zone = match &source_volume {
            Some(source) => Self::clone_zone(request, source)?,
            None => self.zone(request)?,
        };
        let index = self.index().await?;
        let mut known = index
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&request.name)
            .cloned();
        let uncertain = self
            .uncertain
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains(&request.name);
        if known.is_none() && uncertain {
            known = self.cloud.find_by_name(&request.name).await?;
            if let Some(found) = &known {
                Self::remember(index, found);
            }
            self.uncertain
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&request.name);
        }
        let volume = match known {
            Some(existing) => {
                Self::check_existing(&request.name, &existing, &spec, &zone)?;
                existing
            }
            None => {
                let created = match &source_volume {
                    Some(source) => self.clone_volume(&request.name, &spec, source).await,
                    None => {
                        self.cloud
                            .create(&request.name, &spec, &zone, source_snapshot.as_deref())
                            .await
                    }
                };
                match created {
                    Ok(created) => {
                        Self::remember(index, &created);
                        created
                    }
                    Err(e) => {
                        if matches!(
                            e,
                            BackendError::Timeout(_)
                                | BackendError::Unavailable(_)
                                | BackendError::Internal(_)
                        ) {
                            self.uncertain
                                .lock()
                                .unwrap_or_else(|e| e.into_inner())
                                .insert(request.name.clone());
                        }
                        return Err(e);
                    }
                }
            }
        };
        let volume = if volume.state == "available" || volume.state == "in-use" {
            volume
        } else {
            let ready = self.cloud.wait(&volume.id, Want::Available).await?;
            Self::remember(index, &ready);
            ready
        };
        if source_volume.is_some() && self.no_copy_volumes.load(Ordering::Relaxed) {
            self.forget_clone_snapshot(&request.name).await;
        }
        let mut result = Self::volume(&volume, &spec.fs);
        if result.source.is_none() {
            result.source = request.source.clone();
        }
        Ok(result)
    }

    async fn delete_volume(&self, volume_id: &str) -> Result<(), BackendError> {
        self.cloud.delete(volume_id).await?;
        if let Some(index) = self.index.get() {
            index
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .retain(|_, v| v.id != volume_id);
        }
        Ok(())
    }

    async fn get_volume(&self, volume_id: &str) -> Result<Option<Volume>, BackendError> {
        Ok(self
            .cloud
            .get(volume_id)
            .await?
            .map(|v| Self::volume(&v, &FsOptions::default())))
    }

    async fn list_volumes(&self) -> Result<Vec<Volume>, BackendError> {
        let mut volumes: Vec<Volume> = self
            .cloud
            .cluster_volumes()
            .await?
            .iter()
            .map(|v| Self::volume(v, &FsOptions::default()))
            .collect();
        volumes.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(volumes)
    }

    async fn inventory(&self, _hints: &InventoryHints) -> Result<Inventory, BackendError> {
        let volumes = self
            .cloud
            .cluster_volumes()
            .await?
            .into_iter()
            .map(|v| Held {
                name: v.name.clone().unwrap_or_default(),
                capacity_bytes: v.size_gib.saturating_mul(GIB),
                created: v.created,
                place: v.zone.clone(),
                id: v.id,
            })
            .collect();
        Ok(Inventory {
            volumes,
            archived: vec![],
        })
    }

    async fn capacity(&self, _parameters: &BTreeMap<String, String>) -> Result<u64, BackendError> {
        // EBS has no pool to run out of that EC2 reports; "unbounded".
        Ok(i64::MAX as u64)
    }

    async fn controller_publish(
        &self,
        volume_id: &str,
        node_id: &str,
    ) -> Result<BTreeMap<String, String>, BackendError> {
        let volume =
            self.cloud.get(volume_id).await?.ok_or_else(|| {
                BackendError::NotFound(format!("volume {volume_id} does not exist"))
            })?;
        if let Some(device) = volume.attached_to(node_id) {
            return Ok(BTreeMap::from([(
                DEVICE_PATH_KEY.to_owned(),
                device.to_owned(),
            )]));
        }
        if let Some((other, _, state)) = volume.attachments.iter().find(|(i, _, _)| i != node_id) {
            return Err(BackendError::InUse(format!(
                "volume {volume_id} is {state} to instance {other}; EBS volumes attach to one node at a time"
            )));
        }
        let device = self.reserve_device(node_id).await?;
        let attached = async {
            self.cloud.attach(volume_id, node_id, &device).await?;
            self.cloud
                .wait(volume_id, Want::AttachedTo(node_id.to_owned()))
                .await
        }
        .await;
        self.release_device(node_id, &device);
        let attached = attached?;
        let device = attached.attached_to(node_id).unwrap_or(&device).to_owned();
        Ok(BTreeMap::from([(DEVICE_PATH_KEY.to_owned(), device)]))
    }

    async fn controller_unpublish(
        &self,
        volume_id: &str,
        node_id: &str,
    ) -> Result<(), BackendError> {
        let Some(volume) = self.cloud.get(volume_id).await? else {
            return Ok(());
        };
        if !volume.attachments.iter().any(|(i, _, _)| i == node_id) {
            return Ok(());
        }
        match self.cloud.detach(volume_id, node_id).await {
            Ok(()) | Err(BackendError::NotFound(_)) => {}
            Err(BackendError::InUse(_)) => {} // already detaching
            Err(e) => return Err(e),
        }
        match self
            .cloud
            .wait(volume_id, Want::DetachedFrom(node_id.to_owned()))
            .await
        {
            // Deleted while detaching: detached from everything, which is what was asked.
            Ok(_) | Err(BackendError::NotFound(_)) => Ok(()),
            Err(e) => Err(e),
        }
    }

    fn node_source(
        &self,
        volume_id: &str,
        context: &BTreeMap<String, String>,
        capability: &Capability,
    ) -> Result<NodeSource, BackendError> {
        if !self.owns(volume_id)
            || volume_id.len() > 64
            || !volume_id[4..].chars().all(|c| c.is_ascii_alphanumeric())
        {
            return Err(BackendError::NotFound(format!(
                "{volume_id:?} is not an EBS volume id"
            )));
        }
        let fs = FsOptions::from_context(
            context,
            capability_fs_type(std::slice::from_ref(capability)),
        )
        .map_err(BackendError::InvalidParameter)?;
        let mount_options = match &capability.access_type {
            AccessType::Mount { mount_flags, .. } => mount_flags.clone(),
            AccessType::Block => vec![],
        };
        Ok(NodeSource::Device {
            serial: volume_id.replace('-', ""),
            hint: context.get(DEVICE_PATH_KEY).cloned(),
            fs_type: fs.fs_type.as_str().to_owned(),
            mkfs_args: fs.mkfs_args(),
            mount_options,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_names_are_unique_and_linux_style() {
        let names: Vec<String> = device_candidates().collect();
        assert_eq!(names.first().map(String::as_str), Some("/dev/xvdba"));
        assert_eq!(names.len(), 25 * 26);
        let unique: HashSet<&String> = names.iter().collect();
        assert_eq!(unique.len(), names.len());
    }
}

/// Volume-context keys carrying the filesystem options from CreateVolume to the node.
mod fs_context {
    pub const FS_TYPE: &str = "fsType";
    pub const BLOCK_SIZE: &str = "blockSize";
    pub const INODE_SIZE: &str = "inodeSize";
    pub const BYTES_PER_INODE: &str = "bytesPerInode";
    pub const NUMBER_OF_INODES: &str = "numberOfInodes";
}

impl FsOptions {
    /// The options as volume-context entries (only those set).
    pub fn to_context(&self) -> BTreeMap<String, String> {
        use fs_context::*;
        let mut context = BTreeMap::from([(FS_TYPE.to_owned(), self.fs_type.as_str().to_owned())]);
        let mut put = |key: &str, value: Option<String>| {
            if let Some(value) = value {
                context.insert(key.to_owned(), value);
            }
        };
        put(BLOCK_SIZE, self.block_size.map(|v| v.to_string()));
        put(INODE_SIZE, self.inode_size.map(|v| v.to_string()));
        put(BYTES_PER_INODE, self.bytes_per_inode.map(|v| v.to_string()));
        put(
            NUMBER_OF_INODES,
            self.number_of_inodes.map(|v| v.to_string()),
        );
        context
    }

    /// Read the options back on the node; the capability's fs type is the fallback.
    pub fn from_context(
        context: &BTreeMap<String, String>,
        capability_fs_type: Option<&str>,
    ) -> Result<Self, String> {
        use fs_context::*;
        let fs_type = params::FsType::from_name(
            context
                .get(FS_TYPE)
                .map(String::as_str)
                .or(capability_fs_type)
                .unwrap_or_default(),
        )?;
        fn number<T: std::str::FromStr>(
            context: &BTreeMap<String, String>,
            key: &str,
        ) -> Result<Option<T>, String> {
            context
                .get(key)
                .map(|v| {
                    v.parse()
                        .map_err(|_| format!("volume context {key} {v:?} is not a number"))
                })
                .transpose()
        }
        Ok(Self {
            fs_type,
            block_size: number(context, BLOCK_SIZE)?,
            inode_size: number(context, INODE_SIZE)?,
            bytes_per_inode: number(context, BYTES_PER_INODE)?,
            number_of_inodes: number(context, NUMBER_OF_INODES)?,
        })
    }
}
