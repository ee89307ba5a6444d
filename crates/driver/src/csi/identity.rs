//! CSI Identity service: plugin name and version, capabilities, readiness probe.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::proto::{self, identity_server::Identity, plugin_capability as pc};
use super::{PluginInfo, observe};
use stowage_api::metrics::Metrics;

pub struct IdentityService {
    info: PluginInfo,
    controller: bool,
    topology: bool,
    expansion: bool,
    metrics: Arc<Metrics>,
}

impl IdentityService {
    /// `controller`: advertise CONTROLLER_SERVICE (true where the Controller service runs);
    /// `topology`: advertise VOLUME_ACCESSIBILITY_CONSTRAINTS (volumes tied to zones);
    /// `expansion`: advertise online VolumeExpansion.
    pub fn new(
        info: PluginInfo,
        controller: bool,
        topology: bool,
        expansion: bool,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            info,
            controller,
            topology,
            expansion,
            metrics,
        }
    }
}

#[tonic::async_trait]
impl Identity for IdentityService {
    async fn get_plugin_info(
        &self,
        _request: Request<proto::GetPluginInfoRequest>,
    ) -> Result<Response<proto::GetPluginInfoResponse>, Status> {
        observe(&self.metrics, "/csi.v1.Identity/GetPluginInfo", async {
            Ok(proto::GetPluginInfoResponse {
                name: self.info.name.clone(),
                vendor_version: self.info.version.clone(),
                manifest: Default::default(),
            })
        })
        .await
    }

    async fn get_plugin_capabilities(
        &self,
        _request: Request<proto::GetPluginCapabilitiesRequest>,
    ) -> Result<Response<proto::GetPluginCapabilitiesResponse>, Status> {
        observe(
            &self.metrics,
            "/csi.v1.Identity/GetPluginCapabilities",
            async {
                let service = |t: pc::service::Type| proto::PluginCapability {
                    r#type: Some(pc::Type::Service(pc::Service { r#type: t as i32 })),
                };
                let capabilities = [
                    self.controller
                        .then(|| service(pc::service::Type::ControllerService)),
                    self.topology
                        .then(|| service(pc::service::Type::VolumeAccessibilityConstraints)),
                ]
                .into_iter()
                .flatten()
                .chain(self.expansion.then(|| proto::PluginCapability {
                    r#type: Some(pc::Type::VolumeExpansion(pc::VolumeExpansion {
                        r#type: pc::volume_expansion::Type::Online as i32,
                    })),
                }))
                .collect();
                Ok(proto::GetPluginCapabilitiesResponse { capabilities })
            },
        )
        .await
    }

    async fn probe(
        &self,
        _request: Request<proto::ProbeRequest>,
    ) -> Result<Response<proto::ProbeResponse>, Status> {
        observe(&self.metrics, "/csi.v1.Identity/Probe", async {
            Ok(proto::ProbeResponse { ready: Some(true) })
        })
        .await
    }
}
