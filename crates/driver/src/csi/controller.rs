//! CSI Controller service: create, delete, list and validate volumes, capacity, and
//! controller publish/unpublish. Each handler: validate → guard → act (one backend
//! call) → map (`csi::status`).

use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::inflight::InFlight;
use super::proto::{self, controller_server::Controller, controller_service_capability as csc};
use super::status::busy;
use super::{observe, validate};
use crate::backend::{Backend, Backends};
use stowage_api::convert::volume_to_proto;
use stowage_api::metrics::Metrics;
use stowage_api::volume::{Capability, Snapshot};

pub struct ControllerService {
    backends: Backends,
    inflight: InFlight,
    metrics: Arc<Metrics>,
}

impl ControllerService {
    pub fn new(backends: Backends, metrics: Arc<Metrics>) -> Self {
        Self {
            backends,
            inflight: InFlight::default(),
            metrics,
        }
    }

    fn backend_for(&self, volume_id: &str) -> Option<Arc<dyn Backend>> {
        self.backends.for_volume(volume_id)
    }
}

/// The capabilities advertised: always create/delete, list and capacity; publish when
/// a configured backend attaches volumes to nodes.
fn capabilities(backends: &Backends) -> Vec<csc::rpc::Type> {
    let mut rpcs = vec![
        csc::rpc::Type::CreateDeleteVolume,
        csc::rpc::Type::ListVolumes,
        csc::rpc::Type::GetCapacity,
    ];
    if backends.any_attach() {
        rpcs.push(csc::rpc::Type::PublishUnpublishVolume);
    }
    if backends.any_expand() {
        rpcs.push(csc::rpc::Type::ExpandVolume);
    }
    if backends.any_modify() {
        rpcs.push(csc::rpc::Type::ModifyVolume);
    }
    if backends.any_snapshot() {
        rpcs.push(csc::rpc::Type::CreateDeleteSnapshot);
        rpcs.push(csc::rpc::Type::ListSnapshots);
    }
    if backends.any_clone() {
        rpcs.push(csc::rpc::Type::CloneVolume);
    }
    rpcs
}

fn check_supported(backend: &dyn Backend, capabilities: &[Capability]) -> Result<(), Status> {
    for capability in capabilities {
        backend
            .supports(capability)
            .map_err(Status::invalid_argument)?;
    }
    Ok(())
}

fn snapshot_to_proto(snapshot: Snapshot) -> proto::Snapshot {
    proto::Snapshot {
        size_bytes: i64::try_from(snapshot.size_bytes).unwrap_or(i64::MAX),
        snapshot_id: snapshot.id,
        source_volume_id: snapshot.source_volume_id,
        creation_time: Some(prost_types::Timestamp {
            seconds: snapshot.created.0,
            nanos: snapshot.created.1,
        }),
        ready_to_use: snapshot.ready,
        group_snapshot_id: String::new(),
    }
}

/// A checked List* paging request: where to start and how many to return.
struct Paging {
    after: Option<String>,
    limit: usize,
}

/// Check `max_entries` and `starting_token` before any backend is asked.
fn paging(max_entries: i32, starting_token: &str) -> Result<Paging, Status> {
    if max_entries < 0 {
        return Err(Status::invalid_argument("max_entries must not be negative"));
    }
    let after = match starting_token {
        "" => None,
        token => Some(decode_token(token)?),
    };
    let limit = match max_entries {
        0 => usize::MAX,
        n => n as usize,
    };
    Ok(Paging { after, limit })
}

/// One page of `items` (sorted by id here) and the token for the next page ("" when
/// done). Shared by ListVolumes and ListSnapshots.
fn page<T>(mut items: Vec<T>, id: impl Fn(&T) -> &str, paging: &Paging) -> (Vec<T>, String) {
    items.sort_by(|a, b| id(a).cmp(id(b)));
    let start = paging
        .after
        .as_deref()
        .map_or(0, |after| items.partition_point(|i| id(i) <= after));
    let remaining = items.len() - start;
    let page: Vec<T> = items.drain(start..).take(paging.limit).collect();
    let next_token = match page.last() {
        Some(last) if remaining > page.len() => encode_token(id(last)),
        _ => String::new(),
    };
    (page, next_token)
}

