//! Copying a directory tree on the export over the wire ([`NfsClient::copy_tree`]):
//! what the NFS backend snapshots and clones volumes with, with no kernel mount.
//!
//! - What is copied: directories, regular files (contents, mode, owner, times) and
//!   symbolic links (as links: their text is copied, never followed; NFS LOOKUP does
//!   not follow links either, so nothing outside the source is ever read). Devices,
//!   sockets and FIFOs are skipped and counted. Hard links become separate files;
//!   holes in sparse files are written as zeros.
//! - Bounded memory, whatever the tree: directories are listed one READDIRPLUS page at
//!   a time and walked depth first (at most one page of sub-directories waits per
//!   level, [`MAX_TREE_DEPTH`] levels); file data moves one [`COPY_CHUNK`] at a time.
//! - Not atomic: callers copy into a scratch name and rename the finished tree into
//!   place, so a copy cut short (a crash, a timeout) is never mistaken for a whole one.

use std::sync::atomic::{AtomicU64, Ordering};

use nfs3_types::nfs3::{
    CREATE3args, READ3args, WRITE3args, createhow3, nfstime3, set_atime, set_mtime, stable_how,
};

use super::*;

/// Bytes per READ and WRITE of a copy.
pub const COPY_CHUNK: u32 = 128 * 1024;

/// What a copy made.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Copied {
    pub dirs: u64,
    pub files: u64,
    pub symlinks: u64,
    /// File contents copied.
    pub bytes: u64,
    /// Devices, sockets, FIFOs: not copied.
    pub skipped: u64,
}

/// A directory being copied: where its listing stands, and its attributes to apply
/// once its contents are in (a read-only directory is filled first, then closed).
struct Level {
    src: nfs_fh3,
    dst: nfs_fh3,
    path: String,
    attrs: fattr3,
    cookie: u64,
    cookieverf: cookieverf3,
    done: bool,
}

impl NfsClient {
    /// Copy the directory `from` and everything below it to `to`, which must not
    /// exist (its parent must). `copied` counts file bytes as they are written, for
    /// progress. See the module docs for what is copied and how.
    pub async fn copy_tree(
        &self,
        from: &[&str],
        to: &[&str],
        copied: &AtomicU64,
    ) -> Result<Copied, NfsError> {
        validate_non_root(from)?;
        validate_non_root(to)?;
        let (from_path, to_path) = (join(from), join(to));
        let mut conn = self.lease().await?;
        let (src, attrs) = conn.find(from).await?.ok_or_else(|| NfsError::NotFound {
            path: from_path.clone(),
        })?;
        let attrs = match attrs {
            Some(attrs) => attrs,
            None => conn.getattr_full(&src, &from_path).await?,
        };
        if attrs.type_ != ftype3::NF3DIR {
            return Err(NfsError::NotADirectory { path: from_path });
        }
        let (parent, name) = to.split_at(to.len() - 1);
        let dst_parent = conn.walk_dir(parent).await?;
        let dst = conn
            .mkdir_for_copy(&dst_parent, name[0].as_bytes(), &attrs, &to_path)
            .await?;
        let mut stats = Copied {
            dirs: 1,
            ..Copied::default()
        };
        let mut stack = vec![Level {
            src,
            dst,
            path: to_path,
            attrs,
            cookie: 0,
            cookieverf: cookieverf3::default(),
            done: false,
        }];
        while let Some(top) = stack.last_mut() {
            if top.done {
                let top = stack.pop().expect("not empty");
                conn.setattr(&top.dst, sattr_of(&top.attrs, true), &top.path)
                    .await?;
                continue;
            }
            let (src_dir, dst_dir, dir_path) = (top.src.clone(), top.dst.clone(), top.path.clone());
            let page = conn
                .list_page(&src_dir, top.cookie, top.cookieverf, &dir_path)
                .await?;
            top.cookie = page.cookie;
            top.cookieverf = page.cookieverf;
            top.done = page.eof;
            let mut below = Vec::new();
            for entry in page.entries {
                let entry_path = format!("{dir_path}/{}", String::from_utf8_lossy(&entry.name));
                let (fh, attrs) = match (entry.fh, entry.attrs) {
                    (Some(fh), Some(attrs)) => (fh, attrs),
                    _ => match conn
                        .lookup(&src_dir, &entry.name, &entry_path, &dir_path)
                        .await?
                    {
                        Some((fh, Some(attrs))) => (fh, attrs),
                        Some((fh, None)) => {
                            let attrs = conn.getattr_full(&fh, &entry_path).await?;
                            (fh, attrs)
                        }
                        // Removed while we copy: not part of the copy.
                        None => continue,
                    },
                };
                match attrs.type_ {
                    ftype3::NF3DIR => {
                        let dst = conn
                            .mkdir_for_copy(&dst_dir, &entry.name, &attrs, &entry_path)
                            .await?;
                        stats.dirs += 1;
                        below.push(Level {
                            src: fh,
                            dst,
                            path: entry_path,
                            attrs,
                            cookie: 0,
                            cookieverf: cookieverf3::default(),
                            done: false,
                        });
                    }
                    ftype3::NF3REG => {
                        let bytes = conn
                            .copy_file(&fh, &attrs, &dst_dir, &entry.name, &entry_path, copied)
                            .await?;
                        stats.files += 1;
                        stats.bytes += bytes;
                    }
                    ftype3::NF3LNK => {
                        conn.copy_symlink(&fh, &attrs, &dst_dir, &entry.name, &entry_path)
                            .await?;
                        stats.symlinks += 1;
                    }
                    _ => {
                        tracing::debug!(path = %entry_path, "not copied: not a file, directory or symlink");
                        stats.skipped += 1;
                    }
                }
            }
            if stack.len() + 1 > MAX_TREE_DEPTH && !below.is_empty() {
                return Err(NfsError::Protocol(format!(
                    "`{from_path}`: directory tree deeper than {MAX_TREE_DEPTH} levels"
                )));
            }
            stack.extend(below);
        }
        Ok(stats)
    }
}

