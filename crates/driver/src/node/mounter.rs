//! The [`Mounter`] trait and [`SystemMounter`], which runs mount(8)/umount(8) with a
//! timeout, bind-mounts opened directories with mount(2), and reads
//! `/proc/self/mountinfo`.

use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use async_trait::async_trait;
use tokio::process::Command;

#[derive(Debug, thiserror::Error)]
pub enum MountError {
    #[error("`{command}` failed: {output}")]
    Failed { command: String, output: String },
    #[error("`{command}` did not finish within {after:?}")]
    Timeout { command: String, after: Duration },
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// Mount operations the node plugin needs.
#[async_trait]
pub trait Mounter: Send + Sync {
    /// `mount -t fs_type -o options source target`.
    async fn mount(
        &self,
        source: &str,
        target: &Path,
        fs_type: &str,
        options: &[String],
    ) -> Result<(), MountError>;
    /// Bind-mount `source` on `target`, read-only when asked.
    async fn bind(&self, source: &Path, target: &Path, read_only: bool) -> Result<(), MountError>;
    /// Bind-mount the directory `source` was opened on (never a path looked up
    /// again) on `target`, read-only when asked.
    async fn bind_opened(
        &self,
        source: OwnedFd,
        target: &Path,
        read_only: bool,
    ) -> Result<(), MountError>;
    /// Unmount `target` (one layer).
    async fn unmount(&self, target: &Path) -> Result<(), MountError>;
    /// Is `target` a mount point?
    async fn is_mounted(&self, target: &Path) -> Result<bool, MountError>;
}

/// The mount(8) arguments for a filesystem mount. Pure, so tests can check exactly
/// what would run where the kernel can't (no NFS client here).
pub fn mount_args(source: &str, target: &Path, fs_type: &str, options: &[String]) -> Vec<String> {
    let mut args = vec!["-t".to_owned(), fs_type.to_owned()];
    if !options.is_empty() {
        args.push("-o".to_owned());
        args.push(options.join(","));
    }
    args.push(source.to_owned());
    args.push(target.display().to_string());
    args
}

/// Mount points listed in a `/proc/self/mountinfo` text (field 5, octal escapes undone).
pub fn mount_points(mountinfo: &str) -> Vec<PathBuf> {
    mountinfo
        .lines()
        .filter_map(|line| line.split(' ').nth(4))
        .map(|field| PathBuf::from(unescape_octal(field)))
        .collect()
}

/// Source and filesystem type of the mount at `target` in a `/proc/self/mountinfo` text
/// (the last one, if stacked).
pub fn mount_entry(mountinfo: &str, target: &Path) -> Option<(String, String)> {
    mountinfo
        .lines()
        .rev()
        .filter(|line| {
            line.split(' ').nth(4).map(unescape_octal).as_deref()
                == Some(&*target.to_string_lossy())
        })
        .filter_map(|line| {
            // Fields after the " - " separator: fstype, source, super options.
            let (_, rest) = line.split_once(" - ")?;
            let mut fields = rest.split(' ');
            let fs_type = fields.next()?.to_owned();
            let source = unescape_octal(fields.next()?);
            Some((source, fs_type))
        })
        .next()
}

fn unescape_octal(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let escaped = bytes[i] == b'\\'
            && i + 3 < bytes.len()
            && bytes[i + 1..i + 4]
                .iter()
                .all(|b| (b'0'..=b'7').contains(b));
        if escaped {
            let value =
                (bytes[i + 1] - b'0') * 64 + (bytes[i + 2] - b'0') * 8 + (bytes[i + 3] - b'0');
            out.push(value);
            i += 4;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Runs the host's mount(8) and umount(8).
#[derive(Debug, Clone)]
pub struct SystemMounter {
    timeout: Duration,
}

impl Default for SystemMounter {
    fn default() -> Self {
        Self {
            timeout: Duration::from_secs(120),
        }
    }
}

impl SystemMounter {
    pub fn new(timeout: Duration) -> Self {
        Self { timeout }
    }

    async fn run(&self, program: &str, args: &[String]) -> Result<(), MountError> {
        let command = format!("{program} {}", args.join(" "));
        tracing::debug!(%command, "running");
        let child = Command::new(program)
            .args(args)
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .output();
        let output = tokio::time::timeout(self.timeout, child)
            .await
            .map_err(|_| MountError::Timeout {
                command: command.clone(),
                after: self.timeout,
            })??;
        if output.status.success() {
            return Ok(());
        }
        let mut text = String::from_utf8_lossy(&output.stderr).trim().to_owned();
        if text.is_empty() {
            text = String::from_utf8_lossy(&output.stdout).trim().to_owned();
        }
        Err(MountError::Failed {
            command,
            output: format!("{text} ({})", output.status),
        })
    }
}

#[async_trait]
impl Mounter for SystemMounter {
    async fn mount(
        &self,
        source: &str,
        target: &Path,
        fs_type: &str,
        options: &[String],
    ) -> Result<(), MountError> {
        self.run("mount", &mount_args(source, target, fs_type, options))
            .await
    }

    async fn bind(&self, source: &Path, target: &Path, read_only: bool) -> Result<(), MountError> {
        let target_arg = target.display().to_string();
        self.run(
            "mount",
            &[
                "--bind".into(),
                source.display().to_string(),
                target_arg.clone(),
            ],
        )
        .await?;
        if read_only {
            let remount = ["-o".into(), "remount,bind,ro".into(), target_arg];
            if let Err(e) = self.run("mount", &remount).await {
                let _ = self.unmount(target).await;
                return Err(e);
            }
        }
        Ok(())
    }

    async fn bind_opened(
        &self,
        source: OwnedFd,
        target: &Path,
        read_only: bool,
    ) -> Result<(), MountError> {
        let target = target.to_path_buf();
        let bound =
            tokio::task::spawn_blocking(move || bind_descriptor(&source, &target, read_only));
        tokio::time::timeout(self.timeout, bound)
            .await
            .map_err(|_| MountError::Timeout {
                command: "mount(2) MS_BIND".into(),
                after: self.timeout,
            })?
            .map_err(std::io::Error::other)?
    }

    async fn unmount(&self, target: &Path) -> Result<(), MountError> {
        self.run("umount", &[target.display().to_string()]).await
    }

    async fn is_mounted(&self, target: &Path) -> Result<bool, MountError> {
        let mountinfo = tokio::fs::read_to_string("/proc/self/mountinfo").await?;
        Ok(mount_points(&mountinfo).iter().any(|p| p == target))
    }
}

/// mount(2) `MS_BIND` from `/proc/self/fd/<n>`: the kernel binds the very directory
/// the descriptor was opened on, whatever its path leads to by now.
fn bind_descriptor(source: &OwnedFd, target: &Path, read_only: bool) -> Result<(), MountError> {
    use nix::mount::{MsFlags, mount};
    let from = format!("/proc/self/fd/{}", source.as_raw_fd());
    let failed = |what: &str, errno: nix::errno::Errno| MountError::Failed {
        command: format!("mount(2) {what} {from} {}", target.display()),
        output: errno.desc().to_owned(),
    };
    mount(
        Some(from.as_str()),
        target,
        None::<&str>,
        MsFlags::MS_BIND,
        None::<&str>,
    )
    .map_err(|e| failed("MS_BIND", e))?;
    if read_only {
        let flags = MsFlags::MS_REMOUNT | MsFlags::MS_BIND | MsFlags::MS_RDONLY;
        if let Err(e) = mount(None::<&str>, target, None::<&str>, flags, None::<&str>) {
            let _ = nix::mount::umount(target);
            return Err(failed("MS_REMOUNT|MS_RDONLY", e));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nfs_mount_arguments() {
        let args = mount_args(
            "10.0.0.5:/export/pvc-1",
            Path::new("/var/lib/kubelet/pods/x/mount"),
            "nfs",
            &["vers=3".into(), "nolock".into()],
        );
        assert_eq!(
            args,
            [
                "-t",
                "nfs",
                "-o",
                "vers=3,nolock",
                "10.0.0.5:/export/pvc-1",
                "/var/lib/kubelet/pods/x/mount"
            ]
        );
        assert_eq!(
            mount_args("a", Path::new("/b"), "ext4", &[]),
            ["-t", "ext4", "a", "/b"]
        );
    }

    #[test]
    fn parses_mountinfo_with_escapes() {
        let text = "36 35 98:0 /mnt1 /mnt/with\\040space rw,noatime master:1 - ext3 /dev/root rw\n\
                    37 35 0:5 / /proc rw - proc proc rw\n";
        assert_eq!(
            mount_points(text),
            [PathBuf::from("/mnt/with space"), PathBuf::from("/proc")]
        );
        assert_eq!(
            mount_entry(text, Path::new("/mnt/with space")),
            Some(("/dev/root".to_owned(), "ext3".to_owned()))
        );
        assert_eq!(mount_entry(text, Path::new("/nope")), None);
    }
}
