//! The CSI gRPC server: request validation into domain types (the plain mappings are
//! `stowage_api::convert`'s), the in-flight guard and the one mapping from domain
//! errors to gRPC status codes. Handlers follow
//! validate → guard → act → map. This layer never calls AWS, NFS or Kubernetes
//! directly: it goes through [`crate::backend::Backends`] and [`crate::node::Mounter`].

pub mod authority;
pub mod controller;
pub mod identity;
pub mod inflight;
pub mod node;
pub mod registration;
pub mod server;
pub mod status;
pub mod validate;

use stowage_api::proto::csi as proto;

/// The plugin's name and version, as Identity reports them.
#[derive(Debug, Clone)]
pub struct PluginInfo {
    pub name: String,
    pub version: String,
}

use std::future::Future;
use std::time::Instant;

use tonic::{Response, Status};

use stowage_api::metrics::Metrics;

/// Run one RPC body, record its duration and status code, log failures, wrap the reply.
pub(crate) async fn observe<T>(
    metrics: &Metrics,
    method: &'static str,
    call: impl Future<Output = Result<T, Status>>,
) -> Result<Response<T>, Status> {
    let started = Instant::now();
    let result = call.await;
    let elapsed = started.elapsed();
    match &result {
        Ok(_) => {
            metrics.observe_operation(method, "OK", elapsed);
            tracing::debug!(method, elapsed_ms = elapsed.as_millis() as u64, "ok");
        }
        Err(status) => {
            metrics.observe_operation(method, &format!("{:?}", status.code()), elapsed);
            tracing::info!(method, code = ?status.code(), message = status.message(), "failed");
        }
    }
    result.map(Response::new)
}
