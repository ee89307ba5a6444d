//! Plays the EC2 hypervisor of one instance on this host: volumes that the emulator
//! says are attached to the instance become real loop devices, named the way a Nitro
//! instance's udev names EBS volumes:
//! `<by_id_dir>/nvme-Amazon_Elastic_Block_Store_vol0abc…` → `/dev/loopN`
//! (serial = volume id without the dash).
//!
//! No background polling: the test calls [`Hypervisor::sync`] after whatever changed
//! the attachments (ControllerPublish/Unpublish, raw AttachVolume …). Each volume is
//! backed by a sparse image `<images_dir>/<volume id>.img` of the volume's size,
//! kept across detach and re-attach (data survives, as on EBS), grown when the volume
//! grows, and deleted when the volume is deleted or the hypervisor dropped. Drop
//! detaches every loop device it made. Needs root.
//!
//! Snapshots hold data as EBS's do: a snapshot of one of the emulator's volumes is
//! captured, at the first `sync` that sees it, as a copy of its volume's image
//! (`<images_dir>/<snapshot id>.img`), and a volume created from a snapshot starts as
//! a copy of that image (moto keeps no data). A clone made through a snapshot that is
//! already gone again (stowage deletes it once the clone exists, as EBS allows) starts
//! as a copy of its source volume's image, named by its `stowage.csi.dev/source-volume`
//! tag. Callers flush the volume (`sync` in the pod) before snapshotting it, as one
//! would before an EBS snapshot.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use super::moto::Ec2Query;

pub const GIB: u64 = 1 << 30;

/// `nvme-Amazon_Elastic_Block_Store_vol0abc` for `vol-0abc`.
pub fn by_id_name(volume_id: &str) -> String {
    format!(
        "nvme-Amazon_Elastic_Block_Store_{}",
        volume_id.replacen('-', "", 1)
    )
}

pub struct Hypervisor {
    ec2: Ec2Query,
    instance_id: String,
    by_id_dir: PathBuf,
    images_dir: PathBuf,
    state: tokio::sync::Mutex<State>,
}

#[derive(Default)]
struct State {
    /// volume id → loop device, for the volumes attached now.
    devices: BTreeMap<String, PathBuf>,
    /// Volumes whose image this hypervisor created (attached or not).
    images: BTreeSet<String>,
    /// Snapshots captured (their image copied from the volume's).
    snapshots: BTreeSet<String>,
}

impl Hypervisor {
    /// Creates `by_id_dir` and `images_dir` if needed. `moto_endpoint` is where the
    /// attachments are read: moto itself, not a fault proxy.
    pub fn new(
        moto_endpoint: impl Into<String>,
        instance_id: impl Into<String>,
        by_id_dir: PathBuf,
        images_dir: PathBuf,
    ) -> Hypervisor {
        std::fs::create_dir_all(&by_id_dir).unwrap();
        std::fs::create_dir_all(&images_dir).unwrap();
        Hypervisor {
            ec2: Ec2Query::new(moto_endpoint),
            instance_id: instance_id.into(),
            by_id_dir,
            images_dir,
            state: Default::default(),
        }
    }

    pub fn instance_id(&self) -> &str {
        &self.instance_id
    }

    pub fn by_id_dir(&self) -> &Path {
        &self.by_id_dir
    }

    /// Where the by-id symlink of `volume_id` is (or would be).
    pub fn link(&self, volume_id: &str) -> PathBuf {
        self.by_id_dir.join(by_id_name(volume_id))
    }

    /// The loop device `volume_id` is attached as, per its by-id symlink.
    pub fn device(&self, volume_id: &str) -> Option<PathBuf> {
        std::fs::read_link(self.link(volume_id)).ok()
    }

    /// The backing image of `volume_id`.
    pub fn image(&self, volume_id: &str) -> PathBuf {
        self.images_dir.join(format!("{volume_id}.img"))
    }

    /// volume id → loop device, for the volumes attached as of the last `sync`.
    pub async fn devices(&self) -> BTreeMap<String, PathBuf> {
        self.state.lock().await.devices.clone()
    }

