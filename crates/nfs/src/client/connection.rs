//! One mounted NFS connection ([`Conn`]) and its RPCs: every call bounded by the call
//! timeout and marking the connection unusable on any RPC-level failure; lookups and
//! walks, MKDIR with an exact mode, listing, removal of a tree.

use super::*;

/// One mounted NFS connection with the export's root handle.
pub(super) struct Conn {
    pub(super) nfs: Nfs3Client<Transport>,
    pub(super) stream: Arc<TcpStream>,
    pub(super) root: nfs_fh3,
    pub(super) call_timeout: Duration,
    /// Cleared while a call is in flight and after any transport/RPC error or
    /// timeout: only a reusable connection goes back to the pool. A call whose
    /// future is dropped mid-flight leaves it cleared as well.
    pub(super) reusable: bool,
    /// Shared with the pool: see [`DirCache`].
    pub(super) dirs: DirCache,
}

/// Run one RPC under the call timeout and keep the connection's state honest.
pub(super) async fn guarded<T>(
    reusable: &mut bool,
    after: Duration,
    op: &'static str,
    call: impl Future<Output = Result<T, RpcError>>,
) -> Result<T, NfsError> {
    *reusable = false;
    match tokio::time::timeout(after, call).await {
        Ok(Ok(reply)) => {
            *reusable = true;
            Ok(reply)
        }
        Ok(Err(e)) => {
            tracing::debug!(op, error = %e, "NFS call failed; dropping the connection");
            Err(rpc_error(op, e))
        }
        Err(_) => {
            tracing::debug!(op, ?after, "NFS call timed out; dropping the connection");
            Err(NfsError::Timeout { op, after })
        }
    }
}

pub(super) fn dirop(dir: &nfs_fh3, name: &[u8]) -> diropargs3<'static> {
    diropargs3 {
        dir: dir.clone(),
        name: filename3::from(name.to_vec()),
    }
}

