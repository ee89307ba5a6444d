//! stowage's CSI driver: the storage backends ([`backend`]: NFS sub-directories over
//! `stowage-nfs`, EBS volumes over aws-sdk-ec2, EC2 instance metadata), the CSI gRPC
//! server ([`csi`]: Identity, Controller, Node, kubelet's plugin registration) and the
//! node's OS work ([`node`]: mounts, devices, formatting, stats).
//!
//! Must never import kube or k8s-openapi: the driver knows CSI, not Kubernetes objects.
//! The Kubernetes side is `stowage-loops`, which reaches this crate only over the CSI
//! socket.
#![forbid(unsafe_code)]

pub mod backend;
pub mod csi;
pub mod node;
