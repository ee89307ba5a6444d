//! CSI Node service: stage (find the attached device, format it if blank, mount it at
//! the staging path), publish (create the target, mount or bind into it), unpublish
//! (unmount, remove the target), unstage, volume stats, node info and capabilities.
//! The OS work goes through [`Mounter`] and `node::{device, format}`; what to mount
//! comes from the volume's backend. Stage, publish, unpublish, unstage and expand act
//! only on paths under kubelet's directory ([`NodeConfig::kubelet_dir`]), checked
//! lexically and again with symlinks resolved; they act on the resolved path.

use std::collections::BTreeMap;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use nix::fcntl::OFlag;
use tonic::{Request, Response, Status};

use super::inflight::InFlight;
use super::proto::{self, node_server::Node, node_service_capability as nsc};
use super::status::busy;
use super::{observe, validate};
use crate::backend::{Backends, NodeSource};
use crate::node::confine::{ConfineError, resolve_within};
use crate::node::{Mounter, TreeWalks, device, format, mount_points, usage_within};
use stowage_api::metrics::Metrics;
use stowage_api::volume::{AccessType, Capability, Segments};

/// kubelet's default root directory (its `--root-dir`).
pub const DEFAULT_KUBELET_DIR: &str = "/var/lib/kubelet";

/// How long NodeGetVolumeStats waits for statvfs (a hung NFS server blocks it) and
/// for a walk of a volume's directory before it answers with the last finished walk.
const STATS_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
/// How long resolving the symlinks along a node path may take.
const RESOLVE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// What the node reports about itself and where it finds devices.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    pub node_id: String,
    /// Topology segments of this node (e.g. its zone); `None` = no constraints.
    pub topology: Option<Segments>,
    /// Volumes that can be attached to this node; 0 = no limit reported.
    pub max_volumes: i64,
    /// Where attached block devices appear by serial (`/dev/disk/by-id`).
    pub by_id_dir: PathBuf,
    /// How long NodeStage/NodePublish look for an attached volume's device.
    pub device_wait: std::time::Duration,
    /// kubelet's root directory: the node service acts only on paths under it.
    pub kubelet_dir: PathBuf,
}

impl NodeConfig {
    pub fn new(node_id: impl Into<String>) -> Self {
        Self {
            node_id: node_id.into(),
            topology: None,
            max_volumes: 0,
            by_id_dir: PathBuf::from("/dev/disk/by-id"),
            device_wait: std::time::Duration::from_secs(30),
            kubelet_dir: PathBuf::from(DEFAULT_KUBELET_DIR),
        }
    }
}

pub struct NodeService {
    config: NodeConfig,
    backends: Backends,
    mounter: Arc<dyn Mounter>,
    inflight: InFlight,
    metrics: Arc<Metrics>,
    /// Usage walks of volumes that share a filesystem, by published path.
    walks: Arc<TreeWalks>,
}

impl NodeService {
    pub fn new(
        config: NodeConfig,
        backends: Backends,
        mounter: Arc<dyn Mounter>,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            config,
            backends,
            mounter,
            inflight: InFlight::default(),
            metrics,
            walks: Arc::default(),
        }
    }
}

fn internal(what: &str, error: impl std::fmt::Display) -> Status {
    Status::internal(format!("{what}: {error}"))
}

fn required_capability(capability: Option<&proto::VolumeCapability>) -> Result<Capability, Status> {
    capability
        .ok_or_else(|| Status::invalid_argument("volume_capability is required"))
        .and_then(validate::capability)
}

/// volume_context with publish_context merged in (publish wins).
fn merged(
    volume_context: &std::collections::HashMap<String, String>,
    publish_context: &std::collections::HashMap<String, String>,
) -> BTreeMap<String, String> {
    let mut context = validate::to_btree(volume_context);
    context.extend(validate::to_btree(publish_context));
    context
}

