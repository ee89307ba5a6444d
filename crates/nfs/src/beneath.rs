//! Opening a directory below a root directory without ever following a symbolic link
//! and without leaving the root: `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS)`, or,
//! where the kernel lacks `openat2`, one `openat(O_NOFOLLOW | O_DIRECTORY)` per
//! component from the root's descriptor. Either way the answer is a descriptor of the
//! directory that was found, so whoever acts on it (a bind mount, an `*at` call) acts
//! on that directory, not on a path string resolved again later.
//!
//! Used by the embedded server (every walk from the exported directory) and by the
//! node plugin (a volume directory of a local export bind-mounted into a pod). A link
//! or a non-directory in the way is an error naming the component where it was found.

use std::ffi::OsStr;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{AtFlags, OFlag, OpenHow, ResolveFlag, openat, openat2};
use nix::sys::stat::{Mode, SFlag, fstatat};

/// Why a directory below the root could not be opened.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BeneathError {
    #[error("{path} is a symbolic link; links are never followed below the export root")]
    Symlink { path: PathBuf },
    #[error("{path} is not a directory")]
    NotADirectory { path: PathBuf },
    #[error("{path} does not exist")]
    NotFound { path: PathBuf },
    #[error("{path} is not a plain name (empty, `.`, `..` or with `/`)")]
    NotAName { path: PathBuf },
    #[error("{path}: {errno}")]
    Io { path: PathBuf, errno: Errno },
}

impl BeneathError {
    /// The errno a caller speaking errno (the embedded server) answers with.
    pub fn errno(&self) -> Errno {
        match self {
            BeneathError::Symlink { .. } => Errno::ELOOP,
            BeneathError::NotADirectory { .. } => Errno::ENOTDIR,
            BeneathError::NotFound { .. } => Errno::ENOENT,
            BeneathError::NotAName { .. } => Errno::EINVAL,
            BeneathError::Io { errno, .. } => *errno,
        }
    }
}

/// Open the directory `names` (plain names, one per component) below `root`. No
/// component may be a symlink, the last included; `flags` are added to the final open
/// (`O_PATH` to act with `*at` calls, `O_RDONLY` to list it). No names = the root.
pub fn open_dir_beneath<S: AsRef<OsStr>>(
    root: BorrowedFd<'_>,
    names: &[S],
    flags: OFlag,
) -> Result<OwnedFd, BeneathError> {
    let mut relative = PathBuf::new();
    for name in names {
        let name = name.as_ref();
        if !is_plain_name(name) {
            return Err(BeneathError::NotAName {
                path: relative.join(name),
            });
        }
        relative.push(name);
    }
    let base = OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC | flags;
    if relative.as_os_str().is_empty() {
        return openat(root, ".", base, Mode::empty()).map_err(|errno| BeneathError::Io {
            path: relative,
            errno,
        });
    }
    let how = OpenHow::new().flags(base).resolve(
        ResolveFlag::RESOLVE_BENEATH
            | ResolveFlag::RESOLVE_NO_SYMLINKS
            | ResolveFlag::RESOLVE_NO_MAGICLINKS,
    );
    match openat2(root, relative.as_path(), how) {
        Ok(fd) => Ok(fd),
        Err(Errno::ENOSYS) => walk(root, names, base),
        // Why, and at which component: walk again, one name at a time.
        Err(errno) => Err(walk(root, names, base).err().unwrap_or(BeneathError::Io {
            path: relative,
            errno,
        })),
    }
}

/// One `openat(O_NOFOLLOW | O_DIRECTORY)` per component, each from the last one's
/// descriptor; a failure is explained by an `lstat` of the name that failed.
fn walk<S: AsRef<OsStr>>(
    root: BorrowedFd<'_>,
    names: &[S],
    last: OFlag,
) -> Result<OwnedFd, BeneathError> {
    let step = OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC | OFlag::O_PATH;
    let mut dir: Option<OwnedFd> = None;
    let mut relative = PathBuf::new();
    for (i, name) in names.iter().enumerate() {
        let name = name.as_ref();
        relative.push(name);
        let from = dir.as_ref().map_or(root, AsFd::as_fd);
        let flags = if i + 1 == names.len() { last } else { step };
        match openat(from, name, flags, Mode::empty()) {
            Ok(next) => dir = Some(next),
            Err(errno) => return Err(explain(from, name, &relative, errno)),
        }
    }
    match dir {
        Some(dir) => Ok(dir),
        None => openat(root, ".", last, Mode::empty()).map_err(|errno| BeneathError::Io {
            path: relative,
            errno,
        }),
    }
}

