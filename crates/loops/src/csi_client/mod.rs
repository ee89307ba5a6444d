//! The loops' CSI client: one connection to the driver's socket, a bound on calls in
//! flight, a timeout per call, and the external-provisioner rule for which errors are
//! final and which mean "maybe still in progress".
//!
//! Owns only CSI transport concerns; what to ask for is decided by the loops.

pub mod channel;

use std::collections::HashMap;
use std::future::Future;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use tokio::sync::Semaphore;
use tonic::transport::Channel;
use tonic::{Code, Status};

use stowage_api::convert::{access_mode_from_kubernetes, access_mode_to_proto};
use stowage_api::proto::csi::{
    self as proto, controller_client::ControllerClient,
    controller_service_capability::rpc::Type as ControllerCap, identity_client::IdentityClient,
    plugin_capability::service::Type as PluginCap, volume_capability as vc,
};
use stowage_api::volume::AccessMode;

/// What the driver said it can do.
#[derive(Debug, Clone, Default)]
pub struct DriverCaps {
    pub driver_name: String,
    pub create_delete: bool,
    pub publish_unpublish: bool,
    pub expand: bool,
    pub topology: bool,
    /// CREATE_DELETE_SNAPSHOT.
    pub snapshots: bool,
    /// MODIFY_VOLUME (VolumeAttributesClass).
    pub modify: bool,
}

/// A CSI controller client shared by every loop.
#[derive(Clone)]
pub struct Csi {
    controller: ControllerClient<Channel>,
    limit: Arc<Semaphore>,
    timeout: Duration,
    pub caps: DriverCaps,
}

/// A failed CSI call.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    #[error("{}: {}", .0.code(), .0.message())]
    Status(Status),
    #[error("timed out after {0:?}")]
    Timeout(Duration),
}

impl CallError {
    /// external-provisioner `isFinalError`: these codes (and timeouts and transport
    /// errors, which arrive as UNAVAILABLE/UNKNOWN without a driver message) mean the
    /// operation may still be running in the driver; anything else is the driver's
    /// final answer.
    pub fn is_final(&self) -> bool {
        match self {
            CallError::Timeout(_) => false,
            CallError::Status(status) => {
                !matches!(
                    status.code(),
                    Code::Cancelled
                        | Code::DeadlineExceeded
                        | Code::Unavailable
                        | Code::ResourceExhausted
                        | Code::Aborted
                ) && !is_transport(status)
            }
        }
    }

    pub fn code(&self) -> Code {
        match self {
            CallError::Timeout(_) => Code::DeadlineExceeded,
            CallError::Status(status) => status.code(),
        }
    }

    /// The driver's message alone (for events), without the code name.
    pub fn message(&self) -> String {
        match self {
            CallError::Timeout(after) => format!("the driver did not answer within {after:?}"),
            CallError::Status(status) if status.message().is_empty() => status.code().to_string(),
            CallError::Status(status) => status.message().to_owned(),
        }
    }
}

/// A status made by tonic for a broken connection rather than sent by the driver.
fn is_transport(status: &Status) -> bool {
    status.code() == Code::Unknown && std::error::Error::source(status).is_some()
}

