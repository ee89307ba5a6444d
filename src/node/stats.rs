//! Filesystem usage of a mounted volume, from statvfs(2).

use std::path::Path;
use std::time::Duration;

use nix::sys::statvfs::statvfs;

use crate::volume::Usage;

/// [`usage`] off the async threads, bounded by `timeout`: statvfs on a hung NFS
/// mount blocks, and must not block the CSI server with it.
pub async fn usage_within(path: &Path, timeout: Duration) -> std::io::Result<Usage> {
    let owned = path.to_owned();
    let work = tokio::task::spawn_blocking(move || usage(&owned));
    match tokio::time::timeout(timeout, work).await {
        Ok(joined) => joined.map_err(std::io::Error::other)?,
        Err(_) => Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!(
                "statvfs {} did not answer within {timeout:?}",
                path.display()
            ),
        )),
    }
}

/// Bytes and inodes of the filesystem holding `path`.
pub fn usage(path: &Path) -> std::io::Result<Usage> {
    let st = statvfs(path).map_err(std::io::Error::from)?;
    let fragment = st.fragment_size() as u64;
    let bytes_total = st.blocks() as u64 * fragment;
    let bytes_free = st.blocks_free() as u64 * fragment;
    let bytes_available = st.blocks_available() as u64 * fragment;
    let inodes_total = st.files() as u64;
    let inodes_free = st.files_free() as u64;
    Ok(Usage {
        bytes_total,
        bytes_available,
        bytes_used: bytes_total.saturating_sub(bytes_free),
        inodes_total,
        inodes_free,
        inodes_used: inodes_total.saturating_sub(inodes_free),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usage_of_a_tmpdir_is_consistent() {
        let dir = tempfile::tempdir().unwrap();
        let u = usage(dir.path()).unwrap();
        assert!(u.bytes_total > 0);
        assert!(u.bytes_available <= u.bytes_total);
        assert!(u.bytes_used <= u.bytes_total);
        assert!(u.inodes_used <= u.inodes_total);
    }
}
