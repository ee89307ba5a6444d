//! stowage: a Kubernetes CSI driver and dynamic provisioner in one binary.
//!
//! # Layout
//!
//! - [`config`]: the command line (`controller`, `node`, `local`, `nfs-server`, `bench`).
//! - [`run`]: wiring only: build backends, bind sockets, spawn tasks, shut down.
//! - [`telemetry`], [`metrics`]: logs; Prometheus `/metrics` and `/healthz`.
//! - [`volume`]: domain types, free of tonic/kube/backend crates.
//! - [`csi`]: the gRPC layer, one file per CSI service; validation, the in-flight
//!   guard and the one error mapping. Never calls NFS/AWS/Kubernetes directly.
//! - [`backend`]: the `Backend` trait, the NFS backend (with the embedded NFS server
//!   of `stowage local`) and the EBS backend (aws-sdk-ec2).
//! - [`node`]: mounting, block devices (lookup, format, grow), instance metadata,
//!   filesystem statistics and keeping node paths under kubelet's directory.
//! - [`provisioner`]: the Kubernetes loops (provisioner, attacher, resizer, leader
//!   election) over kube-rs, driving CSI over the socket; [`provisioner::rules`] holds
//!   their pure decisions and object builders (k8s-openapi types only, no I/O).
//! - [`bench`](mod@bench): `stowage bench`, NFS CreateVolume latency and pairs/s; EBS
//!   concurrent CreateVolume with EC2 calls per volume; `bench provision`, claims to
//!   Bound against a cluster.
#![forbid(unsafe_code)]

pub mod backend;
pub mod bench;
pub mod config;
pub mod csi;
pub mod metrics;
pub mod node;
pub mod provisioner;
pub mod run;
pub mod telemetry;
pub mod volume;
