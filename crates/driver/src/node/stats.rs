//! Usage of a mounted volume: statvfs(2) of its filesystem, and for volumes that are
//! one directory of a shared filesystem (NFS sub-directories) a du(1)-style walk of
//! that directory ([`TreeWalks`]).

use std::collections::{HashMap, HashSet};
use std::ffi::OsStr;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nix::dir::Dir;
use nix::errno::Errno;
use nix::fcntl::{AtFlags, OFlag};
use nix::sys::stat::{FileStat, Mode, SFlag, fstat, fstatat};
use nix::sys::statvfs::statvfs;
use tokio::sync::watch;

use stowage_api::volume::Usage;

/// [`usage`] off the async threads, bounded by `timeout`: statvfs on a hung NFS
/// mount blocks, and must not block the CSI server with it.
pub async fn usage_within(path: &Path, timeout: Duration) -> io::Result<Usage> {
    let owned = path.to_owned();
    let work = tokio::task::spawn_blocking(move || usage(&owned));
    match tokio::time::timeout(timeout, work).await {
        Ok(joined) => joined.map_err(io::Error::other)?,
        Err(_) => Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!(
                "statvfs {} did not answer within {timeout:?}",
                path.display()
            ),
        )),
    }
}

/// Bytes and inodes of the filesystem holding `path`.
pub fn usage(path: &Path) -> io::Result<Usage> {
    let st = statvfs(path).map_err(io::Error::from)?;
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

/// What one directory tree uses, counted the way du(1) and kubelet's own volume
/// metrics count it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TreeUsage {
    /// Allocated bytes (st_blocks × 512) of every entry, a hard-linked file once.
    pub bytes: u64,
    /// Entries, the root included.
    pub inodes: u64,
}

/// Walk the tree at `root` without following symlinks or crossing into other
/// filesystems (mounts below it). Every directory is opened from its parent's
/// descriptor (`O_NOFOLLOW`) and every entry looked at with `fstatat`, so a directory
/// swapped for a symlink mid-walk is never followed out of the volume. Entries that
/// vanish during the walk are skipped; any other error ends it. `stop` ends it early
/// (an error); `counted` shows progress.
pub fn tree_usage(root: &Path, stop: &AtomicBool, counted: &AtomicU64) -> io::Result<TreeUsage> {
    let flags = OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
    let top = Dir::open(root, flags, Mode::empty()).map_err(|e| with_path(e.into(), root))?;
    let top_stat = fstat(&top).map_err(|e| with_path(e.into(), root))?;
    let device = top_stat.st_dev;
    let mut usage = TreeUsage::default();
    let mut linked = HashSet::new();
    let mut count = |st: &FileStat, usage: &mut TreeUsage| {
        usage.inodes += 1;
        counted.fetch_add(1, Ordering::Relaxed);
        let is_dir = SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT == SFlag::S_IFDIR;
        if is_dir || st.st_nlink <= 1 || linked.insert(st.st_ino) {
            usage.bytes += st.st_blocks as u64 * 512;
        }
    };
    count(&top_stat, &mut usage);
    // Directories still to list, each with its path (for errors only).
    let mut pending = vec![(top, root.to_path_buf())];
    while let Some((mut dir, path)) = pending.pop() {
        let mut children = Vec::new();
        // The listing borrows `dir`; entries are looked at through a second descriptor.
        let at = std::os::fd::AsFd::as_fd(&dir)
            .try_clone_to_owned()
            .map_err(|e| with_path(e, &path))?;
        for entry in dir.iter() {
            if stop.load(Ordering::Relaxed) {
                return Err(io::Error::new(
                    io::ErrorKind::Interrupted,
                    format!("walk of {} stopped", root.display()),
                ));
            }
            let entry = entry.map_err(|e| with_path(e.into(), &path))?;
            let name = entry.file_name();
            if name.to_bytes() == b"." || name.to_bytes() == b".." {
                continue;
            }
            let st = match fstatat(&at, name, AtFlags::AT_SYMLINK_NOFOLLOW) {
                Ok(st) => st,
                Err(Errno::ENOENT) => continue,
                Err(e) => {
                    return Err(with_path(
                        e.into(),
                        &path.join(OsStr::from_bytes(name.to_bytes())),
                    ));
                }
            };
            if st.st_dev != device {
                continue;
            }
            count(&st, &mut usage);
            if SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT == SFlag::S_IFDIR {
                children.push(name.to_owned());
            }
        }
        for name in children {
            let child = path.join(OsStr::from_bytes(name.to_bytes()));
            match Dir::openat(&at, name.as_c_str(), flags, Mode::empty()) {
                Ok(opened) => pending.push((opened, child)),
                // Gone, or swapped for a link or a file since it was listed.
                Err(Errno::ENOENT | Errno::ELOOP | Errno::ENOTDIR) => continue,
                Err(e) => return Err(with_path(e.into(), &child)),
            }
        }
    }
    Ok(usage)
}