impl Csi {
    /// Connect to `socket` and read the driver's identity and capabilities, waiting
    /// up to `wait` for the socket to answer.
    pub async fn connect(
        socket: &Path,
        max_calls: usize,
        timeout: Duration,
        wait: Duration,
    ) -> anyhow::Result<Csi> {
        let deadline = tokio::time::Instant::now() + wait;
        let channel = loop {
            match crate::csi_client::channel::connect(socket).await {
                Ok(channel) => break channel,
                Err(e) if tokio::time::Instant::now() >= deadline => {
                    return Err(e).with_context(|| {
                        format!("connecting to the CSI driver at {}", socket.display())
                    });
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        };
        let mut identity = IdentityClient::new(channel.clone());
        let info = identity
            .get_plugin_info(proto::GetPluginInfoRequest {})
            .await
            .context("CSI GetPluginInfo")?
            .into_inner();
        let plugin = identity
            .get_plugin_capabilities(proto::GetPluginCapabilitiesRequest {})
            .await
            .context("CSI GetPluginCapabilities")?
            .into_inner();
        let mut controller = ControllerClient::new(channel);
        let caps = controller
            .controller_get_capabilities(proto::ControllerGetCapabilitiesRequest {})
            .await
            .context("CSI ControllerGetCapabilities")?
            .into_inner();
        let has = |wanted: ControllerCap| {
            caps.capabilities.iter().any(|c| match &c.r#type {
                Some(proto::controller_service_capability::Type::Rpc(rpc)) => {
                    rpc.r#type == wanted as i32
                }
                None => false,
            })
        };
        let topology = plugin.capabilities.iter().any(|c| match &c.r#type {
            Some(proto::plugin_capability::Type::Service(service)) => {
                service.r#type == PluginCap::VolumeAccessibilityConstraints as i32
            }
            _ => false,
        });
        Ok(Csi {
            caps: DriverCaps {
                driver_name: info.name,
                create_delete: has(ControllerCap::CreateDeleteVolume),
                publish_unpublish: has(ControllerCap::PublishUnpublishVolume),
                expand: has(ControllerCap::ExpandVolume),
                topology,
                snapshots: has(ControllerCap::CreateDeleteSnapshot),
                modify: has(ControllerCap::ModifyVolume),
            },
            controller,
            limit: Arc::new(Semaphore::new(max_calls.max(1))),
            timeout,
        })
    }

    /// Run one call: wait for a slot, then the call under the timeout.
    async fn call<T, F, Fut>(&self, f: F) -> Result<T, CallError>
    where
        F: FnOnce(ControllerClient<Channel>) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, Status>>,
    {
        let _slot = self
            .limit
            .acquire()
            .await
            .expect("the semaphore is never closed");
        match tokio::time::timeout(self.timeout, f(self.controller.clone())).await {
            Ok(Ok(response)) => Ok(response.into_inner()),
            Ok(Err(status)) => Err(CallError::Status(status)),
            Err(_) => Err(CallError::Timeout(self.timeout)),
        }
    }

    pub async fn create_volume(
        &self,
        request: proto::CreateVolumeRequest,
    ) -> Result<proto::Volume, CallError> {
        let response = self
            .call(|mut c| async move { c.create_volume(request).await })
            .await?;
        response.volume.ok_or_else(|| {
            CallError::Status(Status::internal("CreateVolume answered without a volume"))
        })
    }

    pub async fn delete_volume(
        &self,
        volume_id: &str,
        secrets: HashMap<String, String>,
    ) -> Result<(), CallError> {
        let request = proto::DeleteVolumeRequest {
            volume_id: volume_id.to_owned(),
            secrets,
        };
        self.call(|mut c| async move { c.delete_volume(request).await })
            .await
            .map(drop)
    }

    pub async fn publish(
        &self,
        request: proto::ControllerPublishVolumeRequest,
    ) -> Result<HashMap<String, String>, CallError> {
        self.call(|mut c| async move { c.controller_publish_volume(request).await })
            .await
            .map(|r| r.publish_context)
    }

    pub async fn unpublish(
        &self,
        request: proto::ControllerUnpublishVolumeRequest,
    ) -> Result<(), CallError> {
        self.call(|mut c| async move { c.controller_unpublish_volume(request).await })
            .await
            .map(drop)
    }

    pub async fn expand(
        &self,
        request: proto::ControllerExpandVolumeRequest,
    ) -> Result<proto::ControllerExpandVolumeResponse, CallError> {
        self.call(|mut c| async move { c.controller_expand_volume(request).await })
            .await
    }

    pub async fn modify(
        &self,
        request: proto::ControllerModifyVolumeRequest,
    ) -> Result<(), CallError> {
        self.call(|mut c| async move { c.controller_modify_volume(request).await })
            .await
            .map(drop)
    }