/// ListVolumes paging token: the hex of the last volume id returned.
fn encode_token(volume_id: &str) -> String {
    volume_id.bytes().map(|b| format!("{b:02x}")).collect()
}

fn decode_token(token: &str) -> Result<String, Status> {
    let aborted = || {
        Status::aborted(format!(
            "starting_token {token:?} was not returned by ListVolumes; start again without a token"
        ))
    };
    if !token.len().is_multiple_of(2) {
        return Err(aborted());
    }
    let bytes = (0..token.len())
        .step_by(2)
        .map(|i| {
            u8::from_str_radix(token.get(i..i + 2).ok_or_else(aborted)?, 16).map_err(|_| aborted())
        })
        .collect::<Result<Vec<u8>, Status>>()?;
    String::from_utf8(bytes).map_err(|_| aborted())
}

impl ControllerService {
    #[tracing::instrument(skip_all, fields(name = %request.name))]
    async fn create(
        &self,
        request: proto::CreateVolumeRequest,
    ) -> Result<proto::CreateVolumeResponse, Status> {
        let mut create = validate::create_volume(&request)?;
        let (backend, parameters) = self.backends.for_parameters(&create.parameters)?;
        create.parameters = parameters;
        check_supported(backend.as_ref(), &create.capabilities)?;
        let _guard = self
            .inflight
            .try_claim(&create.name)
            .ok_or_else(|| busy(&create.name))?;
        let volume = backend.create_volume(&create).await?;
        tracing::info!(volume_id = %volume.id, capacity = volume.capacity_bytes, "volume ready");
        Ok(proto::CreateVolumeResponse {
            volume: Some(volume_to_proto(volume)),
        })
    }

    #[tracing::instrument(skip_all, fields(volume_id = %request.volume_id))]
    async fn delete(
        &self,
        request: proto::DeleteVolumeRequest,
    ) -> Result<proto::DeleteVolumeResponse, Status> {
        let volume_id = validate::required("volume_id", &request.volume_id)?;
        let Some(backend) = self.backend_for(volume_id) else {
            tracing::info!("no backend owns this id; nothing to delete");
            return Ok(proto::DeleteVolumeResponse {});
        };
        let _guard = self
            .inflight
            .try_claim(volume_id)
            .ok_or_else(|| busy(volume_id))?;
        backend.delete_volume(volume_id).await?;
        Ok(proto::DeleteVolumeResponse {})
    }

    async fn validate_capabilities(
        &self,
        request: proto::ValidateVolumeCapabilitiesRequest,
    ) -> Result<proto::ValidateVolumeCapabilitiesResponse, Status> {
        let volume_id = validate::required("volume_id", &request.volume_id)?;
        let capabilities = validate::capabilities(&request.volume_capabilities)?;
        let not_found = || Status::not_found(format!("volume {volume_id} does not exist"));
        let backend = self.backend_for(volume_id).ok_or_else(not_found)?;
        let volume = backend.get_volume(volume_id).await?.ok_or_else(not_found)?;
        let unsupported: Vec<String> = capabilities
            .iter()
            .filter_map(|c| backend.supports(c).err())
            .collect();
        if !unsupported.is_empty() {
            return Ok(proto::ValidateVolumeCapabilitiesResponse {
                confirmed: None,
                message: unsupported.join("; "),
            });
        }
        let _ = volume;
        Ok(proto::ValidateVolumeCapabilitiesResponse {
            confirmed: Some(proto::validate_volume_capabilities_response::Confirmed {
                volume_context: request.volume_context,
                volume_capabilities: request.volume_capabilities,
                parameters: request.parameters,
                mutable_parameters: Default::default(),
            }),
            message: String::new(),
        })
    }

    async fn list(
        &self,
        request: proto::ListVolumesRequest,
    ) -> Result<proto::ListVolumesResponse, Status> {
        let paging = paging(request.max_entries, &request.starting_token)?;
        let mut volumes = Vec::new();
        for backend in self.backends.iter() {
            volumes.extend(backend.list_volumes().await?);
        }
        let (page, next_token) = page(volumes, |v| &v.id, &paging);
        Ok(proto::ListVolumesResponse {
            entries: page
                .into_iter()
                .map(|v| proto::list_volumes_response::Entry {
                    volume: Some(volume_to_proto(v)),
                    status: None,
                })
                .collect(),
            next_token,
        })
    }