fn with_path(error: io::Error, path: &Path) -> io::Error {
    io::Error::new(error.kind(), format!("{}: {error}", path.display()))
}

/// The per-directory walks of the volumes this node serves. A walk costs one stat
/// per file (over the network for NFS), so there is at most one per path at a time
/// and it runs to the end in the background: a caller waits up to its timeout and
/// otherwise gets the last figure a walk finished with (an error when there is none
/// yet). [`TreeWalks::forget`] stops a path's walk and drops its figure.
#[derive(Default)]
pub struct TreeWalks {
    walks: Mutex<HashMap<PathBuf, Walk>>,
    next_generation: AtomicU64,
}

type Outcome = Option<Result<TreeUsage, String>>;

struct Walk {
    generation: u64,
    last: Option<TreeUsage>,
    running: Option<Running>,
}

struct Running {
    outcome: watch::Receiver<Outcome>,
    stop: Arc<AtomicBool>,
    counted: Arc<AtomicU64>,
}

impl TreeWalks {
    /// Usage of the tree at `path`: a fresh walk's figure when it ends within
    /// `timeout`, else the last finished one.
    pub async fn usage(self: &Arc<Self>, path: &Path, timeout: Duration) -> io::Result<TreeUsage> {
        let (mut outcome, counted) = self.join_or_start(path);
        let waited = tokio::time::timeout(timeout, outcome.wait_for(Option::is_some)).await;
        match waited {
            Ok(Ok(done)) => match done.clone() {
                Some(Ok(usage)) => Ok(usage),
                Some(Err(e)) => Err(io::Error::other(e)),
                None => unreachable!("wait_for returned an unfinished walk"),
            },
            Ok(Err(_)) => Err(io::Error::other(format!(
                "the walk of {} ended without an answer",
                path.display()
            ))),
            Err(_) => self.last(path).ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!(
                        "counting the files of {} took longer than {timeout:?} ({} so far); \
                         it goes on, and the next call reports its result",
                        path.display(),
                        counted.load(Ordering::Relaxed)
                    ),
                )
            }),
        }
    }

    /// Stop the walk of `path`, if any, and drop what is known about it (the volume
    /// was unpublished).
    pub fn forget(&self, path: &Path) {
        let removed = self.lock().remove(path);
        if let Some(Walk {
            running: Some(running),
            ..
        }) = removed
        {
            running.stop.store(true, Ordering::Relaxed);
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<PathBuf, Walk>> {
        self.walks.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn last(&self, path: &Path) -> Option<TreeUsage> {
        self.lock().get(path).and_then(|walk| walk.last)
    }

    fn join_or_start(self: &Arc<Self>, path: &Path) -> (watch::Receiver<Outcome>, Arc<AtomicU64>) {
        let mut walks = self.lock();
        let walk = walks.entry(path.to_owned()).or_insert_with(|| Walk {
            generation: self.next_generation.fetch_add(1, Ordering::Relaxed),
            last: None,
            running: None,
        });
        if let Some(running) = &walk.running {
            return (running.outcome.clone(), Arc::clone(&running.counted));
        }
        let (sender, outcome) = watch::channel(None);
        let stop = Arc::new(AtomicBool::new(false));
        let counted = Arc::new(AtomicU64::new(0));
        walk.running = Some(Running {
            outcome: outcome.clone(),
            stop: Arc::clone(&stop),
            counted: Arc::clone(&counted),
        });
        let generation = walk.generation;
        let walks = Arc::clone(self);
        let root = path.to_owned();
        let progress = Arc::clone(&counted);
        tokio::spawn(async move {
            let key = root.clone();
            let result =
                tokio::task::spawn_blocking(move || tree_usage(&root, &stop, &progress)).await;
            let result = match result {
                Ok(walked) => walked.map_err(|e| e.to_string()),
                Err(e) => Err(format!("the walk of {} failed: {e}", key.display())),
            };
            if let Some(walk) = walks.lock().get_mut(&key)
                && walk.generation == generation
            {
                walk.running = None;
                if let Ok(usage) = &result {
                    walk.last = Some(*usage);
                }
            }
            let _ = sender.send(Some(result));
        });
        (outcome, counted)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn usage_of_a_tmpdir_is_consistent() {
        let dir = tempfile::tempdir().unwrap();
        let u = usage(dir.path()).unwrap();
        assert!(u.bytes_total > 0);
        assert!(u.bytes_available <= u.bytes_total);
        assert!(u.bytes_used <= u.bytes_total);
        assert!(u.inodes_used <= u.inodes_total);
    }

    fn walk(root: &Path) -> TreeUsage {
        tree_usage(root, &AtomicBool::new(false), &AtomicU64::new(0)).unwrap()
    }

    fn allocated(path: &Path) -> u64 {
        std::fs::symlink_metadata(path).unwrap().blocks() * 512
    }

    #[test]
    fn a_walk_counts_every_entry_once_and_stays_inside() {
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("big"), vec![7u8; 1 << 20]).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::create_dir_all(root.join("a/b")).unwrap();
        std::fs::write(root.join("a/b/data"), vec![1u8; 64 * 1024]).unwrap();
        std::fs::hard_link(root.join("a/b/data"), root.join("a/again")).unwrap();
        std::os::unix::fs::symlink(outside.path(), root.join("escape")).unwrap();

        let usage = walk(root);
        // root, a, a/b, a/b/data, a/again, escape
        assert_eq!(usage.inodes, 6);
        let expected = [".", "a", "a/b", "a/b/data", "escape"]
            .iter()
            .map(|p| allocated(&root.join(p)))
            .sum::<u64>();
        assert_eq!(usage.bytes, expected, "the hard link counts once");
        assert!(usage.bytes >= 64 * 1024, "the file's blocks are counted");
        assert!(usage.bytes < 1 << 20, "the symlink's target is not walked");
    }

    #[test]
    fn a_stopped_walk_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("f"), "x").unwrap();
        let stopped = tree_usage(dir.path(), &AtomicBool::new(true), &AtomicU64::new(0));
        assert_eq!(stopped.unwrap_err().kind(), io::ErrorKind::Interrupted);
    }

    #[test]
    fn a_missing_root_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let missing = tree_usage(
            &dir.path().join("gone"),
            &AtomicBool::new(false),
            &AtomicU64::new(0),
        );
        assert_eq!(missing.unwrap_err().kind(), io::ErrorKind::NotFound);
    }

    #[tokio::test]
    async fn walks_report_fresh_figures_and_forget_drops_them() {
        let dir = tempfile::tempdir().unwrap();
        let walks = Arc::new(TreeWalks::default());
        let first = walks
            .usage(dir.path(), Duration::from_secs(30))
            .await
            .unwrap();
        assert_eq!(first.inodes, 1);
        std::fs::write(dir.path().join("new"), vec![3u8; 8192]).unwrap();
        let second = walks
            .usage(dir.path(), Duration::from_secs(30))
            .await
            .unwrap();
        assert_eq!(second.inodes, 2, "each call walks again");
        assert_eq!(walks.last(dir.path()), Some(second));
        walks.forget(dir.path());
        assert_eq!(walks.last(dir.path()), None);
    }

    #[tokio::test]
    async fn a_walk_that_outlasts_the_timeout_answers_with_the_last_figure() {
        let dir = tempfile::tempdir().unwrap();
        for i in 0..2000 {
            std::fs::write(dir.path().join(format!("f{i}")), "x").unwrap();
        }
        let walks = Arc::new(TreeWalks::default());
        let early = walks.usage(dir.path(), Duration::ZERO).await;
        // With no finished walk yet, a zero wait is an error that says the walk goes on
        // (or, if the walk already finished when first polled, its figure).
        match &early {
            Ok(usage) => assert_eq!(usage.inodes, 2001),
            Err(e) => {
                assert_eq!(e.kind(), io::ErrorKind::TimedOut);
                assert!(e.to_string().contains("goes on"), "{e}");
            }
        }
        // The background walk finishes on its own and its figure becomes the answer.
        let done = walks
            .usage(dir.path(), Duration::from_secs(60))
            .await
            .unwrap();
        assert_eq!(done.inodes, 2001);
        std::fs::write(dir.path().join("late"), "x").unwrap();
        let stale_or_fresh = walks.usage(dir.path(), Duration::ZERO).await.unwrap();
        assert!(
            stale_or_fresh.inodes == 2001 || stale_or_fresh.inodes == 2002,
            "{stale_or_fresh:?}"
        );
    }
}
