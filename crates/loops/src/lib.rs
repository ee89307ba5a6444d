//! The Kubernetes side of stowage: the loops that watch PersistentVolumeClaims,
//! PersistentVolumes and VolumeAttachments and drive a CSI controller over its socket,
//! the way the upstream external-provisioner, external-attacher and external-resizer
//! sidecars do, in one process.
//!
//! - [`rules`]: PURE decisions and object builders (should a claim be provisioned, the
//!   PV name, the CreateVolume parameters, the PV object, the bind writes, should a PV
//!   be deleted). No I/O: every rule is table-tested with plain `#[test]`s.
//! - [`kube_client`]: the Kubernetes client (config, QPS limit, request counts).
//! - [`csi_client`]: the CSI client of the loops (call bound, timeouts, final vs
//!   in-progress) and its unix-socket channel.
//! - [`informer`], [`cache`], [`queue`]: shared watches, the compact caches of claims,
//!   PVs and attachments, and per-key work queues.
//! - [`claims`] (provision, restore, clone), [`volumes`] (release + delete),
//!   [`attacher`], [`resizer`] (expand, VolumeAttributesClass), [`snapshots`]
//!   (VolumeSnapshotContent ↔ CSI; VolumeSnapshot ↔ content): one reconciler each,
//!   built on the rules, never re-deciding them.
//! - [`leader`]: Lease-based leader election around all of them.
//! - [`context`]: the [`Context`] every reconciler reads and calls, settings, metrics,
//!   [`Next`]; unit tests build one from `fixtures` (a fake API server behind a real
//!   client, a fake CSI driver on a real socket) and call the reconcilers directly.
//! - [`runner`]: informers, queues and workers, under leader election ([`run`]).
//! - [`activity`]: what each worker is on and each object's last failure (served at
//!   `/debug/attempts`; a worker stuck past a bound fails liveness).
//!
//! The loops never touch backends directly: everything goes through CSI, so they can
//! drive any CSI driver given by `--csi-address`. This crate depends on `stowage-api`
//! (protobufs, key names, domain types) and never on `stowage-driver` or aws-sdk-ec2.

pub mod activity;
pub mod attacher;
pub mod cache;
pub mod claims;
pub mod context;
pub mod csi_client;
pub mod events;
#[cfg(test)]
pub mod fixtures;
pub mod informer;
pub mod kube_client;
pub mod leader;
pub mod queue;
pub mod resizer;
pub mod rules;
pub mod runner;
pub mod snapshots;
pub mod volumes;

pub use activity::Activity;
pub use context::{Context, Loop, LoopExpectations, LoopMetrics, Next, Settings};
pub use events::Events;
pub use runner::{Loops, run};