impl NodeService {
    /// A path the CO names for this node to act on: absolute without `.`/`..`, under
    /// the kubelet directory, and still under it with every symlink along it resolved
    /// (INVALID_ARGUMENT otherwise, before anything is touched). Returns the resolved
    /// path, the one to act on.
    async fn confined(&self, field: &'static str, value: &str) -> Result<PathBuf, Status> {
        let path = validate::node_path(field, value)?;
        let root = self.config.kubelet_dir.clone();
        let below = validate::under_root(field, &path, &root)?.to_path_buf();
        let resolve = tokio::task::spawn_blocking(move || {
            let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").map_err(|source| {
                ConfineError::Io {
                    path: "/proc/self/mountinfo".into(),
                    source,
                }
            })?;
            resolve_within(&root, &below, &mount_points(&mountinfo))
        });
        match tokio::time::timeout(RESOLVE_TIMEOUT, resolve).await {
            Ok(Ok(Ok(real))) => Ok(real),
            Ok(Ok(Err(e @ (ConfineError::Escapes { .. } | ConfineError::Dangling { .. })))) => {
                Err(Status::invalid_argument(format!("{field} {value:?}: {e}")))
            }
            Ok(Ok(Err(e @ ConfineError::Root { .. }))) => Err(Status::failed_precondition(
                format!("{field} {value:?}: {e}"),
            )),
            Ok(Ok(Err(e))) => Err(internal(&format!("resolving {field} {value:?}"), e)),
            Ok(Err(e)) => Err(internal(&format!("resolving {field} {value:?}"), e)),
            Err(_) => Err(Status::unavailable(format!(
                "resolving {field} {value:?} took longer than {RESOLVE_TIMEOUT:?}"
            ))),
        }
    }

    /// What the backend of `volume_id` says to mount; NOT_FOUND for unknown volumes.
    fn source(
        &self,
        volume_id: &str,
        context: &BTreeMap<String, String>,
        capability: &Capability,
    ) -> Result<NodeSource, Status> {
        let backend = self
            .backends
            .for_volume(volume_id)
            .ok_or_else(|| Status::not_found(format!("volume {volume_id} does not exist")))?;
        backend
            .supports(capability)
            .map_err(Status::invalid_argument)?;
        Ok(backend.node_source(volume_id, context, capability)?)
    }

    async fn is_mounted(&self, path: &Path) -> Result<bool, Status> {
        self.mounter
            .is_mounted(path)
            .await
            .map_err(|e| internal("reading the mount table", e))
    }

    /// Unmount every layer at `path`.
    async fn unmount_all(&self, path: &Path) -> Result<(), Status> {
        while self.is_mounted(path).await? {
            self.mounter
                .unmount(path)
                .await
                .map_err(|e| internal(&format!("unmounting {}", path.display()), e))?;
        }
        Ok(())
    }

    async fn find_device(
        &self,
        volume_id: &str,
        serial: &str,
        hint: Option<&str>,
    ) -> Result<PathBuf, Status> {
        // After ControllerPublish the device appears on the node a little later
        // (udev, the hypervisor): look until `device_wait` has passed.
        let deadline = tokio::time::Instant::now() + self.config.device_wait;
        let mut pause = std::time::Duration::from_millis(5);
        let found = loop {
            let found = device::find_device(&self.config.by_id_dir, serial, hint).await;
            if found.is_some() || tokio::time::Instant::now() >= deadline {
                break found;
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(std::time::Duration::from_millis(250));
        };
        found.ok_or_else(|| {
                Status::not_found(format!(
                    "no device for volume {volume_id} on this node (looked for {}/{}{serial} and {}); is it attached?",
                    self.config.by_id_dir.display(),
                    device::EBS_BY_ID_PREFIX,
                    hint.unwrap_or("no device hint")
                ))
            })
    }

    #[tracing::instrument(skip_all, fields(volume_id = %request.volume_id, staging = %request.staging_target_path))]
    async fn stage(
        &self,
        request: proto::NodeStageVolumeRequest,
    ) -> Result<proto::NodeStageVolumeResponse, Status> {
        let volume_id = validate::required("volume_id", &request.volume_id)?;
        let staging = self
            .confined("staging_target_path", &request.staging_target_path)
            .await?;
        let capability = required_capability(request.volume_capability.as_ref())?;
        let context = merged(&request.volume_context, &request.publish_context);
        let source = self.source(volume_id, &context, &capability)?;
        let NodeSource::Device {
            serial,
            hint,
            fs_type,
            mkfs_args,
            mount_options,
        } = source
        else {
            return Ok(proto::NodeStageVolumeResponse {});
        };
        if capability.access_type == AccessType::Block {
            // Raw block: nothing to mount; publish binds the device itself.
            return Ok(proto::NodeStageVolumeResponse {});
        }
        let _guard = self
            .inflight
            .try_claim(volume_id)
            .ok_or_else(|| busy(volume_id))?;
        if self.is_mounted(&staging).await? {
            tracing::info!("already staged");
            return Ok(proto::NodeStageVolumeResponse {});
        }
        let device = self
            .find_device(volume_id, &serial, hint.as_deref())
            .await?;
        let formatted = format::ensure_filesystem(&device, &fs_type, &mkfs_args)
            .await
            .map_err(|e| {
                internal(
                    &format!("preparing a filesystem on {}", device.display()),
                    e,
                )
            })?;
        tokio::fs::create_dir_all(&staging)
            .await
            .map_err(|e| internal(&format!("creating {}", staging.display()), e))?;
        let mount_options = stage_options(&fs_type, mount_options);
        self.mounter
            .mount(
                &device.display().to_string(),
                &staging,
                &fs_type,
                &mount_options,
            )
            .await
            .map_err(|e| internal(&format!("mounting {}", device.display()), e))?;
        tracing::info!(device = %device.display(), formatted, "staged");
        Ok(proto::NodeStageVolumeResponse {})
    }

    #[tracing::instrument(skip_all, fields(volume_id = %request.volume_id, staging = %request.staging_target_path))]
    async fn unstage(
        &self,
        request: proto::NodeUnstageVolumeRequest,
    ) -> Result<proto::NodeUnstageVolumeResponse, Status> {
        let volume_id = validate::required("volume_id", &request.volume_id)?;
        let staging = self
            .confined("staging_target_path", &request.staging_target_path)
            .await?;
        let _guard = self
            .inflight
            .try_claim(volume_id)
            .ok_or_else(|| busy(volume_id))?;
        self.unmount_all(&staging).await?;
        Ok(proto::NodeUnstageVolumeResponse {})
    }

    #[tracing::instrument(skip_all, fields(volume_id = %request.volume_id, target = %request.target_path))]
    async fn publish(
        &self,
        request: proto::NodePublishVolumeRequest,
    ) -> Result<proto::NodePublishVolumeResponse, Status> {
        let volume_id = validate::required("volume_id", &request.volume_id)?;
        let target = self.confined("target_path", &request.target_path).await?;
        let capability = required_capability(request.volume_capability.as_ref())?;
        let context = merged(&request.volume_context, &request.publish_context);
        let source = self.source(volume_id, &context, &capability)?;
        let _guard = self
            .inflight
            .try_claim(volume_id)
            .ok_or_else(|| busy(volume_id))?;

        if self.is_mounted(&target).await? {
            tracing::info!("already published");
            return Ok(proto::NodePublishVolumeResponse {});
        }
        let block = capability.access_type == AccessType::Block;
        let read_only = request.readonly || capability.access_mode.is_read_only();
        // What to bind or mount, decided before the target is created.
        enum Plan {
            Bind(PathBuf),
            BindOpened(OwnedFd),
            Mount {
                source: String,
                fs_type: String,
                options: Vec<String>,
            },
        }
        let plan = match source {
            NodeSource::ExportDir { root, sub_dir } if !block => {
                Plan::BindOpened(open_export_dir(volume_id, root, sub_dir).await?)
            }
            NodeSource::Mount {
                source,
                fs_type,
                options,
            } if !block => Plan::Mount {
                source,
                fs_type,
                options,
            },
            NodeSource::ExportDir { .. } | NodeSource::Mount { .. } => {
                return Err(Status::invalid_argument(
                    "block volumes are not supported by this backend",
                ));
            }
            NodeSource::Device { serial, hint, .. } if block => Plan::Bind(
                self.find_device(volume_id, &serial, hint.as_deref())
                    .await?,
            ),
            NodeSource::Device { .. } => {
                let staging = self
                    .confined("staging_target_path", &request.staging_target_path)
                    .await?;
                if !self.is_mounted(&staging).await? {
                    return Err(Status::failed_precondition(format!(
                        "volume {volume_id} is not staged at {}; call NodeStageVolume first",
                        staging.display()
                    )));
                }
                Plan::Bind(staging)
            }
        };
        let created = !tokio::fs::try_exists(&target).await.unwrap_or(false);
        let made = if block {
            if let Some(parent) = target.parent() {
                tokio::fs::create_dir_all(parent).await.ok();
            }
            tokio::fs::OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(&target)
                .await
                .map(|_| ())
        } else {
            tokio::fs::create_dir_all(&target).await
        };
        made.map_err(|e| internal(&format!("creating target {}", target.display()), e))?;
        let mounted = match plan {
            Plan::Bind(path) => self.mounter.bind(&path, &target, read_only).await,
            Plan::BindOpened(dir) => self.mounter.bind_opened(dir, &target, read_only).await,
            Plan::Mount {
                source,
                fs_type,
                mut options,
            } => {
                if read_only {
                    options.push("ro".into());
                }
                self.mounter
                    .mount(&source, &target, &fs_type, &options)
                    .await
            }
        };
        if let Err(error) = mounted {
            if created {
                let _ = remove_target(&target).await;
            }
            return Err(internal(&format!("mounting volume {volume_id}"), error));
        }
        tracing::info!(read_only, block, "published");
        Ok(proto::NodePublishVolumeResponse {})
    }

    #[tracing::instrument(skip_all, fields(volume_id = %request.volume_id, target = %request.target_path))]
    async fn unpublish(
        &self,
        request: proto::NodeUnpublishVolumeRequest,
    ) -> Result<proto::NodeUnpublishVolumeResponse, Status> {
        let volume_id = validate::required("volume_id", &request.volume_id)?;
        let target = self.confined("target_path", &request.target_path).await?;
        let _guard = self
            .inflight
            .try_claim(volume_id)
            .ok_or_else(|| busy(volume_id))?;
        // A target can carry more than one layer (a publish retried after a crash).
        self.unmount_all(&target).await?;
        self.walks.forget(Path::new(&request.target_path));
        self.walks.forget(&target);
        remove_target(&target)
            .await
            .map_err(|e| internal(&format!("removing target {}", target.display()), e))?;
        Ok(proto::NodeUnpublishVolumeResponse {})
    }

    async fn stats(
        &self,
        request: proto::NodeGetVolumeStatsRequest,
    ) -> Result<proto::NodeGetVolumeStatsResponse, Status> {
        let volume_id = validate::required("volume_id", &request.volume_id)?;
        validate::required("volume_path", &request.volume_path)?;
        let not_found = || {
            Status::not_found(format!(
                "volume {volume_id} is not published at {}",
                request.volume_path
            ))
        };
        let Some(backend) = self.backends.for_volume(volume_id) else {
            return Err(Status::not_found(format!(
                "volume {volume_id} does not exist"
            )));
        };
        // A path that is not even absolute names nothing published (csi-sanity asks
        // with "some/path"); any other is confined like every node call's: statvfs and
        // the usage walk never look at a path outside the kubelet directory.
        validate::node_path("volume_path", &request.volume_path).map_err(|_| not_found())?;
        let path = self.confined("volume_path", &request.volume_path).await?;
        let path = path.as_path();
        if !tokio::fs::try_exists(path).await.unwrap_or(false) {
            return Err(not_found());
        }
        let mut usage = usage_within(path, STATS_TIMEOUT)
            .await
            .map_err(|e| internal(&format!("statvfs {}", path.display()), e))?;
        if backend.volumes_share_filesystem() {
            // Capacity and what is available stay the shared filesystem's (no quota
            // bounds the directory); what is used is the volume's own, as kubelet
            // reports emptyDir volumes.
            let tree = self
                .walks
                .usage(path, STATS_TIMEOUT)
                .await
                .map_err(|e| internal(&format!("usage of {}", path.display()), e))?;
            usage.bytes_used = tree.bytes;
            usage.inodes_used = tree.inodes;
        }
        let unit = |unit: proto::volume_usage::Unit, available: u64, total: u64, used: u64| {
            proto::VolumeUsage {
                available: available as i64,
                total: total as i64,
                used: used as i64,
                unit: unit as i32,
            }
        };
        Ok(proto::NodeGetVolumeStatsResponse {
            usage: vec![
                unit(
                    proto::volume_usage::Unit::Bytes,
                    usage.bytes_available,
                    usage.bytes_total,
                    usage.bytes_used,
                ),
                unit(
                    proto::volume_usage::Unit::Inodes,
                    usage.inodes_free,
                    usage.inodes_total,
                    usage.inodes_used,
                ),
            ],
            volume_condition: None,
        })
    }

    #[tracing::instrument(skip_all, fields(volume_id = %request.volume_id, path = %request.volume_path))]
    async fn expand(
        &self,
        request: proto::NodeExpandVolumeRequest,
    ) -> Result<proto::NodeExpandVolumeResponse, Status> {
        let volume_id = validate::required("volume_id", &request.volume_id)?;
        validate::required("volume_path", &request.volume_path)?;
        let capability = request
            .volume_capability
            .as_ref()
            .map(validate::capability)
            .transpose()?;
        let Some(backend) = self.backends.for_volume(volume_id) else {
            return Err(Status::not_found(format!(
                "volume {volume_id} does not exist"
            )));
        };
        validate::node_path("volume_path", &request.volume_path).map_err(|_| {
            Status::not_found(format!(
                "volume {volume_id} is not published at {:?}",
                request.volume_path
            ))
        })?;
        let path = self.confined("volume_path", &request.volume_path).await?;
        let block = capability.is_some_and(|c| c.access_type == AccessType::Block);
        let _guard = self
            .inflight
            .try_claim(volume_id)
            .ok_or_else(|| busy(volume_id))?;
        // A volume with nothing to grow on the node (an NFS directory) is done.
        if !block && backend.expands_on_node() {
            let mountinfo = tokio::fs::read_to_string("/proc/self/mountinfo")
                .await
                .map_err(|e| internal("reading the mount table", e))?;
            let (device, fs_type) =
                crate::node::mount_entry(&mountinfo, &path).ok_or_else(|| {
                    Status::not_found(format!(
                        "volume {volume_id} is not mounted at {}",
                        path.display()
                    ))
                })?;
            format::grow_filesystem(Path::new(&device), &path, &fs_type)
                .await
                .map_err(|e| {
                    internal(&format!("growing the filesystem at {}", path.display()), e)
                })?;
        }
        let bytes = match usage_within(&path, STATS_TIMEOUT).await {
            Ok(usage) if !block => usage.bytes_total as i64,
            _ => request.capacity_range.map_or(0, |r| r.required_bytes),
        };
        Ok(proto::NodeExpandVolumeResponse {
            capacity_bytes: bytes,
        })
    }

    fn capabilities(&self) -> Vec<nsc::rpc::Type> {
        let mut rpcs = vec![nsc::rpc::Type::GetVolumeStats];
        if self.backends.any_stage() {
            rpcs.push(nsc::rpc::Type::StageUnstageVolume);
        }
        if self.backends.any_node_expand() {
            rpcs.push(nsc::rpc::Type::ExpandVolume);
        }
        rpcs
    }
}

