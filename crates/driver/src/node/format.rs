//! Filesystems on block devices: what is on a device (blkid), making one on a blank
//! device only (mkfs), growing one after expansion (resize2fs / xfs_growfs). Every
//! command runs with a timeout; nothing here decides policy.

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use tokio::process::Command;

use super::MountError;

/// How long mkfs/resize may take (large volumes take a while).
const TIMEOUT: Duration = Duration::from_secs(600);

async fn run(program: &str, args: &[String]) -> Result<std::process::Output, MountError> {
    let command = format!("{program} {}", args.join(" "));
    let child = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output();
    tokio::time::timeout(TIMEOUT, child)
        .await
        .map_err(|_| MountError::Timeout {
            command: command.clone(),
            after: TIMEOUT,
        })?
        .map_err(MountError::Io)
}

fn failed(program: &str, args: &[String], output: &std::process::Output) -> MountError {
    MountError::Failed {
        command: format!("{program} {}", args.join(" ")),
        output: format!(
            "{} ({})",
            String::from_utf8_lossy(&output.stderr).trim(),
            output.status
        ),
    }
}

/// The filesystem type on `device` (`ext4`, `xfs`, …), `None` when blank.
/// Any other signature (a partition table, LVM, …) counts as not blank.
pub async fn filesystem_of(device: &Path) -> Result<Option<String>, MountError> {
    let args: Vec<String> = ["-p", "-o", "export"]
        .iter()
        .map(|s| s.to_string())
        .chain([device.display().to_string()])
        .collect();
    let output = run("blkid", &args).await?;
    match output.status.code() {
        // blkid -p: 2 = nothing found.
        Some(2) => Ok(None),
        Some(0) => {
            let text = String::from_utf8_lossy(&output.stdout);
            let field = |key: &str| {
                text.lines()
                    .find_map(|l| l.strip_prefix(&format!("{key}=")).map(str::to_owned))
            };
            Ok(field("TYPE")
                .or_else(|| field("PTTYPE"))
                .or(Some("unknown".into())))
        }
        _ => Err(failed("blkid", &args, &output)),
    }
}

/// Make `fs_type` on `device` unless it already has a filesystem. Returns whether it
/// formatted. A different existing filesystem is an error: data is never overwritten.
pub async fn ensure_filesystem(
    device: &Path,
    fs_type: &str,
    mkfs_args: &[String],
) -> Result<bool, MountError> {
    match filesystem_of(device).await? {
        Some(existing) if existing == fs_type => Ok(false),
        Some(existing) => Err(MountError::Failed {
            command: format!("blkid {}", device.display()),
            output: format!("the device holds {existing}, not {fs_type}; refusing to format it"),
        }),
        None => {
            let mut args = mkfs_args.to_vec();
            if fs_type.starts_with("ext") {
                // No lazy init: the volume is ready at once (and no background writes).
                args.extend([
                    "-F".into(),
                    "-E".into(),
                    "lazy_itable_init=0,lazy_journal_init=0".into(),
                ]);
            }
            args.push(device.display().to_string());
            let program = format!("mkfs.{fs_type}");
            let output = run(&program, &args).await?;
            if output.status.success() {
                Ok(true)
            } else {
                Err(failed(&program, &args, &output))
            }
        }
    }
}

/// Grow the filesystem mounted at `mount_point` from `device` to fill the device.
pub async fn grow_filesystem(
    device: &Path,
    mount_point: &Path,
    fs_type: &str,
) -> Result<(), MountError> {
    let (program, args) = match fs_type {
        "xfs" => ("xfs_growfs", vec![mount_point.display().to_string()]),
        _ => ("resize2fs", vec![device.display().to_string()]),
    };
    let output = run(program, &args).await?;
    if output.status.success() {
        return Ok(());
    }
    let mut error = failed(program, &args, &output);
    if let MountError::Failed { output: text, .. } = &mut error
        && text.contains("Permission denied")
    {
        text.push_str(
            " — online ext4 growth needs CAP_SYS_RESOURCE in the node plugin's container",
        );
    }
    Err(error)
}