    async fn capacity(
        &self,
        request: proto::GetCapacityRequest,
    ) -> Result<proto::GetCapacityResponse, Status> {
        let capabilities = request
            .volume_capabilities
            .iter()
            .map(validate::capability)
            .collect::<Result<Vec<_>, _>>()?;
        let (backend, parameters) = self
            .backends
            .for_parameters(&validate::to_btree(&request.parameters))?;
        let available = if capabilities.iter().all(|c| backend.supports(c).is_ok()) {
            backend.capacity(&parameters).await?
        } else {
            0
        };
        Ok(proto::GetCapacityResponse {
            available_capacity: i64::try_from(available).unwrap_or(i64::MAX),
            maximum_volume_size: None,
            minimum_volume_size: None,
        })
    }

    #[tracing::instrument(skip_all, fields(volume_id = %request.volume_id, node = %request.node_id))]
    async fn publish(
        &self,
        request: proto::ControllerPublishVolumeRequest,
    ) -> Result<proto::ControllerPublishVolumeResponse, Status> {
        let volume_id = validate::required("volume_id", &request.volume_id)?;
        let node_id = validate::required("node_id", &request.node_id)?;
        let capability = request
            .volume_capability
            .as_ref()
            .ok_or_else(|| Status::invalid_argument("volume_capability is required"))
            .and_then(validate::capability)?;
        let backend = self
            .backend_for(volume_id)
            .ok_or_else(|| Status::not_found(format!("volume {volume_id} does not exist")))?;
        check_supported(backend.as_ref(), &[capability])?;
        let _guard = self
            .inflight
            .try_claim(volume_id)
            .ok_or_else(|| busy(volume_id))?;
        let context = backend.controller_publish(volume_id, node_id).await?;
        Ok(proto::ControllerPublishVolumeResponse {
            publish_context: context.into_iter().collect(),
        })
    }

    #[tracing::instrument(skip_all, fields(volume_id = %request.volume_id, node = %request.node_id))]
    async fn unpublish(
        &self,
        request: proto::ControllerUnpublishVolumeRequest,
    ) -> Result<proto::ControllerUnpublishVolumeResponse, Status> {
        let volume_id = validate::required("volume_id", &request.volume_id)?;
        if let Some(backend) = self.backend_for(volume_id) {
            let _guard = self
                .inflight
                .try_claim(volume_id)
                .ok_or_else(|| busy(volume_id))?;
            backend
                .controller_unpublish(volume_id, &request.node_id)
                .await?;
        }
        Ok(proto::ControllerUnpublishVolumeResponse {})
    }
}

impl ControllerService {
    #[tracing::instrument(skip_all, fields(name = %request.name, source = %request.source_volume_id))]
    async fn create_snapshot_(
        &self,
        request: proto::CreateSnapshotRequest,
    ) -> Result<proto::CreateSnapshotResponse, Status> {
        let name = validate::required("name", &request.name)?;
        let source = validate::required("source_volume_id", &request.source_volume_id)?;
        let backend = self
            .backend_for(source)
            .ok_or_else(|| Status::not_found(format!("volume {source} does not exist")))?;
        let _guard = self.inflight.try_claim(name).ok_or_else(|| busy(name))?;
        let snapshot = backend
            .create_snapshot(source, name, &validate::to_btree(&request.parameters))
            .await?;
        Ok(proto::CreateSnapshotResponse {
            snapshot: Some(snapshot_to_proto(snapshot)),
        })
    }

    #[tracing::instrument(skip_all, fields(snapshot_id = %request.snapshot_id))]
    async fn delete_snapshot_(
        &self,
        request: proto::DeleteSnapshotRequest,
    ) -> Result<proto::DeleteSnapshotResponse, Status> {
        let id = validate::required("snapshot_id", &request.snapshot_id)?;
        if let Some(backend) = self.backends.for_snapshot(id) {
            let _guard = self.inflight.try_claim(id).ok_or_else(|| busy(id))?;
            backend.delete_snapshot(id).await?;
        }
        Ok(proto::DeleteSnapshotResponse {})
    }

