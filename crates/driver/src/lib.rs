//! stowage's CSI driver: the storage backends ([`backend`]: NFS sub-directories over
//! `stowage-nfs`, EBS volumes over aws-sdk-ec2, EC2 instance metadata), the CSI gRPC
//! server ([`csi`]: Identity, Controller, Node, kubelet's plugin registration) and the
//! node's OS work ([`node`]: mounts, devices, formatting, stats).
//!
//! Where a StorageClass key is validated, one place per backend, before any I/O:
//! NFS keys (`server`, `share`, `subDir`, `mountPermissions`, `onDelete`, `uid`,
//! `gid`, and the rules for paths on an export) in `backend/nfs/params.rs`; EBS keys
//! (`type`, `iops`, `throughput`, `tagSpecification_<N>` …) in `backend/ebs/params.rs`;
//! the rules both share (the one error type, keys case-insensitive, templates) in
//! `backend/params.rs`; `backend` itself in `backend/mod.rs` (routing). The reserved
//! `csi.storage.k8s.io/*` keys are the loops' (`stowage-loops` rules.rs).
//!
//! Must never import kube or k8s-openapi: the driver knows CSI, not Kubernetes objects.
//! The Kubernetes side is `stowage-loops`, which reaches this crate only over the CSI
//! socket.
#![forbid(unsafe_code)]

pub mod backend;
pub mod csi;
pub mod node;