/// The directory `sub_dir` of a local export rooted at `root`, opened without following
/// any symlink (`stowage_nfs::beneath`): a volume's pod can write its directory, so a
/// link planted on another volume's path must never redirect that volume's bind mount.
async fn open_export_dir(
    volume_id: &str,
    root: PathBuf,
    sub_dir: Vec<String>,
) -> Result<OwnedFd, Status> {
    use stowage_nfs::beneath::{BeneathError, open_dir_beneath};
    let id = volume_id.to_owned();
    let opened = tokio::task::spawn_blocking(move || {
        let top = std::fs::File::open(&root)
            .map_err(|e| internal(&format!("opening the export {}", root.display()), e))?;
        open_dir_beneath(std::os::fd::AsFd::as_fd(&top), &sub_dir, OFlag::O_PATH).map_err(
            |error| {
                let message = format!(
                    "volume {id}: {error} (in the export {}); the volume's directory must be a real directory",
                    root.display()
                );
                match error {
                    BeneathError::NotFound { .. } => Status::not_found(message),
                    BeneathError::Io { .. } => Status::internal(message),
                    _ => Status::failed_precondition(message),
                }
            },
        )
    });
    opened
        .await
        .map_err(|e| internal(&format!("opening volume {volume_id}"), e))?
}