/// One READDIRPLUS page.
struct Page {
    entries: Vec<PageEntry>,
    cookie: u64,
    cookieverf: cookieverf3,
    eof: bool,
}

struct PageEntry {
    name: Vec<u8>,
    fh: Option<nfs_fh3>,
    attrs: Option<fattr3>,
}

/// The attributes to give a copy: mode, owner and times of the original (size
/// left alone). Directories get their times last, after their entries are in.
fn sattr_of(attrs: &fattr3, times: bool) -> sattr3 {
    let time = |t: &nfstime3| nfstime3 {
        seconds: t.seconds,
        nseconds: t.nseconds,
    };
    sattr3 {
        mode: Nfs3Option::Some(attrs.mode & 0o7777),
        uid: Nfs3Option::Some(attrs.uid),
        gid: Nfs3Option::Some(attrs.gid),
        size: Nfs3Option::None,
        atime: if times {
            set_atime::SET_TO_CLIENT_TIME(time(&attrs.atime))
        } else {
            set_atime::DONT_CHANGE
        },
        mtime: if times {
            set_mtime::SET_TO_CLIENT_TIME(time(&attrs.mtime))
        } else {
            set_mtime::DONT_CHANGE
        },
    }
}

impl Conn {
    async fn getattr_full(&mut self, fh: &nfs_fh3, path: &str) -> Result<fattr3, NfsError> {
        let args = GETATTR3args { object: fh.clone() };
        let res = guarded(
            &mut self.reusable,
            self.call_timeout,
            "GETATTR",
            self.nfs.getattr(&args),
        )
        .await?;
        match res {
            Nfs3Result::Ok(ok) => Ok(ok.obj_attributes),
            Nfs3Result::Err((stat, _)) => Err(status_error("GETATTR", path, stat)),
        }
    }

    /// A new directory for a copy: writable by us until its entries are in (its own
    /// mode and times are set when it is done). An existing name is `AlreadyExists`.
    async fn mkdir_for_copy(
        &mut self,
        dir: &nfs_fh3,
        name: &[u8],
        attrs: &fattr3,
        path: &str,
    ) -> Result<nfs_fh3, NfsError> {
        let name = std::str::from_utf8(name)
            .map_err(|_| NfsError::Protocol(format!("`{path}`: the name is not UTF-8")))?;
        match self
            .mkdir_exact(dir, name, path, "", 0o700, Some((attrs.uid, attrs.gid)))
            .await?
        {
            Ok((_, fh)) => Ok(fh),
            Err(nfsstat3::NFS3ERR_EXIST) => Err(NfsError::AlreadyExists {
                path: path.to_owned(),
            }),
            Err(stat) => Err(status_error("MKDIR", path, stat)),
        }
    }

    async fn list_page(
        &mut self,
        dir: &nfs_fh3,
        cookie: u64,
        cookieverf: cookieverf3,
        path: &str,
    ) -> Result<Page, NfsError> {
        let args = READDIRPLUS3args {
            dir: dir.clone(),
            cookie,
            cookieverf,
            dircount: READDIR_DIRCOUNT,
            maxcount: READDIR_MAXCOUNT,
        };
        let res = guarded(
            &mut self.reusable,
            self.call_timeout,
            "READDIRPLUS",
            self.nfs.readdirplus(&args),
        )
        .await?;
        let ok = match res {
            Nfs3Result::Ok(ok) => ok,
            Nfs3Result::Err((stat, _)) => return Err(status_error("READDIRPLUS", path, stat)),
        };
        let eof = ok.reply.eof;
        let listed = ok.reply.entries.into_inner();
        if listed.is_empty() && !eof {
            return Err(NfsError::Protocol(format!(
                "READDIRPLUS `{path}`: empty page without EOF"
            )));
        }
        let mut page = Page {
            entries: Vec::with_capacity(listed.len()),
            cookie,
            cookieverf: ok.cookieverf,
            eof,
        };
        for e in listed {
            page.cookie = e.cookie;
            let name = e.name.0.into_owned();
            if !checked_entry_name(&name, path)? {
                continue;
            }
            page.entries.push(PageEntry {
                name,
                fh: option(e.name_handle),
                attrs: option(e.name_attributes),
            });
        }
        Ok(page)
    }

