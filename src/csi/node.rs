//! CSI Node service: publish (create the target, mount or bind into it), unpublish
//! (unmount, remove the target), volume stats, node info and capabilities. The OS work
//! goes through [`Mounter`]; what to mount comes from the volume's backend.

use std::path::Path;
use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::inflight::InFlight;
use super::proto::{self, node_server::Node, node_service_capability as nsc};
use super::status::busy;
use super::{observe, validate};
use crate::backend::{Backends, NodeSource};
use crate::metrics::Metrics;
use crate::node::{Mounter, usage_within};
use crate::volume::AccessType;

/// How long NodeGetVolumeStats waits for statvfs (a hung NFS server blocks it).
const STATS_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

pub struct NodeService {
    node_id: String,
    backends: Backends,
    mounter: Arc<dyn Mounter>,
    inflight: InFlight,
    metrics: Arc<Metrics>,
}

impl NodeService {
    pub fn new(
        node_id: String,
        backends: Backends,
        mounter: Arc<dyn Mounter>,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            node_id,
            backends,
            mounter,
            inflight: InFlight::default(),
            metrics,
        }
    }
}

fn internal(what: &str, error: impl std::fmt::Display) -> Status {
    Status::internal(format!("{what}: {error}"))
}

impl NodeService {
    #[tracing::instrument(skip_all, fields(volume_id = %request.volume_id, target = %request.target_path))]
    async fn publish(
        &self,
        request: proto::NodePublishVolumeRequest,
    ) -> Result<proto::NodePublishVolumeResponse, Status> {
        let volume_id = validate::required("volume_id", &request.volume_id)?;
        let target = validate::node_path("target_path", &request.target_path)?;
        let capability = request
            .volume_capability
            .as_ref()
            .ok_or_else(|| Status::invalid_argument("volume_capability is required"))
            .and_then(validate::capability)?;
        let backend = self
            .backends
            .for_volume(volume_id)
            .ok_or_else(|| Status::not_found(format!("volume {volume_id} does not exist")))?;
        backend
            .supports(&capability)
            .map_err(Status::invalid_argument)?;
        let context = validate::to_btree(&request.volume_context);
        let source = backend.node_source(volume_id, &context, &capability)?;
        let _guard = self
            .inflight
            .try_claim(volume_id)
            .ok_or_else(|| busy(volume_id))?;

        if self
            .mounter
            .is_mounted(&target)
            .await
            .map_err(|e| internal("reading the mount table", e))?
        {
            tracing::info!("already published");
            return Ok(proto::NodePublishVolumeResponse {});
        }
        if capability.access_type == AccessType::Block {
            return Err(Status::invalid_argument(
                "block volumes are not supported by this backend",
            ));
        }
        let created = !tokio::fs::try_exists(&target).await.unwrap_or(false);
        tokio::fs::create_dir_all(&target)
            .await
            .map_err(|e| internal(&format!("creating target {}", target.display()), e))?;
        let read_only = request.readonly || capability.access_mode.is_read_only();
        let mounted = match &source {
            NodeSource::Bind { path } => self.mounter.bind(path, &target, read_only).await,
            NodeSource::Mount {
                source,
                fs_type,
                options,
            } => {
                let mut options = options.clone();
                if read_only {
                    options.push("ro".into());
                }
                self.mounter.mount(source, &target, fs_type, &options).await
            }
        };
        if let Err(error) = mounted {
            if created {
                let _ = tokio::fs::remove_dir(&target).await;
            }
            return Err(internal(&format!("mounting volume {volume_id}"), error));
        }
        tracing::info!(?source, read_only, "published");
        Ok(proto::NodePublishVolumeResponse {})
    }

    #[tracing::instrument(skip_all, fields(volume_id = %request.volume_id, target = %request.target_path))]
    async fn unpublish(
        &self,
        request: proto::NodeUnpublishVolumeRequest,
    ) -> Result<proto::NodeUnpublishVolumeResponse, Status> {
        let volume_id = validate::required("volume_id", &request.volume_id)?;
        let target = validate::node_path("target_path", &request.target_path)?;
        let _guard = self
            .inflight
            .try_claim(volume_id)
            .ok_or_else(|| busy(volume_id))?;
        // A target can carry more than one layer (a publish retried after a crash).
        while self
            .mounter
            .is_mounted(&target)
            .await
            .map_err(|e| internal("reading the mount table", e))?
        {
            self.mounter
                .unmount(&target)
                .await
                .map_err(|e| internal(&format!("unmounting {}", target.display()), e))?;
        }
        match tokio::fs::remove_dir(&target).await {
            Ok(()) => tracing::info!("unpublished"),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(internal(
                    &format!("removing target {}", target.display()),
                    e,
                ));
            }
        }
        Ok(proto::NodeUnpublishVolumeResponse {})
    }

    async fn stats(
        &self,
        request: proto::NodeGetVolumeStatsRequest,
    ) -> Result<proto::NodeGetVolumeStatsResponse, Status> {
        let volume_id = validate::required("volume_id", &request.volume_id)?;
        validate::required("volume_path", &request.volume_path)?;
        let path = Path::new(&request.volume_path);
        let not_found = || {
            Status::not_found(format!(
                "volume {volume_id} is not published at {}",
                request.volume_path
            ))
        };
        let exists = path.is_absolute() && tokio::fs::try_exists(path).await.unwrap_or(false);
        if self.backends.for_volume(volume_id).is_none() || !exists {
            return Err(not_found());
        }
        let usage = usage_within(path, STATS_TIMEOUT)
            .await
            .map_err(|e| internal(&format!("statvfs {}", path.display()), e))?;
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
}

#[tonic::async_trait]
impl Node for NodeService {
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

    async fn node_get_capabilities(
        &self,
        _request: Request<proto::NodeGetCapabilitiesRequest>,
    ) -> Result<Response<proto::NodeGetCapabilitiesResponse>, Status> {
        observe(&self.metrics, "/csi.v1.Node/NodeGetCapabilities", async {
            Ok(proto::NodeGetCapabilitiesResponse {
                capabilities: vec![proto::NodeServiceCapability {
                    r#type: Some(nsc::Type::Rpc(nsc::Rpc {
                        r#type: nsc::rpc::Type::GetVolumeStats as i32,
                    })),
                }],
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
                node_id: self.node_id.clone(),
                max_volumes_per_node: 0,
                accessible_topology: None,
            })
        })
        .await
    }
}