/// Mount options of a staged filesystem: XFS refuses a second filesystem with the UUID
/// of one already mounted, which is what a restored snapshot or a clone of a volume on
/// the same node is, so XFS mounts get `nouuid` (as aws-ebs-csi-driver's do).
fn stage_options(fs_type: &str, mut options: Vec<String>) -> Vec<String> {
    if fs_type == "xfs" && !options.iter().any(|o| o == "nouuid") {
        options.push("nouuid".into());
    }
    options
}

/// Remove a target directory or (raw block) file; absent is fine.
async fn remove_target(target: &Path) -> std::io::Result<()> {
    let result = match tokio::fs::symlink_metadata(target).await {
        Ok(meta) if meta.is_dir() => tokio::fs::remove_dir(target).await,
        Ok(_) => tokio::fs::remove_file(target).await,
        Err(e) => Err(e),
    };
    match result {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        other => other,
    }
}

#[tonic::async_trait]
impl Node for NodeService {
    async fn node_stage_volume(
        &self,
        request: Request<proto::NodeStageVolumeRequest>,
    ) -> Result<Response<proto::NodeStageVolumeResponse>, Status> {
        observe(
            &self.metrics,
            "/csi.v1.Node/NodeStageVolume",
            self.stage(request.into_inner()),
        )
        .await
    }