    pub async fn create_snapshot(
        &self,
        request: proto::CreateSnapshotRequest,
    ) -> Result<proto::Snapshot, CallError> {
        let response = self
            .call(|mut c| async move { c.create_snapshot(request).await })
            .await?;
        response.snapshot.ok_or_else(|| {
            CallError::Status(Status::internal(
                "CreateSnapshot answered without a snapshot",
            ))
        })
    }

    pub async fn delete_snapshot(
        &self,
        snapshot_id: &str,
        secrets: HashMap<String, String>,
    ) -> Result<(), CallError> {
        let request = proto::DeleteSnapshotRequest {
            snapshot_id: snapshot_id.to_owned(),
            secrets,
        };
        self.call(|mut c| async move { c.delete_snapshot(request).await })
            .await
            .map(drop)
    }

    /// The snapshot `snapshot_id` as ListSnapshots shows it; `None` when unknown.
    pub async fn get_snapshot(
        &self,
        snapshot_id: &str,
    ) -> Result<Option<proto::Snapshot>, CallError> {
        let request = proto::ListSnapshotsRequest {
            snapshot_id: snapshot_id.to_owned(),
            ..Default::default()
        };
        let response = self
            .call(|mut c| async move { c.list_snapshots(request).await })
            .await?;
        Ok(response
            .entries
            .into_iter()
            .filter_map(|e| e.snapshot)
            .find(|s| s.snapshot_id == snapshot_id))
    }
}

/// The CSI capability for one access mode and a filesystem (`fs_type`, `mount_flags`)
/// or raw block volume.
pub fn capability(
    mode: AccessMode,
    block: bool,
    fs_type: Option<&str>,
    mount_flags: &[String],
) -> proto::VolumeCapability {
    let mode = access_mode_to_proto(mode);
    let access_type = if block {
        vc::AccessType::Block(vc::BlockVolume {})
    } else {
        vc::AccessType::Mount(vc::MountVolume {
            fs_type: fs_type.unwrap_or_default().to_owned(),
            mount_flags: mount_flags.to_vec(),
            volume_mount_group: String::new(),
        })
    };
    proto::VolumeCapability {
        access_type: Some(access_type),
        access_mode: Some(vc::AccessMode { mode: mode as i32 }),
    }
}

/// The capability a PV was provisioned for: its first known access mode, its volume
/// mode, the csi fsType and its mountOptions. `None` without a known access mode.
pub fn pv_capability(
    pv: &k8s_openapi::api::core::v1::PersistentVolume,
) -> Option<proto::VolumeCapability> {
    let spec = pv.spec.as_ref()?;
    let mode = spec
        .access_modes
        .as_deref()
        .unwrap_or_default()
        .iter()
        .find_map(|m| access_mode_from_kubernetes(m))?;
    let block = spec.volume_mode.as_deref() == Some("Block");
    let fs_type = spec.csi.as_ref().and_then(|c| c.fs_type.as_deref());
    let mount_flags = spec.mount_options.clone().unwrap_or_default();
    Some(capability(mode, block, fs_type, &mount_flags))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn final_and_in_progress_errors() {
        let in_progress = [
            Code::Cancelled,
            Code::DeadlineExceeded,
            Code::Unavailable,
            Code::ResourceExhausted,
            Code::Aborted,
        ];
        for code in in_progress {
            assert!(
                !CallError::Status(Status::new(code, "x")).is_final(),
                "{code:?}"
            );
        }
        for code in [
            Code::InvalidArgument,
            Code::OutOfRange,
            Code::AlreadyExists,
            Code::Internal,
            Code::NotFound,
        ] {
            assert!(
                CallError::Status(Status::new(code, "x")).is_final(),
                "{code:?}"
            );
        }
        assert!(!CallError::Timeout(Duration::from_secs(1)).is_final());
    }
}
