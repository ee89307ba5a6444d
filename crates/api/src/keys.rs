//! StorageClass key names both sides of the CSI socket agree on: the reserved
//! `csi.storage.k8s.io/*` keys (the ones external-provisioner adds to CreateVolume and
//! the ones it consumes) and the driver's names ([`DriverNames`]). Backend-specific keys
//! live with their backend's parameter parser in `stowage-driver`.

/// The driver name a default install registers (`--driver-name`).
pub const DEFAULT_DRIVER_NAME: &str = "stowage.csi.dev";

/// The second name a default install registers (`--nfs-driver-name`): NFS volumes
/// provisioned under it never wait for a VolumeAttachment (its CSIDriver says
/// `attachRequired: false`), while the main name keeps `attachRequired: true` for EBS.
pub const DEFAULT_NFS_DRIVER_NAME: &str = "nfs.stowage.csi.dev";

/// The StorageClass parameter that picks a backend.
pub const BACKEND_PARAMETER: &str = "backend";

/// The CSI driver names one stowage answers to. A CSIDriver's `attachRequired` is one
/// value for all its volumes, so one install serving EBS (attached) and NFS (never
/// attached) registers two names: `main` for every backend (the name GetPluginInfo
/// gives; the leader Lease and stowage's finalizers are named after it) and `nfs`,
/// whose StorageClasses always get the NFS backend. PVs keep the name they were
/// provisioned under (a PV's driver cannot change), so both stay served.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DriverNames {
    pub main: String,
    pub nfs: Option<String>,
}

impl DriverNames {
    /// Only `main` (no NFS name).
    pub fn single(main: impl Into<String>) -> Self {
        Self {
            main: main.into(),
            nfs: None,
        }
    }

    /// `main` and, unless `nfs` is empty or the same, `nfs`.
    pub fn new(main: impl Into<String>, nfs: &str) -> Self {
        let main = main.into();
        let nfs = (!nfs.is_empty() && nfs != main).then(|| nfs.to_owned());
        Self { main, nfs }
    }

    /// Is `name` one of these?
    pub fn contains(&self, name: &str) -> bool {
        self.main == name || self.nfs.as_deref() == Some(name)
    }

    /// Is `name` the NFS-only name?
    pub fn is_nfs(&self, name: &str) -> bool {
        self.nfs.as_deref() == Some(name)
    }

    /// Every name, `main` first.
    pub fn iter(&self) -> impl Iterator<Item = &str> {
        std::iter::once(self.main.as_str()).chain(self.nfs.as_deref())
    }
}

impl std::fmt::Display for DriverNames {
    /// `a` or `a or b`, for messages.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.nfs {
            None => f.write_str(&self.main),
            Some(nfs) => write!(f, "{} or {nfs}", self.main),
        }
    }
}

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn driver_names_hold_the_nfs_name_only_when_it_differs() {
        let both = DriverNames::new("stowage.csi.dev", "nfs.stowage.csi.dev");
        assert!(both.contains("stowage.csi.dev") && both.contains("nfs.stowage.csi.dev"));
        assert!(both.is_nfs("nfs.stowage.csi.dev") && !both.is_nfs("stowage.csi.dev"));
        assert!(!both.contains("other.csi.dev"));
        assert_eq!(
            both.iter().collect::<Vec<_>>(),
            ["stowage.csi.dev", "nfs.stowage.csi.dev"]
        );
        assert_eq!(both.to_string(), "stowage.csi.dev or nfs.stowage.csi.dev");
        for off in ["", "stowage.csi.dev"] {
            let one = DriverNames::new("stowage.csi.dev", off);
            assert_eq!(one, DriverNames::single("stowage.csi.dev"));
            assert_eq!(one.iter().count(), 1);
            assert!(!one.is_nfs(""));
        }
    }
}
