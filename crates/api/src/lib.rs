//! What the CSI driver and the Kubernetes loops share, and nothing only one of them
//! needs: the generated CSI and plugin-registration protobufs ([`proto`]), the domain
//! types of a volume ([`volume`]), the conversions between those and CSI's and
//! Kubernetes' names ([`convert`]), the StorageClass key names ([`keys`]) and the
//! process's metric registry with its health checks ([`metrics`]).
//!
//! Must never import kube, k8s-openapi, aws-sdk-ec2 or nfs3_*: the loops depend on
//! this crate and must stay free of the backends, the driver must stay free of
//! Kubernetes.
#![forbid(unsafe_code)]

pub mod convert;
pub mod keys;
pub mod metrics;
pub mod volume;

/// Generated from `proto/csi.proto` (CSI spec v1.12.0) and
/// `proto/pluginregistration.proto` (kubelet's plugin registration, v1).
pub mod proto {
    /// The CSI services and messages (`csi.v1`).
    #[allow(clippy::all, clippy::pedantic, missing_docs)]
    pub mod csi {
        tonic::include_proto!("csi.v1");
    }
    /// kubelet's plugin registration (`pluginregistration`).
    #[allow(clippy::all, clippy::pedantic, missing_docs)]
    pub mod registration {
        tonic::include_proto!("pluginregistration");
    }
}
