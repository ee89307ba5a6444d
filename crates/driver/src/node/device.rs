//! Finding an attached block device: by serial under a by-id directory (real Nitro
//! instances: `/dev/disk/by-id/nvme-Amazon_Elastic_Block_Store_vol0abc…`; the directory
//! is a flag so tests can play the hypervisor), else the device name EC2 was given
//! (Xen instances: `/dev/xvdba`, sometimes renamed `/dev/sdba`).

use std::path::{Path, PathBuf};

/// Prefix of the by-id link of an EBS volume on Nitro instances.
pub const EBS_BY_ID_PREFIX: &str = "nvme-Amazon_Elastic_Block_Store_";

/// The device for `serial` (e.g. `vol0abc`), resolved to the real device node.
/// `None` when neither the by-id link nor the hint exists (not attached yet).
pub async fn find_device(by_id_dir: &Path, serial: &str, hint: Option<&str>) -> Option<PathBuf> {
    let link = by_id_dir.join(format!("{EBS_BY_ID_PREFIX}{serial}"));
    if let Ok(real) = tokio::fs::canonicalize(&link).await {
        return Some(real);
    }
    let hint = hint?;
    let mut candidates = vec![PathBuf::from(hint)];
    if let Some(rest) = hint.strip_prefix("/dev/xvd") {
        candidates.push(PathBuf::from(format!("/dev/sd{rest}")));
    }
    for candidate in candidates {
        if let Ok(real) = tokio::fs::canonicalize(&candidate).await {
            return Some(real);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn finds_by_serial_then_by_hint() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("loop7");
        std::fs::write(&target, "").unwrap();
        let link = dir.path().join(format!("{EBS_BY_ID_PREFIX}vol0abc"));
        std::os::unix::fs::symlink(&target, &link).unwrap();
        let found = find_device(dir.path(), "vol0abc", Some("/nonexistent")).await;
        assert_eq!(found, Some(std::fs::canonicalize(&target).unwrap()));
        assert_eq!(find_device(dir.path(), "vol0def", None).await, None);
        let hint = target.display().to_string();
        assert_eq!(
            find_device(dir.path(), "vol0def", Some(&hint)).await,
            Some(std::fs::canonicalize(&target).unwrap())
        );
    }
}