    async fn list_snapshots_(
        &self,
        request: proto::ListSnapshotsRequest,
    ) -> Result<proto::ListSnapshotsResponse, Status> {
        let paging = paging(request.max_entries, &request.starting_token)?;
        let mut snapshots = Vec::new();
        for backend in self.backends.iter().filter(|b| b.can_snapshot()) {
            snapshots.extend(backend.list_snapshots().await?);
        }
        snapshots.retain(|s| {
            (request.snapshot_id.is_empty() || s.id == request.snapshot_id)
                && (request.source_volume_id.is_empty()
                    || s.source_volume_id == request.source_volume_id)
        });
        let (page, next_token) = page(snapshots, |s| &s.id, &paging);
        Ok(proto::ListSnapshotsResponse {
            entries: page
                .into_iter()
                .map(|s| proto::list_snapshots_response::Entry {
                    snapshot: Some(snapshot_to_proto(s)),
                })
                .collect(),
            next_token,
        })
    }

    #[tracing::instrument(skip_all, fields(volume_id = %request.volume_id))]
    async fn modify(
        &self,
        request: proto::ControllerModifyVolumeRequest,
    ) -> Result<proto::ControllerModifyVolumeResponse, Status> {
        let volume_id = validate::required("volume_id", &request.volume_id)?;
        let backend = self
            .backend_for(volume_id)
            .ok_or_else(|| Status::not_found(format!("volume {volume_id} does not exist")))?;
        let _guard = self
            .inflight
            .try_claim(volume_id)
            .ok_or_else(|| busy(volume_id))?;
        backend
            .modify_volume(volume_id, &validate::to_btree(&request.mutable_parameters))
            .await?;
        Ok(proto::ControllerModifyVolumeResponse {})
    }

    #[tracing::instrument(skip_all, fields(volume_id = %request.volume_id))]
    async fn expand(
        &self,
        request: proto::ControllerExpandVolumeRequest,
    ) -> Result<proto::ControllerExpandVolumeResponse, Status> {
        let volume_id = validate::required("volume_id", &request.volume_id)?;
        let range = request
            .capacity_range
            .as_ref()
            .ok_or_else(|| Status::invalid_argument("capacity_range is required"))?;
        let capacity = validate::capacity_range(Some(range))?;
        if let Some(capability) = &request.volume_capability {
            validate::capability(capability)?;
        }
        let backend = self
            .backend_for(volume_id)
            .ok_or_else(|| Status::not_found(format!("volume {volume_id} does not exist")))?;
        let _guard = self
            .inflight
            .try_claim(volume_id)
            .ok_or_else(|| busy(volume_id))?;
        let (bytes, node_expansion_required) = backend.expand_volume(volume_id, capacity).await?;
        Ok(proto::ControllerExpandVolumeResponse {
            capacity_bytes: i64::try_from(bytes).unwrap_or(i64::MAX),
            node_expansion_required,
        })
    }
}

#[tonic::async_trait]
impl Controller for ControllerService {
    async fn controller_modify_volume(
        &self,
        request: Request<proto::ControllerModifyVolumeRequest>,
    ) -> Result<Response<proto::ControllerModifyVolumeResponse>, Status> {
        observe(
            &self.metrics,
            "/csi.v1.Controller/ControllerModifyVolume",
            self.modify(request.into_inner()),
        )
        .await
    }

    async fn create_snapshot(
        &self,
        request: Request<proto::CreateSnapshotRequest>,
    ) -> Result<Response<proto::CreateSnapshotResponse>, Status> {
        observe(
            &self.metrics,
            "/csi.v1.Controller/CreateSnapshot",
            self.create_snapshot_(request.into_inner()),
        )
        .await
    }

    async fn delete_snapshot(
        &self,
        request: Request<proto::DeleteSnapshotRequest>,
    ) -> Result<Response<proto::DeleteSnapshotResponse>, Status> {
        observe(
            &self.metrics,
            "/csi.v1.Controller/DeleteSnapshot",
            self.delete_snapshot_(request.into_inner()),
        )
        .await
    }