    async fn node_unstage_volume(
        &self,
        request: Request<proto::NodeUnstageVolumeRequest>,
    ) -> Result<Response<proto::NodeUnstageVolumeResponse>, Status> {
        observe(
            &self.metrics,
            "/csi.v1.Node/NodeUnstageVolume",
            self.unstage(request.into_inner()),
        )
        .await
    }

    async fn node_publish_volume(
        &self,
        request: Request<proto::NodePublishVolumeRequest>,
    ) -> Result<Response<proto::NodePublishVolumeResponse>, Status> {
        observe(
            &self.metrics,
            "/csi.v1.Node/NodePublishVolume",
            self.publish(request.into_inner()),
        )
        .await
    }

    async fn node_unpublish_volume(
        &self,
        request: Request<proto::NodeUnpublishVolumeRequest>,
    ) -> Result<Response<proto::NodeUnpublishVolumeResponse>, Status> {
        observe(
            &self.metrics,
            "/csi.v1.Node/NodeUnpublishVolume",
            self.unpublish(request.into_inner()),
        )
        .await
    }

    async fn node_get_volume_stats(
        &self,
        request: Request<proto::NodeGetVolumeStatsRequest>,
    ) -> Result<Response<proto::NodeGetVolumeStatsResponse>, Status> {
        observe(
            &self.metrics,
            "/csi.v1.Node/NodeGetVolumeStats",
            self.stats(request.into_inner()),
        )
        .await
    }