    /// CREATE the copy (GUARDED: an existing name is an error), then READ and WRITE
    /// one chunk at a time, then the original's mode, owner and times.
    async fn copy_file(
        &mut self,
        src: &nfs_fh3,
        attrs: &fattr3,
        dir: &nfs_fh3,
        name: &[u8],
        path: &str,
        copied: &AtomicU64,
    ) -> Result<u64, NfsError> {
        let args = CREATE3args {
            where_: dirop(dir, name),
            how: createhow3::GUARDED(sattr3 {
                mode: Nfs3Option::Some(0o600),
                ..sattr3::default()
            }),
        };
        let res = guarded(
            &mut self.reusable,
            self.call_timeout,
            "CREATE",
            self.nfs.create(&args),
        )
        .await?;
        let dst = match res {
            Nfs3Result::Ok(ok) => match option(ok.obj) {
                Some(fh) => fh,
                None => match self.lookup(dir, name, path, "").await? {
                    Some((fh, _)) => fh,
                    None => {
                        return Err(NfsError::NotFound {
                            path: path.to_owned(),
                        });
                    }
                },
            },
            Nfs3Result::Err((nfsstat3::NFS3ERR_EXIST, _)) => {
                return Err(NfsError::AlreadyExists {
                    path: path.to_owned(),
                });
            }
            Nfs3Result::Err((stat, _)) => return Err(status_error("CREATE", path, stat)),
        };
        let mut offset = 0u64;
        loop {
            let args = READ3args {
                file: src.clone(),
                offset,
                count: COPY_CHUNK,
            };
            let res = guarded(
                &mut self.reusable,
                self.call_timeout,
                "READ",
                self.nfs.read(&args),
            )
            .await?;
            let (data, eof) = match res {
                Nfs3Result::Ok(ok) => (ok.data.0.into_owned(), ok.eof),
                Nfs3Result::Err((stat, _)) => return Err(status_error("READ", path, stat)),
            };
            let mut written = 0usize;
            while written < data.len() {
                let chunk = &data[written..];
                let args = WRITE3args {
                    file: dst.clone(),
                    offset: offset + written as u64,
                    count: chunk.len() as u32,
                    stable: stable_how::FILE_SYNC,
                    data: Opaque::borrowed(chunk),
                };
                let res = guarded(
                    &mut self.reusable,
                    self.call_timeout,
                    "WRITE",
                    self.nfs.write(&args),
                )
                .await?;
                let count = match res {
                    Nfs3Result::Ok(ok) => ok.count as usize,
                    Nfs3Result::Err((stat, _)) => return Err(status_error("WRITE", path, stat)),
                };
                if count == 0 {
                    return Err(NfsError::Protocol(format!("WRITE `{path}`: no progress")));
                }
                written += count;
                copied.fetch_add(count as u64, Ordering::Relaxed);
            }
            offset += data.len() as u64;
            if eof || data.is_empty() {
                break;
            }
        }
        self.setattr(&dst, sattr_of(attrs, true), path).await?;
        Ok(offset)
    }

    /// READLINK the original, SYMLINK the copy with the same text, then its owner.
    async fn copy_symlink(
        &mut self,
        src: &nfs_fh3,
        attrs: &fattr3,
        dir: &nfs_fh3,
        name: &[u8],
        path: &str,
    ) -> Result<(), NfsError> {
        let res = guarded(
            &mut self.reusable,
            self.call_timeout,
            "READLINK",
            self.nfs.readlink(&READLINK3args {
                symlink: src.clone(),
            }),
        )
        .await?;
        let target = match res {
            Nfs3Result::Ok(ok) => ok.data.0.into_owned(),
            Nfs3Result::Err((stat, _)) => return Err(status_error("READLINK", path, stat)),
        };
        let args = SYMLINK3args {
            where_: dirop(dir, name),
            symlink: symlinkdata3 {
                symlink_attributes: sattr3 {
                    mode: Nfs3Option::Some(0o777),
                    ..sattr3::default()
                },
                symlink_data: nfspath3(Opaque::owned(target)),
            },
        };
        let res = guarded(
            &mut self.reusable,
            self.call_timeout,
            "SYMLINK",
            self.nfs.symlink(&args),
        )
        .await?;
        let link = match res {
            Nfs3Result::Ok(ok) => option(ok.obj),
            Nfs3Result::Err((nfsstat3::NFS3ERR_EXIST, _)) => {
                return Err(NfsError::AlreadyExists {
                    path: path.to_owned(),
                });
            }
            Nfs3Result::Err((stat, _)) => return Err(status_error("SYMLINK", path, stat)),
        };
        if let Some(link) = link {
            let owner = sattr3 {
                uid: Nfs3Option::Some(attrs.uid),
                gid: Nfs3Option::Some(attrs.gid),
                ..sattr3::default()
            };
            // Some servers refuse to change a link's owner; the link itself is there.
            if let Err(e) = self.setattr(&link, owner, path).await {
                tracing::debug!(%path, error = %e, "could not set the owner of a copied symlink");
                if !self.reusable {
                    return Err(e);
                }
            }
        }
        Ok(())
    }
}
