//! Node paths stay under kubelet's directory: [`resolve_within`] follows the symlinks
//! along a path below that directory and refuses one that leads out of it (or
//! nowhere), so a target or staging path the CO names can't make the plugin mount,
//! unmount or remove anything elsewhere on the host. The lexical half (absolute, no
//! `.`/`..`, below the directory) is `csi::validate`'s.

use std::ffi::OsString;
use std::io::ErrorKind;
use std::path::{Component, Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum ConfineError {
    #[error("the kubelet directory {root} (--kubelet-dir) is not usable: {source}")]
    Root {
        root: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "the symlink {link} leads to {target}, which is not under the kubelet directory {root} (--kubelet-dir); the node plugin acts only on paths under it"
    )]
    Escapes {
        link: PathBuf,
        target: PathBuf,
        root: PathBuf,
    },
    #[error(
        "the symlink {link} leads nowhere, so where the path ends can't be checked against the kubelet directory {root} (--kubelet-dir)"
    )]
    Dangling { link: PathBuf, root: PathBuf },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// `relative` below `root` with every symlink along it resolved: the real path, which
/// is strictly under the real (canonical) `root`. Parts that don't exist yet are
/// appended as given (there is nothing to resolve in them). `relative` must hold
/// plain names only (the caller checked it lexically); anything else is refused.
///
/// A path listed in `mount_points` (as the mount table shows them: real paths) is a
/// mount point, a real directory, and is not looked at: a `stat` there could hang on
/// a dead NFS server, exactly when kubelet asks to unmount it.
///
/// Blocking (a few `lstat`s and `realpath`s): run it off the async threads.
pub fn resolve_within(
    root: &Path,
    relative: &Path,
    mount_points: &[PathBuf],
) -> Result<PathBuf, ConfineError> {
    let real_root = std::fs::canonicalize(root).map_err(|source| ConfineError::Root {
        root: root.to_owned(),
        source,
    })?;
    let names: Vec<OsString> = relative
        .components()
        .map(|component| match component {
            Component::Normal(name) => Ok(name.to_owned()),
            other => Err(ConfineError::Io {
                path: relative.to_owned(),
                source: std::io::Error::new(
                    ErrorKind::InvalidInput,
                    format!("{other:?} is not a plain name"),
                ),
            }),
        })
        .collect::<Result<_, _>>()?;
    let escapes = |link: &Path, target: &Path| ConfineError::Escapes {
        link: link.to_owned(),
        target: target.to_owned(),
        root: root.to_owned(),
    };
    let mut real = real_root.clone();
    let mut names = names.into_iter();
    while let Some(name) = names.next() {
        let next = real.join(&name);
        if mount_points.contains(&next) {
            real = next;
            continue;
        }
        match std::fs::symlink_metadata(&next) {
            Ok(meta) if meta.file_type().is_symlink() => {
                let target = std::fs::canonicalize(&next).map_err(|source| {
                    if source.kind() == ErrorKind::NotFound {
                        ConfineError::Dangling {
                            link: next.clone(),
                            root: root.to_owned(),
                        }
                    } else {
                        ConfineError::Io {
                            path: next.clone(),
                            source,
                        }
                    }
                })?;
                if !target.starts_with(&real_root) {
                    return Err(escapes(&next, &target));
                }
                real = target;
            }
            Ok(_) => real = next,
            Err(e) if e.kind() == ErrorKind::NotFound => {
                // Nothing below exists: no symlink left to follow.
                real = next;
                real.extend(names);
                break;
            }
            Err(source) => return Err(ConfineError::Io { path: next, source }),
        }
    }
    if real == real_root {
        // Only a symlink can bring a non-empty `relative` back to the root itself.
        return Err(escapes(&root.join(relative), &real));
    }
    Ok(real)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    struct Tree {
        _dir: tempfile::TempDir,
        root: PathBuf,
        outside: PathBuf,
    }

    fn tree() -> Tree {
        let dir = tempfile::tempdir().unwrap();
        let base = std::fs::canonicalize(dir.path()).unwrap();
        let root = base.join("kubelet");
        let outside = base.join("outside");
        std::fs::create_dir_all(root.join("pods/p1/volumes")).unwrap();
        std::fs::create_dir_all(outside.join("victim")).unwrap();
        Tree {
            _dir: dir,
            root,
            outside,
        }
    }

    fn resolve(t: &Tree, relative: &str) -> Result<PathBuf, ConfineError> {
        resolve_within(&t.root, Path::new(relative), &[])
    }

    #[test]
    fn plain_paths_resolve_to_themselves_existing_or_not() {
        let t = tree();
        assert_eq!(
            resolve(&t, "pods/p1/volumes").unwrap(),
            t.root.join("pods/p1/volumes")
        );
        assert_eq!(
            resolve(&t, "pods/p1/volumes/new/mount").unwrap(),
            t.root.join("pods/p1/volumes/new/mount")
        );
    }

    #[test]
    fn symlinks_inside_are_followed_and_outside_refused() {
        let t = tree();
        symlink(t.root.join("pods"), t.root.join("pods-link")).unwrap();
        assert_eq!(
            resolve(&t, "pods-link/p1/target").unwrap(),
            t.root.join("pods/p1/target")
        );
        // A relative link that climbs out.
        symlink("../../../outside", t.root.join("pods/p1/up")).unwrap();
        assert!(matches!(
            resolve(&t, "pods/p1/up/victim"),
            Err(ConfineError::Escapes { .. })
        ));
        // The last component itself.
        symlink(t.outside.join("victim"), t.root.join("pods/p1/mount")).unwrap();
        let err = resolve(&t, "pods/p1/mount").unwrap_err();
        assert!(matches!(err, ConfineError::Escapes { .. }), "{err}");
        assert!(err.to_string().contains("--kubelet-dir"), "{err}");
        // Out and back in is fine: only where it ends counts.
        symlink(t.root.join("pods"), t.outside.join("back")).unwrap();
        symlink(t.outside.join("back"), t.root.join("via-outside")).unwrap();
        assert_eq!(
            resolve(&t, "via-outside/p1").unwrap(),
            t.root.join("pods/p1")
        );
    }

    #[test]
    fn dangling_links_and_the_root_itself_are_refused() {
        let t = tree();
        symlink(t.outside.join("nothing"), t.root.join("dangling")).unwrap();
        assert!(matches!(
            resolve(&t, "dangling"),
            Err(ConfineError::Dangling { .. })
        ));
        assert!(matches!(
            resolve(&t, "dangling/below"),
            Err(ConfineError::Dangling { .. })
        ));
        symlink(&t.root, t.root.join("self")).unwrap();
        assert!(matches!(
            resolve(&t, "self"),
            Err(ConfineError::Escapes { .. })
        ));
        assert_eq!(resolve(&t, "self/pods").unwrap(), t.root.join("pods"));
        assert!(matches!(
            resolve_within(&t.root.join("missing"), Path::new("x"), &[]),
            Err(ConfineError::Root { .. })
        ));
        assert!(resolve(&t, "../outside").is_err(), "not a plain name");
    }

    #[test]
    fn a_symlinked_root_is_resolved_too() {
        let t = tree();
        let alias = t.outside.join("kubelet-alias");
        symlink(&t.root, &alias).unwrap();
        assert_eq!(
            resolve_within(&alias, Path::new("pods/p1"), &[]).unwrap(),
            t.root.join("pods/p1")
        );
    }

    #[test]
    fn mount_points_are_not_looked_at() {
        let t = tree();
        // A symlink the walk would refuse, listed as a mount point: the mount table
        // lists real directories only, so it is taken as one without an lstat.
        symlink(&t.outside, t.root.join("pods/p1/mounted")).unwrap();
        let listed = [t.root.join("pods/p1/mounted")];
        assert_eq!(
            resolve_within(&t.root, Path::new("pods/p1/mounted"), &listed).unwrap(),
            t.root.join("pods/p1/mounted")
        );
    }
}