    async fn node_expand_volume(
        &self,
        request: Request<proto::NodeExpandVolumeRequest>,
    ) -> Result<Response<proto::NodeExpandVolumeResponse>, Status> {
        observe(
            &self.metrics,
            "/csi.v1.Node/NodeExpandVolume",
            self.expand(request.into_inner()),
        )
        .await
    }

    async fn node_get_capabilities(
        &self,
        _request: Request<proto::NodeGetCapabilitiesRequest>,
    ) -> Result<Response<proto::NodeGetCapabilitiesResponse>, Status> {
        observe(&self.metrics, "/csi.v1.Node/NodeGetCapabilities", async {
            Ok(proto::NodeGetCapabilitiesResponse {
                capabilities: self
                    .capabilities()
                    .into_iter()
                    .map(|t| proto::NodeServiceCapability {
                        r#type: Some(nsc::Type::Rpc(nsc::Rpc { r#type: t as i32 })),
                    })
                    .collect(),
            })
        })
        .await
    }

    async fn node_get_info(
        &self,
        _request: Request<proto::NodeGetInfoRequest>,
    ) -> Result<Response<proto::NodeGetInfoResponse>, Status> {
        observe(&self.metrics, "/csi.v1.Node/NodeGetInfo", async {
            Ok(proto::NodeGetInfoResponse {
                node_id: self.config.node_id.clone(),
                max_volumes_per_node: self.config.max_volumes,
                accessible_topology: self
                    .config
                    .topology
                    .clone()
                    .map(|segments| proto::Topology {
                        segments: segments.into_iter().collect(),
                    }),
            })
        })
        .await
    }
}