    async fn list_snapshots(
        &self,
        request: Request<proto::ListSnapshotsRequest>,
    ) -> Result<Response<proto::ListSnapshotsResponse>, Status> {
        observe(
            &self.metrics,
            "/csi.v1.Controller/ListSnapshots",
            self.list_snapshots_(request.into_inner()),
        )
        .await
    }

    async fn controller_expand_volume(
        &self,
        request: Request<proto::ControllerExpandVolumeRequest>,
    ) -> Result<Response<proto::ControllerExpandVolumeResponse>, Status> {
        observe(
            &self.metrics,
            "/csi.v1.Controller/ControllerExpandVolume",
            self.expand(request.into_inner()),
        )
        .await
    }

    async fn create_volume(
        &self,
        request: Request<proto::CreateVolumeRequest>,
    ) -> Result<Response<proto::CreateVolumeResponse>, Status> {
        observe(
            &self.metrics,
            "/csi.v1.Controller/CreateVolume",
            self.create(request.into_inner()),
        )
        .await
    }

    async fn delete_volume(
        &self,
        request: Request<proto::DeleteVolumeRequest>,
    ) -> Result<Response<proto::DeleteVolumeResponse>, Status> {
        observe(
            &self.metrics,
            "/csi.v1.Controller/DeleteVolume",
            self.delete(request.into_inner()),
        )
        .await
    }

    async fn controller_publish_volume(
        &self,
        request: Request<proto::ControllerPublishVolumeRequest>,
    ) -> Result<Response<proto::ControllerPublishVolumeResponse>, Status> {
        observe(
            &self.metrics,
            "/csi.v1.Controller/ControllerPublishVolume",
            self.publish(request.into_inner()),
        )
        .await
    }

    async fn controller_unpublish_volume(
        &self,
        request: Request<proto::ControllerUnpublishVolumeRequest>,
    ) -> Result<Response<proto::ControllerUnpublishVolumeResponse>, Status> {
        observe(
            &self.metrics,
            "/csi.v1.Controller/ControllerUnpublishVolume",
            self.unpublish(request.into_inner()),
        )
        .await
    }

    async fn validate_volume_capabilities(
        &self,
        request: Request<proto::ValidateVolumeCapabilitiesRequest>,
    ) -> Result<Response<proto::ValidateVolumeCapabilitiesResponse>, Status> {
        observe(
            &self.metrics,
            "/csi.v1.Controller/ValidateVolumeCapabilities",
            self.validate_capabilities(request.into_inner()),
        )
        .await
    }

    async fn list_volumes(
        &self,
        request: Request<proto::ListVolumesRequest>,
    ) -> Result<Response<proto::ListVolumesResponse>, Status> {
        observe(
            &self.metrics,
            "/csi.v1.Controller/ListVolumes",
            self.list(request.into_inner()),
        )
        .await
    }

    async fn get_capacity(
        &self,
        request: Request<proto::GetCapacityRequest>,
    ) -> Result<Response<proto::GetCapacityResponse>, Status> {
        observe(
            &self.metrics,
            "/csi.v1.Controller/GetCapacity",
            self.capacity(request.into_inner()),
        )
        .await
    }

    async fn controller_get_capabilities(
        &self,
        _request: Request<proto::ControllerGetCapabilitiesRequest>,
    ) -> Result<Response<proto::ControllerGetCapabilitiesResponse>, Status> {
        observe(
            &self.metrics,
            "/csi.v1.Controller/ControllerGetCapabilities",
            async {
                Ok(proto::ControllerGetCapabilitiesResponse {
                    capabilities: capabilities(&self.backends)
                        .into_iter()
                        .map(|t| proto::ControllerServiceCapability {
                            r#type: Some(csc::Type::Rpc(csc::Rpc { r#type: t as i32 })),
                        })
                        .collect(),
                })
            },
        )
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_round_trip_and_garbage_is_aborted() {
        for id in ["nfs#10.0.0.1#/export#pvc-1#delete", "", "ü"] {
            assert_eq!(decode_token(&encode_token(id)).unwrap(), id);
        }
        for bad in ["invalid-token", "abc", "zz", "ff"] {
            assert_eq!(
                decode_token(bad).unwrap_err().code(),
                tonic::Code::Aborted,
                "{bad}"
            );
        }
    }
}