impl Conn {
    /// Has the server closed (or written garbage to) this idle connection?
    pub(super) fn is_alive(&self) -> bool {
        let mut byte = [0u8; 1];
        // An idle connection has nothing to read. EOF, a reset, or stray bytes
        // (a late reply) all mean it must not be used again.
        matches!(self.stream.try_read(&mut byte), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
    }

    pub(super) async fn getattr(&mut self, fh: &nfs_fh3, path: &str) -> Result<Attr, NfsError> {
        let args = GETATTR3args { object: fh.clone() };
        let res = guarded(
            &mut self.reusable,
            self.call_timeout,
            "GETATTR",
            self.nfs.getattr(&args),
        )
        .await?;
        match res {
            Nfs3Result::Ok(ok) => Ok(Attr::from(&ok.obj_attributes)),
            Nfs3Result::Err((stat, _)) => Err(status_error("GETATTR", path, stat)),
        }
    }

    /// Attributes from a reply if present, else `GETATTR`.
    pub(super) async fn attr_of(
        &mut self,
        fh: &nfs_fh3,
        attrs: Option<fattr3>,
        path: &str,
    ) -> Result<Attr, NfsError> {
        match attrs {
            Some(a) => Ok(Attr::from(&a)),
            None => self.getattr(fh, path).await,
        }
    }

    /// `LOOKUP name` in `dir`; `Ok(None)` when it doesn't exist. `path` is the
    /// display path of `name` and `dir_path` that of `dir`.
    pub(super) async fn lookup(
        &mut self,
        dir: &nfs_fh3,
        name: &[u8],
        path: &str,
        dir_path: &str,
    ) -> Result<Option<(nfs_fh3, Option<fattr3>)>, NfsError> {
        let args = LOOKUP3args {
            what: dirop(dir, name),
        };
        let res = guarded(
            &mut self.reusable,
            self.call_timeout,
            "LOOKUP",
            self.nfs.lookup(&args),
        )
        .await?;
        match res {
            Nfs3Result::Ok(ok) => Ok(Some((ok.object, option(ok.obj_attributes)))),
            Nfs3Result::Err((nfsstat3::NFS3ERR_NOENT, _)) => Ok(None),
            // The directory we looked in is not a directory.
            Nfs3Result::Err((nfsstat3::NFS3ERR_NOTDIR, _)) => Err(NfsError::NotADirectory {
                path: dir_path.to_owned(),
            }),
            Nfs3Result::Err((stat, _)) => Err(status_error("LOOKUP", path, stat)),
        }
    }

    /// Walk `path` from the export root. `Ok(Err(i))`: `path[..=i]` is the first
    /// prefix that does not exist.
    pub(super) async fn walk(
        &mut self,
        path: &[&str],
    ) -> Result<Result<(nfs_fh3, Option<fattr3>), usize>, NfsError> {
        let mut fh = self.root.clone();
        let mut attrs = None;
        for (i, name) in path.iter().enumerate() {
            let here = join(&path[..=i]);
            let parent = join(&path[..i]);
            match self.lookup(&fh, name.as_bytes(), &here, &parent).await? {
                Some((next, a)) => {
                    fh = next;
                    attrs = a;
                }
                None => return Ok(Err(i)),
            }
        }
        Ok(Ok((fh, attrs)))
    }

    /// Walk `path`; `None` if it doesn't exist, including when a prefix is not
    /// a directory (nothing can exist below a file).
    pub(super) async fn find(
        &mut self,
        path: &[&str],
    ) -> Result<Option<(nfs_fh3, Option<fattr3>)>, NfsError> {
        match self.walk(path).await {
            Ok(Ok(found)) => Ok(Some(found)),
            Ok(Err(_)) | Err(NfsError::NotADirectory { .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Walk to an existing directory (from the cache when it was walked to before);
    /// `NotFound` names the first missing prefix.
    pub(super) async fn walk_dir(&mut self, path: &[&str]) -> Result<nfs_fh3, NfsError> {
        if path.is_empty() {
            return Ok(self.root.clone());
        }
        let display = join(path);
        if let Some(fh) = self
            .dirs
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&display)
        {
            return Ok(fh.clone());
        }
        match self.walk(path).await? {
            Ok((fh, attrs)) => {
                let attr = self.attr_of(&fh, attrs, &display).await?;
                if attr.is_dir() {
                    self.dirs
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .insert(display, fh.clone());
                    Ok(fh)
                } else {
                    Err(NfsError::NotADirectory { path: display })
                }
            }
            Err(i) => Err(NfsError::NotFound {
                path: join(&path[..=i]),
            }),
        }
    }

    pub(super) async fn setattr(
        &mut self,
        fh: &nfs_fh3,
        attributes: sattr3,
        path: &str,
    ) -> Result<Option<Attr>, NfsError> {
        let args = SETATTR3args {
            object: fh.clone(),
            new_attributes: attributes,
            guard: Nfs3Option::None,
        };
        let res = guarded(
            &mut self.reusable,
            self.call_timeout,
            "SETATTR",
            self.nfs.setattr(&args),
        )
        .await?;
        match res {
            Nfs3Result::Ok(ok) => Ok(option(ok.obj_wcc.after).as_ref().map(Attr::from)),
            Nfs3Result::Err((stat, _)) => Err(status_error("SETATTR", path, stat)),
        }
    }

    /// Make sure directory `name` exists in `dir`, creating it if needed: looks the
    /// name up before MKDIR (some servers create a duplicate entry instead of
    /// answering `NFS3ERR_EXIST`) and again after `EXIST`. An existing directory is
    /// `Existed` and left untouched; an existing non-directory is `NotADirectory`.
    pub(super) async fn ensure_dir(
        &mut self,
        dir: &nfs_fh3,
        name: &str,
        path: &str,
        dir_path: &str,
        mode: u32,
        owner: Option<(u32, u32)>,
    ) -> Result<(Mkdir, nfs_fh3), NfsError> {
        if let Some(found) = self.lookup(dir, name.as_bytes(), path, dir_path).await? {
            return self.existing_dir(found, path).await;
        }
        match self
            .mkdir_exact(dir, name, path, dir_path, mode, owner)
            .await?
        {
            Ok((attr, fh)) => Ok((Mkdir::Created(attr), fh)),
            Err(nfsstat3::NFS3ERR_EXIST) => {
                // Created concurrently, or a non-directory is in the way.
                match self.lookup(dir, name.as_bytes(), path, dir_path).await? {
                    Some(found) => self.existing_dir(found, path).await,
                    None => Err(NfsError::Server {
                        op: "MKDIR",
                        path: path.to_owned(),
                        status: "NFS3ERR_EXIST, yet LOOKUP finds nothing".to_owned(),
                    }),
                }
            }
            Err(stat) => Err(status_error("MKDIR", path, stat)),
        }
    }

    /// One `MKDIR` with an explicit mode (and owner), made exact with one
    /// `SETATTR` if the server didn't apply it. `Ok(Err(status))` for NFS errors.
    pub(super) async fn mkdir_exact(
        &mut self,
        dir: &nfs_fh3,
        name: &str,
        path: &str,
        dir_path: &str,
        mode: u32,
        owner: Option<(u32, u32)>,
    ) -> Result<Result<(Attr, nfs_fh3), nfsstat3>, NfsError> {
        let args = MKDIR3args {
            where_: dirop(dir, name.as_bytes()),
            attributes: sattr3 {
                mode: Nfs3Option::Some(mode & 0o7777),
                uid: owner.map_or(Nfs3Option::None, |(uid, _)| Nfs3Option::Some(uid)),
                gid: owner.map_or(Nfs3Option::None, |(_, gid)| Nfs3Option::Some(gid)),
                ..sattr3::default()
            },
        };
        let res = guarded(
            &mut self.reusable,
            self.call_timeout,
            "MKDIR",
            self.nfs.mkdir(&args),
        )
        .await?;
        let ok = match res {
            Nfs3Result::Ok(ok) => ok,
            Nfs3Result::Err((stat, _)) => return Ok(Err(stat)),
        };
        let fh = match ok.obj {
            Nfs3Option::Some(fh) => fh,
            Nfs3Option::None => match self.lookup(dir, name.as_bytes(), path, dir_path).await? {
                Some((fh, _)) => fh,
                None => {
                    return Err(NfsError::Protocol(format!(
                        "MKDIR `{path}` succeeded but LOOKUP can't find it"
                    )));
                }
            },
        };
        let mut attr = self.attr_of(&fh, option(ok.obj_attributes), path).await?;
        if attr.mode & 0o7777 != mode & 0o7777 {
            // Servers differ: ganesha drops setgid/sticky from MKDIR's mode (as
            // mkdir(2) does), others apply a umask or ignore the mode (memfs).
            // One SETATTR makes it exact where the server allows it.
            tracing::debug!(
                path,
                got = attr.mode,
                want = mode,
                "fixing mode after MKDIR"
            );
            let fix = sattr3 {
                mode: Nfs3Option::Some(mode & 0o7777),
                ..sattr3::default()
            };
            attr = match self.setattr(&fh, fix, path).await? {
                Some(a) => a,
                None => self.getattr(&fh, path).await?,
            };
        }
        Ok(Ok((attr, fh)))
    }
    pub(super) async fn existing_dir(
        &mut self,
        (fh, attrs): (nfs_fh3, Option<fattr3>),
        path: &str,
    ) -> Result<(Mkdir, nfs_fh3), NfsError> {
        let attr = self.attr_of(&fh, attrs, path).await?;
        if attr.is_dir() {
            Ok((Mkdir::Existed(attr), fh))
        } else {
            Err(NfsError::NotADirectory {
                path: path.to_owned(),
            })
        }
    }

    /// `REMOVE` (files, symlinks…) or `RMDIR` (empty directories) one entry.
    /// An entry that is already gone counts as removed.
    pub(super) async fn unlink(
        &mut self,
        dir: &nfs_fh3,
        name: &[u8],
        is_dir: bool,
        path: &str,
    ) -> Result<(), NfsError> {
        let (op, stat) = if is_dir {
            let args = RMDIR3args {
                object: dirop(dir, name),
            };
            let res = guarded(
                &mut self.reusable,
                self.call_timeout,
                "RMDIR",
                self.nfs.rmdir(&args),
            )
            .await?;
            ("RMDIR", status_of(&res))
        } else {
            let args = REMOVE3args {
                object: dirop(dir, name),
            };
            let res = guarded(
                &mut self.reusable,
                self.call_timeout,
                "REMOVE",
                self.nfs.remove(&args),
            )
            .await?;
            ("REMOVE", status_of(&res))
        };
        match stat {
            nfsstat3::NFS3_OK | nfsstat3::NFS3ERR_NOENT => Ok(()),
            other => Err(status_error(op, path, other)),
        }
    }

    /// One `RENAME`; the status is the caller's to interpret.
    pub(super) async fn rename_once(
        &mut self,
        from_dir: &nfs_fh3,
        from_name: &[u8],
        to_dir: &nfs_fh3,
        to_name: &[u8],
    ) -> Result<nfsstat3, NfsError> {
        let args = RENAME3args {
            from: dirop(from_dir, from_name),
            to: dirop(to_dir, to_name),
        };
        let res = guarded(
            &mut self.reusable,
            self.call_timeout,
            "RENAME",
            self.nfs.rename(&args),
        )
        .await?;
        Ok(status_of(&res))
    }

    /// Every entry of a directory (without `.` and `..`), all pages.
    pub(super) async fn list(&mut self, dir: &nfs_fh3, path: &str) -> Result<Vec<Entry>, NfsError> {
        // A directory changing under us may invalidate cookies: start over a few times.
        for _ in 0..3 {
            match self.list_once(dir, path).await {
                Err(NfsError::Server { status, .. }) if status == "NFS3ERR_BAD_COOKIE" => {}
                other => return other,
            }
        }
        self.list_once(dir, path).await
    }

    pub(super) async fn list_once(
        &mut self,
        dir: &nfs_fh3,
        path: &str,
    ) -> Result<Vec<Entry>, NfsError> {
        let mut entries = Vec::new();
        let mut cookie = 0;
        let mut cookieverf = cookieverf3::default();
        loop {
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
                Nfs3Result::Err((nfsstat3::NFS3ERR_NOTSUPP, _)) if cookie == 0 => {
                    return self.list_plain(dir, path).await;
                }
                Nfs3Result::Err((stat, _)) => return Err(status_error("READDIRPLUS", path, stat)),
            };
            cookieverf = ok.cookieverf;
            let eof = ok.reply.eof;
            let page = ok.reply.entries.into_inner();
            if page.is_empty() && !eof {
                return Err(NfsError::Protocol(format!(
                    "READDIRPLUS `{path}`: empty page without EOF"
                )));
            }
            for e in page {
                cookie = e.cookie;
                let name = e.name.0.into_owned();
                if !checked_entry_name(&name, path)? {
                    continue;
                }
                entries.push(Entry {
                    kind: option(e.name_attributes)
                        .as_ref()
                        .map(|a| Attr::from(a).kind),
                    fh: option(e.name_handle),
                    name,
                });
            }
            if eof {
                return Ok(entries);
            }
        }
    }

    /// Listing for servers without `READDIRPLUS`: names only.
    pub(super) async fn list_plain(
        &mut self,
        dir: &nfs_fh3,
        path: &str,
    ) -> Result<Vec<Entry>, NfsError> {
        let mut entries = Vec::new();
        let mut cookie = 0;
        let mut cookieverf = cookieverf3::default();
        loop {
            let args = READDIR3args {
                dir: dir.clone(),
                cookie,
                cookieverf,
                count: READDIR_MAXCOUNT,
            };
            let res = guarded(
                &mut self.reusable,
                self.call_timeout,
                "READDIR",
                self.nfs.readdir(&args),
            )
            .await?;
            let ok = match res {
                Nfs3Result::Ok(ok) => ok,
                Nfs3Result::Err((stat, _)) => return Err(status_error("READDIR", path, stat)),
            };
            cookieverf = ok.cookieverf;
            let eof = ok.reply.eof;
            let page = ok.reply.entries.into_inner();
            if page.is_empty() && !eof {
                return Err(NfsError::Protocol(format!(
                    "READDIR `{path}`: empty page without EOF"
                )));
            }
            for e in page {
                cookie = e.cookie;
                let name = e.name.0.into_owned();
                if checked_entry_name(&name, path)? {
                    entries.push(Entry {
                        name,
                        kind: None,
                        fh: None,
                    });
                }
            }
            if eof {
                return Ok(entries);
            }
        }
    }

    /// Remove directory `name` (handle `fh`) in `parent` and everything below it.
    /// Iterative, so deep trees don't need recursion.
    pub(super) async fn remove_tree(
        &mut self,
        parent: nfs_fh3,
        name: Vec<u8>,
        fh: nfs_fh3,
        path: String,
    ) -> Result<(), NfsError> {
        let mut stack = vec![Frame {
            parent,
            name,
            fh,
            path,
            emptied: 0,
        }];
        while let Some(top) = stack.last_mut() {
            let (dir, dir_path) = (top.fh.clone(), top.path.clone());
            let entries = match self.list(&dir, &dir_path).await {
                Ok(entries) => entries,
                Err(e @ (NfsError::NotFound { .. } | NfsError::Server { .. })) => {
                    // Removed underneath us (NOENT, STALE)? Then this one is done.
                    let (parent, name) = (top.parent.clone(), top.name.clone());
                    if self.lookup(&parent, &name, &dir_path, "").await?.is_some() {
                        return Err(e);
                    }
                    stack.pop();
                    continue;
                }
                Err(e) => return Err(e),
            };
            let mut subdirs = Vec::new();
            for entry in entries {
                let entry_path = format!("{dir_path}/{}", String::from_utf8_lossy(&entry.name));
                let (kind, fh) = match (entry.kind, entry.fh) {
                    (Some(kind), Some(fh)) => (kind, fh),
                    (Some(kind), None) if kind != FileKind::Dir => (kind, nfs_fh3::default()),
                    _ => match self
                        .lookup(&dir, &entry.name, &entry_path, &dir_path)
                        .await?
                    {
                        Some((fh, attrs)) => {
                            (self.attr_of(&fh, attrs, &entry_path).await?.kind, fh)
                        }
                        None => continue,
                    },
                };
                if kind == FileKind::Dir {
                    subdirs.push(Frame {
                        parent: dir.clone(),
                        name: entry.name,
                        fh,
                        path: entry_path,
                        emptied: 0,
                    });
                } else {
                    self.unlink(&dir, &entry.name, false, &entry_path).await?;
                }
            }
            if subdirs.is_empty() {
                let top = stack.last_mut().expect("stack is not empty");
                let args = RMDIR3args {
                    object: dirop(&top.parent, &top.name),
                };
                let res = guarded(
                    &mut self.reusable,
                    self.call_timeout,
                    "RMDIR",
                    self.nfs.rmdir(&args),
                )
                .await?;
                match status_of(&res) {
                    nfsstat3::NFS3_OK | nfsstat3::NFS3ERR_NOENT => {
                        stack.pop();
                    }
                    nfsstat3::NFS3ERR_NOTEMPTY | nfsstat3::NFS3ERR_EXIST
                        if top.emptied + 1 < MAX_RMDIR_ATTEMPTS =>
                    {
                        // Something appeared meanwhile: list again.
                        top.emptied += 1;
                    }
                    other => return Err(status_error("RMDIR", &top.path, other)),
                }
            } else {
                if stack.len() + 1 > MAX_TREE_DEPTH {
                    return Err(NfsError::Protocol(format!(
                        "`{dir_path}`: directory tree deeper than {MAX_TREE_DEPTH} levels"
                    )));
                }
                stack.extend(subdirs);
            }
        }
        Ok(())
    }
}

pub(super) fn option<T: nfs3_types::xdr_codec::Pack + nfs3_types::xdr_codec::Unpack>(
    o: Nfs3Option<T>,
) -> Option<T> {
    match o {
        Nfs3Option::Some(v) => Some(v),
        Nfs3Option::None => None,
    }
}

pub(super) fn status_of<T, E>(res: &Nfs3Result<T, E>) -> nfsstat3 {
    match res {
        Nfs3Result::Ok(_) => nfsstat3::NFS3_OK,
        Nfs3Result::Err((stat, _)) => *stat,
    }
}

/// One directory entry as listed.
pub(super) struct Entry {
    pub(super) name: Vec<u8>,
    pub(super) kind: Option<FileKind>,
    pub(super) fh: Option<nfs_fh3>,
}

/// A directory pending removal in `remove_tree`.
pub(super) struct Frame {
    pub(super) parent: nfs_fh3,
    pub(super) name: Vec<u8>,
    pub(super) fh: nfs_fh3,
    pub(super) path: String,
    /// How often RMDIR found it not empty after it was emptied.
    pub(super) emptied: u32,
}