    /// Makes the host match the emulator: a loop device + by-id symlink for every
    /// volume attached (`attaching`/`attached`) to the instance, none for the others.
    pub async fn sync(&self) {
        let volumes = self.ec2.describe_volumes().await;
        let snapshots = self.ec2.describe_snapshots().await;
        let mut state = self.state.lock().await;
        for (snapshot, volume) in &snapshots {
            // Only snapshots of volumes the emulator has: moto also lists hundreds of
            // its AMIs' snapshots, of volumes that never existed.
            if state.snapshots.contains(snapshot) || !volumes.iter().any(|v| &v.id == volume) {
                continue;
            }
            let source = self.image(volume);
            let captured = self.image(snapshot);
            if source.exists() {
                copy_sparse(&source, &captured).await;
            } else {
                std::fs::File::create(&captured).unwrap();
            }
            state.snapshots.insert(snapshot.clone());
        }
        let gone: Vec<String> = state
            .snapshots
            .iter()
            .filter(|id| !snapshots.iter().any(|(s, _)| s == *id))
            .cloned()
            .collect();
        for id in gone {
            state.snapshots.remove(&id);
            let _ = std::fs::remove_file(self.image(&id));
        }
        let wanted: BTreeMap<&str, (u64, Option<&str>, Option<&str>)> = volumes
            .iter()
            .filter(|v| {
                v.attachments.iter().any(|a| {
                    a.instance_id == self.instance_id
                        && matches!(a.state.as_str(), "attaching" | "attached")
                })
            })
            .map(|v| {
                let source = v
                    .tags
                    .get("stowage.csi.dev/source-volume")
                    .map(String::as_str);
                (
                    v.id.as_str(),
                    (v.size_gib, v.snapshot_id.as_deref(), source),
                )
            })
            .collect();

        let detached: Vec<String> = state
            .devices
            .keys()
            .filter(|id| !wanted.contains_key(id.as_str()))
            .cloned()
            .collect();
        for id in detached {
            let device = state.devices.remove(&id).unwrap();
            remove_link(&self.link(&id));
            losetup(&["-d", path_str(&device)]).await;
        }

        let deleted: Vec<String> = state
            .images
            .iter()
            .filter(|id| !volumes.iter().any(|v| &v.id == *id))
            .cloned()
            .collect();
        for id in deleted {
            state.images.remove(&id);
            std::fs::remove_file(self.image(&id)).unwrap();
        }

        for (id, (size_gib, from_snapshot, source_volume)) in wanted {
            let image = self.image(id);
            let bytes = size_gib * GIB;
            if state.images.insert(id.to_string()) {
                let data = from_snapshot
                    .filter(|s| state.snapshots.contains(*s))
                    .map(|s| self.image(s))
                    .or_else(|| {
                        source_volume
                            .filter(|v| state.images.contains(*v))
                            .map(|v| self.image(v))
                    });
                if let Some(data) = data {
                    copy_sparse(&data, &image).await;
                }
                let file = std::fs::OpenOptions::new()
                    .create(true)
                    .truncate(false)
                    .write(true)
                    .open(&image)
                    .unwrap_or_else(|e| panic!("create {}: {e}", image.display()));
                file.set_len(bytes).unwrap(); // sparse
            } else if std::fs::metadata(&image).unwrap().len() < bytes {
                // ModifyVolume grew it: grow the image and tell the loop driver.
                std::fs::OpenOptions::new()
                    .write(true)
                    .open(&image)
                    .unwrap()
                    .set_len(bytes)
                    .unwrap();
                if let Some(device) = state.devices.get(id) {
                    losetup(&["-c", path_str(device)]).await;
                }
            }
            if !state.devices.contains_key(id) {
                let device = losetup(&["-f", "--show", path_str(&image)]).await;
                let device = PathBuf::from(device.trim());
                // Recorded first, so that Drop detaches it whatever happens next.
                state.devices.insert(id.to_string(), device.clone());
                let link = self.link(id);
                remove_link(&link);
                std::os::unix::fs::symlink(&device, &link)
                    .unwrap_or_else(|e| panic!("symlink {}: {e}", link.display()));
            }
        }
    }
}

impl Drop for Hypervisor {
    fn drop(&mut self) {
        let state = self.state.get_mut();
        for (id, device) in std::mem::take(&mut state.devices) {
            remove_link(&self.by_id_dir.join(by_id_name(&id)));
            let status = std::process::Command::new("losetup")
                .arg("-d")
                .arg(&device)
                .status();
            if !matches!(status, Ok(s) if s.success()) {
                eprintln!("hypervisor: losetup -d {} failed", device.display());
            }
        }
        for id in std::mem::take(&mut state.images)
            .into_iter()
            .chain(std::mem::take(&mut state.snapshots))
        {
            let _ = std::fs::remove_file(self.images_dir.join(format!("{id}.img")));
        }
    }
}

fn remove_link(link: &Path) {
    match std::fs::remove_file(link) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => panic!("remove {}: {e}", link.display()),
    }
}

/// `cp --sparse=always from to`: holes stay holes.
async fn copy_sparse(from: &Path, to: &Path) {
    let status = tokio::process::Command::new("cp")
        .args(["--sparse=always", path_str(from), path_str(to)])
        .status()
        .await
        .unwrap_or_else(|e| panic!("cp {}: {e}", from.display()));
    assert!(status.success(), "cp {} {}", from.display(), to.display());
}

fn path_str(path: &Path) -> &str {
    path.to_str().expect("UTF-8 path")
}

/// Runs `losetup args…`, panics on failure, returns its stdout.
async fn losetup(args: &[&str]) -> String {
    let output = tokio::process::Command::new("losetup")
        .args(args)
        .output()
        .await
        .unwrap_or_else(|e| panic!("losetup {args:?}: {e}"));
    assert!(
        output.status.success(),
        "losetup {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap()
}
