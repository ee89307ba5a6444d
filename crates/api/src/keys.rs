//! StorageClass key names both sides of the CSI socket agree on: the reserved
//! `csi.storage.k8s.io/*` keys (the ones external-provisioner adds to CreateVolume and
//! the ones it consumes) and the driver's default name. Backend-specific keys live with
//! their backend's parameter parser in `stowage-driver`.

/// The driver name a default install registers (`--driver-name`).
pub const DEFAULT_DRIVER_NAME: &str = "stowage.csi.dev";

/// Prefix of the keys Kubernetes reserves in StorageClass parameters.
pub const RESERVED_PREFIX: &str = "csi.storage.k8s.io/";
/// Added by the provisioner: the claim's name, namespace and the PV name.
pub const PVC_NAME: &str = "csi.storage.k8s.io/pvc/name";
pub const PVC_NAMESPACE: &str = "csi.storage.k8s.io/pvc/namespace";
pub const PV_NAME: &str = "csi.storage.k8s.io/pv/name";

/// The StorageClass key carrying the filesystem type (external-provisioner usually
/// moves it into the capability's `fs_type`; the EBS backend accepts it in either place).
pub const FSTYPE_KEY: &str = "csi.storage.k8s.io/fstype";

/// The reserved `csi.storage.k8s.io/*` StorageClass keys external-provisioner knows:
/// fstype and the secret references. They are consumed by the provisioner and never
/// passed to CreateVolume; any other key with the reserved prefix is an error.
pub const KNOWN_RESERVED_KEYS: [&str; 17] = [
    FSTYPE_KEY,
    "csi.storage.k8s.io/secret-name",
    "csi.storage.k8s.io/secret-namespace",
    "csi.storage.k8s.io/provisioner-secret-name",
    "csi.storage.k8s.io/provisioner-secret-namespace",
    "csi.storage.k8s.io/controller-publish-secret-name",
    "csi.storage.k8s.io/controller-publish-secret-namespace",
    "csi.storage.k8s.io/node-stage-secret-name",
    "csi.storage.k8s.io/node-stage-secret-namespace",
    "csi.storage.k8s.io/node-publish-secret-name",
    "csi.storage.k8s.io/node-publish-secret-namespace",
    "csi.storage.k8s.io/controller-expand-secret-name",
    "csi.storage.k8s.io/controller-expand-secret-namespace",
    "csi.storage.k8s.io/node-expand-secret-name",
    "csi.storage.k8s.io/node-expand-secret-namespace",
    "csi.storage.k8s.io/controller-modify-secret-name",
    "csi.storage.k8s.io/controller-modify-secret-namespace",
];
