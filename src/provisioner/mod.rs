//! The provisioner side of stowage: the loops that watch PersistentVolumeClaims and
//! PersistentVolumes and drive the CSI controller over its socket, the way the upstream
//! external-provisioner sidecar does.
//!
//! - [`rules`]: PURE decisions and object builders (should a claim be provisioned, the
//!   PV name, the CreateVolume parameters, the PV object, the bind writes, should a PV
//!   be deleted). No I/O and no API client: only k8s-openapi types in, values out, so
//!   every rule is table-tested with plain `#[test]`s.
//!
//! The reconcilers that do the API I/O build on these rules and never re-decide them.

pub mod rules;