fn explain(dir: BorrowedFd<'_>, name: &OsStr, path: &Path, errno: Errno) -> BeneathError {
    let path = path.to_path_buf();
    match fstatat(dir, name, AtFlags::AT_SYMLINK_NOFOLLOW) {
        Ok(st) if SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT == SFlag::S_IFLNK => {
            BeneathError::Symlink { path }
        }
        Ok(st) if SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT != SFlag::S_IFDIR => {
            BeneathError::NotADirectory { path }
        }
        Err(Errno::ENOENT) => BeneathError::NotFound { path },
        _ => BeneathError::Io { path, errno },
    }
}

fn is_plain_name(name: &OsStr) -> bool {
    use std::os::unix::ffi::OsStrExt;
    let bytes = name.as_bytes();
    !bytes.is_empty() && bytes != b"." && bytes != b".." && !bytes.contains(&b'/')
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::File;
    use std::os::unix::fs::symlink;

    fn root(dir: &Path) -> OwnedFd {
        OwnedFd::from(File::open(dir).unwrap())
    }

    fn ino(fd: &OwnedFd) -> u64 {
        nix::sys::stat::fstat(fd).unwrap().st_ino
    }

    #[test]
    fn opens_plain_directories_and_refuses_every_link_naming_it() {
        let tmp = tempfile::tempdir().unwrap();
        let export = tmp.path().join("export");
        let outside = tmp.path().join("outside");
        std::fs::create_dir_all(export.join("a/b/c")).unwrap();
        std::fs::create_dir_all(&outside).unwrap();
        std::fs::write(export.join("a/file"), "x").unwrap();
        symlink(&outside, export.join("a/out")).unwrap();
        symlink("b", export.join("a/inside")).unwrap();
        let fd = root(&export);

        let c = open_dir_beneath(fd.as_fd(), &["a", "b", "c"], OFlag::O_PATH).unwrap();
        let expected = std::fs::metadata(export.join("a/b/c")).unwrap();
        assert_eq!(ino(&c), std::os::unix::fs::MetadataExt::ino(&expected));
        let top = open_dir_beneath::<&str>(fd.as_fd(), &[], OFlag::O_PATH).unwrap();
        assert_eq!(ino(&top), ino(&fd));

        // Links are refused whether they lead out or stay inside, last or not.
        for (names, at) in [
            (&["a", "out"][..], "a/out"),
            (&["a", "out", "x"][..], "a/out"),
            (&["a", "inside"][..], "a/inside"),
            (&["a", "inside", "c"][..], "a/inside"),
        ] {
            let err = open_dir_beneath(fd.as_fd(), names, OFlag::O_PATH).unwrap_err();
            assert_eq!(err, BeneathError::Symlink { path: at.into() }, "{names:?}");
            assert!(err.to_string().contains("symbolic link"), "{err}");
        }
        assert_eq!(
            open_dir_beneath(fd.as_fd(), &["a", "file"], OFlag::O_PATH).unwrap_err(),
            BeneathError::NotADirectory {
                path: "a/file".into()
            }
        );
        assert_eq!(
            open_dir_beneath(fd.as_fd(), &["a", "nope", "x"], OFlag::O_PATH).unwrap_err(),
            BeneathError::NotFound {
                path: "a/nope".into()
            }
        );
        for bad in [&["..", "outside"][..], &["a/b"][..], &[""][..], &["."][..]] {
            assert!(matches!(
                open_dir_beneath(fd.as_fd(), bad, OFlag::O_PATH),
                Err(BeneathError::NotAName { .. })
            ));
        }
    }

    #[test]
    fn the_component_walk_gives_the_same_answers() {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(tmp.path().join("a/b")).unwrap();
        symlink("/", tmp.path().join("a/up")).unwrap();
        let fd = root(tmp.path());
        let flags = OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC | OFlag::O_PATH;
        assert!(walk(fd.as_fd(), &["a", "b"], flags).is_ok());
        assert_eq!(
            walk(fd.as_fd(), &["a", "up", "etc"], flags).unwrap_err(),
            BeneathError::Symlink {
                path: "a/up".into()
            }
        );
    }
}
