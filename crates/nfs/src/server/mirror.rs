//! The mirror file system: the exported directory and the handles handed out for it,
//! every operation a blocking `*at` call confined below the root (run them off the
//! async threads).

use super::*;

/// The exported directory, and the handles handed out for it.
pub(super) struct MirrorFs {
    /// Canonical path of the exported directory (for logs and `dir()`).
    pub(super) dir: PathBuf,
    /// The exported directory, opened once: every path is walked from here.
    pub(super) root: OwnedFd,
    pub(super) root_id: NodeId,
    pub(super) generation: u64,
    /// Handle → path relative to `root`, built from validated names only.
    pub(super) paths: RwLock<HashMap<NodeId, PathBuf>>,
}

/// An object found from its handle: its parent directory (`None` for the root) and
/// its current status.
pub(super) struct Resolved {
    pub(super) rel: PathBuf,
    pub(super) parent: Option<OwnedFd>,
    pub(super) st: FileStat,
}

/// Where an attribute change applies: the exported directory itself, or a name in
/// an opened directory (never followed if it is a symlink).
#[derive(Clone, Copy)]
pub(super) enum At<'a> {
    Root(BorrowedFd<'a>),
    Child(BorrowedFd<'a>, &'a OsStr),
}

impl Resolved {
    pub(super) fn at<'a>(&'a self, root: &'a OwnedFd) -> At<'a> {
        match (&self.parent, self.rel.file_name()) {
            (Some(parent), Some(name)) => At::Child(parent.as_fd(), name),
            _ => At::Root(root.as_fd()),
        }
    }
}

impl MirrorFs {
    pub(super) fn open(dir: &Path, generation: u64) -> io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let dir = std::fs::canonicalize(dir)?;
        let file = File::open(&dir)?;
        if !file.metadata()?.is_dir() {
            return Err(io::Error::new(
                io::ErrorKind::NotADirectory,
                format!("{} is not a directory", dir.display()),
            ));
        }
        let root = OwnedFd::from(file);
        let root_id = NodeId::of(&fstat(&root)?);
        let mut paths = HashMap::new();
        paths.insert(root_id, PathBuf::new());
        Ok(Self {
            dir,
            root,
            root_id,
            generation,
            paths: RwLock::new(paths),
        })
    }

    /// The NFS handle of `id` as `nfs3_server` encodes it.
    pub(super) fn encode(&self, id: NodeId) -> nfs_fh3 {
        let mut data = Vec::with_capacity(8 + id.len());
        data.extend_from_slice(&self.generation.to_le_bytes());
        data.extend_from_slice(id.as_bytes());
        nfs_fh3 {
            data: Opaque::owned(data),
        }
    }

    /// Reads an NFS handle as `nfs3_server` does: an older generation is STALE.
    pub(super) fn decode(&self, fh: &nfs_fh3) -> Result<NodeId, nfsstat3> {
        let data: &[u8] = fh.data.as_ref();
        let (generation, id) = data
            .split_first_chunk::<8>()
            .ok_or(nfsstat3::NFS3ERR_BADHANDLE)?;
        let generation = u64::from_le_bytes(*generation);
        if generation < self.generation {
            return Err(nfsstat3::NFS3ERR_STALE);
        }
        if generation > self.generation {
            return Err(nfsstat3::NFS3ERR_BADHANDLE);
        }
        NodeId::from_bytes(id).ok_or(nfsstat3::NFS3ERR_BADHANDLE)
    }

    // -- the handle table --------------------------------------------------

    pub(super) fn path_of(&self, id: NodeId) -> Result<PathBuf, nfsstat3> {
        let paths = self.paths.read().unwrap_or_else(PoisonError::into_inner);
        paths.get(&id).cloned().ok_or(nfsstat3::NFS3ERR_STALE)
    }

    pub(super) fn remember(&self, rel: PathBuf, st: &FileStat) -> NodeId {
        let id = NodeId::of(st);
        let mut paths = self.paths.write().unwrap_or_else(PoisonError::into_inner);
        paths.insert(id, rel);
        id
    }

    /// Forgets `rel` and everything below it.
    pub(super) fn forget(&self, rel: &Path) {
        let mut paths = self.paths.write().unwrap_or_else(PoisonError::into_inner);
        paths.retain(|_, path| !path.starts_with(rel));
    }

    /// Records that `from` (and everything below it) is now `to`.
    pub(super) fn moved(&self, from: &Path, to: &Path) {
        let mut paths = self.paths.write().unwrap_or_else(PoisonError::into_inner);
        paths.retain(|_, path| !path.starts_with(to));
        for path in paths.values_mut() {
            if let Ok(rest) = path.strip_prefix(from) {
                *path = if rest.as_os_str().is_empty() {
                    to.to_path_buf()
                } else {
                    to.join(rest)
                };
            }
        }
    }

    // -- walking -------------------------------------------------------------

    /// Opens the directory at `rel` from the root, never following a symlink
    /// (`crate::beneath`). `last` is added to the flags of the final open.
    pub(super) fn walk(&self, rel: &Path, last: OFlag) -> nix::Result<OwnedFd> {
        let mut names = Vec::new();
        for component in rel.components() {
            match component {
                Component::Normal(name) => names.push(name),
                _ => return Err(Errno::EINVAL),
            }
        }
        crate::beneath::open_dir_beneath(self.root.as_fd(), &names, last).map_err(|e| e.errno())
    }

    /// Finds the object behind `id`, checking it is still the same object.
    pub(super) fn resolve(&self, id: NodeId) -> Result<Resolved, nfsstat3> {
        let rel = self.path_of(id)?;
        let (parent, st) = match (rel.parent(), rel.file_name()) {
            (Some(parent_rel), Some(name)) => {
                let parent = self.walk(parent_rel, OFlag::O_PATH).map_err(gone)?;
                let st = fstatat(&parent, name, AtFlags::AT_SYMLINK_NOFOLLOW).map_err(gone)?;
                (Some(parent), st)
            }
            _ => (None, fstat(&self.root).map_err(nfs_err)?),
        };
        if NodeId::of(&st) != id {
            return Err(nfsstat3::NFS3ERR_STALE);
        }
        Ok(Resolved { rel, parent, st })
    }

    /// Opens the directory behind `id` (`O_PATH` for `*at` calls, `O_RDONLY` to list
    /// it), with its relative path.
    pub(super) fn open_dir(
        &self,
        id: NodeId,
        flags: OFlag,
    ) -> Result<(OwnedFd, PathBuf), nfsstat3> {
        let rel = self.path_of(id)?;
        match self.walk(&rel, flags) {
            Ok(fd) => {
                if NodeId::of(&fstat(&fd).map_err(nfs_err)?) != id {
                    return Err(nfsstat3::NFS3ERR_STALE);
                }
                Ok((fd, rel))
            }
            Err(Errno::ENOTDIR | Errno::ELOOP) if self.resolve(id).is_ok() => {
                Err(nfsstat3::NFS3ERR_NOTDIR)
            }
            Err(error) => Err(gone(error)),
        }
    }

    /// Opens the regular file behind `id`.
    pub(super) fn open_file(&self, id: NodeId, flags: OFlag) -> Result<File, nfsstat3> {
        let r = self.resolve(id)?;
        match kind(&r.st) {
            ftype3::NF3REG => {}
            ftype3::NF3DIR => return Err(nfsstat3::NFS3ERR_ISDIR),
            _ => return Err(nfsstat3::NFS3ERR_INVAL),
        }
        let (Some(parent), Some(name)) = (&r.parent, r.rel.file_name()) else {
            return Err(nfsstat3::NFS3ERR_ISDIR);
        };
        let flags = flags | OFlag::O_NOFOLLOW | OFlag::O_NONBLOCK | OFlag::O_CLOEXEC;
        let fd = openat(parent, name, flags, Mode::empty()).map_err(nfs_err)?;
        if NodeId::of(&fstat(&fd).map_err(nfs_err)?) != id {
            return Err(nfsstat3::NFS3ERR_STALE);
        }
        Ok(File::from(fd))
    }

    // -- operations ----------------------------------------------------------

    pub(super) fn getattr(&self, id: NodeId) -> Result<fattr3, nfsstat3> {
        self.resolve(id).map(|r| fattr(&r.st))
    }

    /// MOUNT of a sub-directory (`a/b` below the export): every component a real
    /// directory, none a symlink (the mount point a client gets is never a link's
    /// target, and never a file).
    pub(super) fn lookup_dir_path(&self, path: &str) -> Result<NodeId, nfsstat3> {
        let names: Vec<&str> = path.split('/').filter(|c| !c.is_empty()).collect();
        let fd = crate::beneath::open_dir_beneath(self.root.as_fd(), &names, OFlag::O_PATH)
            .map_err(|error| {
                debug!(%error, "MOUNT refused");
                match error {
                    crate::beneath::BeneathError::NotFound { .. } => nfsstat3::NFS3ERR_NOENT,
                    crate::beneath::BeneathError::NotAName { .. } => nfsstat3::NFS3ERR_INVAL,
                    _ => nfsstat3::NFS3ERR_NOTDIR,
                }
            })?;
        let st = fstat(&fd).map_err(nfs_err)?;
        Ok(self.remember(names.iter().collect(), &st))
    }

    pub(super) fn lookup(&self, dir: NodeId, name: &[u8]) -> Result<NodeId, nfsstat3> {
        let name = check_name(name)?;
        let (dfd, rel) = self.open_dir(dir, OFlag::O_PATH)?;
        let st = fstatat(&dfd, name, AtFlags::AT_SYMLINK_NOFOLLOW).map_err(nfs_err)?;
        Ok(self.remember(rel.join(name), &st))
    }

    pub(super) fn setattr(&self, id: NodeId, attrs: &sattr3) -> Result<fattr3, nfsstat3> {
        let r = self.resolve(id)?;
        set_attrs(r.at(&self.root), kind(&r.st), id, attrs)?;
        self.getattr(id)
    }

    /// MKDIR with its attributes: the mode is applied exactly (no umask), the owner
    /// if given. An existing name is `NFS3ERR_EXIST`.
    pub(super) fn mkdir(
        &self,
        dir: NodeId,
        name: &[u8],
        attrs: &sattr3,
    ) -> (Result<(NodeId, fattr3), nfsstat3>, wcc_data) {
        let (dfd, rel) = match self.open_dir(dir, OFlag::O_PATH) {
            Ok(opened) => opened,
            Err(stat) => return (Err(stat), wcc_data::default()),
        };
        let before = pre_op(&dfd);
        let result = self.mkdir_in(&dfd, &rel, name, attrs);
        (
            result,
            wcc_data {
                before,
                after: post_op(&dfd),
            },
        )
    }

    pub(super) fn mkdir_in(
        &self,
        dfd: &OwnedFd,
        rel: &Path,
        name: &[u8],
        attrs: &sattr3,
    ) -> Result<(NodeId, fattr3), nfsstat3> {
        let name = check_name(name)?;
        let mode = requested_mode(attrs).unwrap_or(DEFAULT_DIR_MODE);
        mkdirat(dfd, name, Mode::from_bits_truncate(mode)).map_err(nfs_err)?;
        let st = fstatat(dfd, name, AtFlags::AT_SYMLINK_NOFOLLOW).map_err(nfs_err)?;
        let id = NodeId::of(&st);
        let exact = sattr3 {
            mode: set_mode3::Some(mode),
            size: set_size3::None,
            ..attrs.clone()
        };
        if let Err(stat) = set_attrs(At::Child(dfd.as_fd(), name), ftype3::NF3DIR, id, &exact) {
            // Don't leave a directory with the wrong mode or owner behind.
            let _ = unlinkat(dfd, name, UnlinkatFlags::RemoveDir);
            return Err(stat);
        }
        let st = fstatat(dfd, name, AtFlags::AT_SYMLINK_NOFOLLOW).map_err(nfs_err)?;
        Ok((self.remember(rel.join(name), &st), fattr(&st)))
    }

    /// RMDIR: only directories, only empty ones.
    pub(super) fn rmdir(&self, dir: NodeId, name: &[u8]) -> (Result<(), nfsstat3>, wcc_data) {
        let (dfd, rel) = match self.open_dir(dir, OFlag::O_PATH) {
            Ok(opened) => opened,
            Err(stat) => return (Err(stat), wcc_data::default()),
        };
        let before = pre_op(&dfd);
        let result = (|| {
            let name = check_name(name)?;
            let st = fstatat(&dfd, name, AtFlags::AT_SYMLINK_NOFOLLOW).map_err(nfs_err)?;
            if kind(&st) != ftype3::NF3DIR {
                return Err(nfsstat3::NFS3ERR_NOTDIR);
            }
            unlinkat(&dfd, name, UnlinkatFlags::RemoveDir).map_err(|error| match error {
                Errno::ENOTEMPTY | Errno::EEXIST => nfsstat3::NFS3ERR_NOTEMPTY,
                error => nfs_err(error),
            })?;
            self.forget(&rel.join(name));
            Ok(())
        })();
        (
            result,
            wcc_data {
                before,
                after: post_op(&dfd),
            },
        )
    }

    /// REMOVE: anything but a directory (a symlink itself, never its target).
    pub(super) fn remove(&self, dir: NodeId, name: &[u8]) -> Result<(), nfsstat3> {
        let name = check_name(name)?;
        let (dfd, rel) = self.open_dir(dir, OFlag::O_PATH)?;
        let st = fstatat(&dfd, name, AtFlags::AT_SYMLINK_NOFOLLOW).map_err(nfs_err)?;
        if kind(&st) == ftype3::NF3DIR {
            return Err(nfsstat3::NFS3ERR_ISDIR);
        }
        unlinkat(&dfd, name, UnlinkatFlags::NoRemoveDir).map_err(nfs_err)?;
        self.forget(&rel.join(name));
        Ok(())
    }

    /// RENAME as RFC 1813 says: an existing target is replaced only by an object of
    /// the same kind, and a directory only if empty; otherwise `NFS3ERR_EXIST`.
    pub(super) fn rename(
        &self,
        from_dir: NodeId,
        from_name: &[u8],
        to_dir: NodeId,
        to_name: &[u8],
    ) -> Result<(), nfsstat3> {
        let from_name = check_name(from_name)?;
        let to_name = check_name(to_name)?;
        let (from_fd, from_rel) = self.open_dir(from_dir, OFlag::O_PATH)?;
        let (to_fd, to_rel) = self.open_dir(to_dir, OFlag::O_PATH)?;
        let (from_rel, to_rel) = (from_rel.join(from_name), to_rel.join(to_name));
        let src = fstatat(&from_fd, from_name, AtFlags::AT_SYMLINK_NOFOLLOW).map_err(nfs_err)?;
        if from_rel == to_rel {
            return Ok(());
        }
        match fstatat(&to_fd, to_name, AtFlags::AT_SYMLINK_NOFOLLOW) {
            Ok(dst) if NodeId::of(&dst) == NodeId::of(&src) => return Ok(()),
            Ok(dst) if (kind(&dst) == ftype3::NF3DIR) != (kind(&src) == ftype3::NF3DIR) => {
                return Err(nfsstat3::NFS3ERR_EXIST);
            }
            Ok(_) | Err(Errno::ENOENT) => {}
            Err(error) => return Err(nfs_err(error)),
        }
        renameat(&from_fd, from_name, &to_fd, to_name).map_err(|error| match error {
            Errno::ENOTEMPTY | Errno::EEXIST | Errno::ENOTDIR | Errno::EISDIR => {
                nfsstat3::NFS3ERR_EXIST
            }
            error => nfs_err(error),
        })?;
        self.moved(&from_rel, &to_rel);
        Ok(())
    }

    /// CREATE (UNCHECKED or GUARDED; the GUARDED check is done by `nfs3_server`).
    pub(super) fn create(
        &self,
        dir: NodeId,
        name: &[u8],
        attrs: &sattr3,
    ) -> Result<(NodeId, fattr3), nfsstat3> {
        let name = check_name(name)?;
        let (dfd, rel) = self.open_dir(dir, OFlag::O_PATH)?;
        let existed = match fstatat(&dfd, name, AtFlags::AT_SYMLINK_NOFOLLOW) {
            Ok(st) if kind(&st) == ftype3::NF3REG => true,
            Ok(_) => return Err(nfsstat3::NFS3ERR_EXIST),
            Err(Errno::ENOENT) => false,
            Err(error) => return Err(nfs_err(error)),
        };
        let mode = requested_mode(attrs).unwrap_or(DEFAULT_FILE_MODE);
        let flags = OFlag::O_CREAT
            | OFlag::O_WRONLY
            | OFlag::O_NOFOLLOW
            | OFlag::O_NONBLOCK
            | OFlag::O_CLOEXEC;
        let fd =
            openat(&dfd, name, flags, Mode::from_bits_truncate(mode)).map_err(
                |error| match error {
                    Errno::ELOOP | Errno::EISDIR => nfsstat3::NFS3ERR_EXIST,
                    error => nfs_err(error),
                },
            )?;
        let st = fstat(&fd).map_err(nfs_err)?;
        let id = NodeId::of(&st);
        let mut attrs = attrs.clone();
        if !existed {
            attrs.mode = set_mode3::Some(mode);
        }
        set_attrs(At::Child(dfd.as_fd(), name), ftype3::NF3REG, id, &attrs)?;
        let st = fstat(&fd).map_err(nfs_err)?;
        Ok((self.remember(rel.join(name), &st), fattr(&st)))
    }

    /// Exclusive CREATE: the verifier is kept in atime/mtime so that a retransmitted
    /// call succeeds.
    pub(super) fn create_exclusive(
        &self,
        dir: NodeId,
        name: &[u8],
        verf: createverf3,
    ) -> Result<NodeId, nfsstat3> {
        let name = check_name(name)?;
        let (dfd, rel) = self.open_dir(dir, OFlag::O_PATH)?;
        let (hi, lo) = verf.0.split_at(4);
        let word = |b: &[u8]| b.try_into().map_or(0, u32::from_be_bytes);
        let (atime, mtime) = (i64::from(word(hi)), i64::from(word(lo)));
        let flags =
            OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_WRONLY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
        match openat(&dfd, name, flags, Mode::from_bits_truncate(0o600)) {
            Ok(fd) => {
                let times = (TimeSpec::new(atime, 0), TimeSpec::new(mtime, 0));
                futimens(&fd, &times.0, &times.1).map_err(nfs_err)?;
                let st = fstat(&fd).map_err(nfs_err)?;
                Ok(self.remember(rel.join(name), &st))
            }
            Err(Errno::EEXIST) => {
                let st = fstatat(&dfd, name, AtFlags::AT_SYMLINK_NOFOLLOW).map_err(nfs_err)?;
                let same =
                    kind(&st) == ftype3::NF3REG && st.st_atime == atime && st.st_mtime == mtime;
                if same {
                    Ok(self.remember(rel.join(name), &st))
                } else {
                    Err(nfsstat3::NFS3ERR_EXIST)
                }
            }
            Err(error) => Err(nfs_err(error)),
        }
    }

    /// SYMLINK, with the directory's attributes before and after.
    pub(super) fn symlink(
        &self,
        dir: NodeId,
        name: &[u8],
        target: &[u8],
        attrs: &sattr3,
    ) -> (Result<(NodeId, fattr3), nfsstat3>, wcc_data) {
        let (dfd, rel) = match self.open_dir(dir, OFlag::O_PATH) {
            Ok(opened) => opened,
            Err(stat) => return (Err(stat), wcc_data::default()),
        };
        let before = pre_op(&dfd);
        let result = self.symlink_in(&dfd, &rel, name, target, attrs);
        (
            result,
            wcc_data {
                before,
                after: post_op(&dfd),
            },
        )
    }

    pub(super) fn symlink_in(
        &self,
        dfd: &OwnedFd,
        rel: &Path,
        name: &[u8],
        target: &[u8],
        attrs: &sattr3,
    ) -> Result<(NodeId, fattr3), nfsstat3> {
        let name = check_name(name)?;
        if target.is_empty() || target.contains(&0) {
            return Err(nfsstat3::NFS3ERR_INVAL);
        }
        symlinkat(OsStr::from_bytes(target), dfd, name).map_err(nfs_err)?;
        let st = fstatat(dfd, name, AtFlags::AT_SYMLINK_NOFOLLOW).map_err(nfs_err)?;
        let id = NodeId::of(&st);
        let owner_and_times = sattr3 {
            mode: set_mode3::None,
            size: set_size3::None,
            ..attrs.clone()
        };
        if let Err(stat) = set_attrs(
            At::Child(dfd.as_fd(), name),
            ftype3::NF3LNK,
            id,
            &owner_and_times,
        ) {
            let _ = unlinkat(dfd, name, UnlinkatFlags::NoRemoveDir);
            return Err(stat);
        }
        let st = fstatat(dfd, name, AtFlags::AT_SYMLINK_NOFOLLOW).map_err(nfs_err)?;
        Ok((self.remember(rel.join(name), &st), fattr(&st)))
    }

    pub(super) fn readlink(&self, id: NodeId) -> Result<Vec<u8>, nfsstat3> {
        let r = self.resolve(id)?;
        if kind(&r.st) != ftype3::NF3LNK {
            return Err(nfsstat3::NFS3ERR_INVAL);
        }
        let (Some(parent), Some(name)) = (&r.parent, r.rel.file_name()) else {
            return Err(nfsstat3::NFS3ERR_INVAL);
        };
        let target = readlinkat(parent, name).map_err(nfs_err)?;
        Ok(target.as_bytes().to_vec())
    }

    pub(super) fn read(
        &self,
        id: NodeId,
        offset: u64,
        count: u32,
    ) -> Result<(Vec<u8>, bool), nfsstat3> {
        let file = self.open_file(id, OFlag::O_RDONLY)?;
        let size = file.metadata().map_err(|e| io_err(&e))?.len();
        let mut buf = vec![0u8; count.min(MAX_READ) as usize];
        let mut filled = 0;
        while filled < buf.len() {
            let at = offset
                .checked_add(filled as u64)
                .ok_or(nfsstat3::NFS3ERR_INVAL)?;
            match file.read_at(&mut buf[filled..], at) {
                Ok(0) => break,
                Ok(n) => filled += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(io_err(&e)),
            }
        }
        buf.truncate(filled);
        let eof = offset.saturating_add(filled as u64) >= size;
        Ok((buf, eof))
    }

    pub(super) fn write(
        &self,
        id: NodeId,
        offset: u64,
        data: &[u8],
        stable: stable_how,
    ) -> Result<(fattr3, stable_how), nfsstat3> {
        let file = self.open_file(id, OFlag::O_WRONLY)?;
        file.write_all_at(data, offset).map_err(|e| io_err(&e))?;
        match stable {
            stable_how::UNSTABLE => Ok(()),
            stable_how::DATA_SYNC => file.sync_data(),
            stable_how::FILE_SYNC => file.sync_all(),
        }
        .map_err(|e| io_err(&e))?;
        let st = fstat(&file).map_err(nfs_err)?;
        Ok((fattr(&st), stable))
    }

    pub(super) fn commit(&self, id: NodeId) -> Result<(), nfsstat3> {
        match self.open_file(id, OFlag::O_RDONLY) {
            Ok(file) => file.sync_all().map_err(|e| io_err(&e)),
            // Nothing is buffered for directories and the like.
            Err(nfsstat3::NFS3ERR_ISDIR | nfsstat3::NFS3ERR_INVAL) => Ok(()),
            Err(stat) => Err(stat),
        }
    }

    /// The entries of a directory after `cookie`, in cookie order, without `.`/`..`.
    pub(super) fn list(self: &Arc<Self>, dir: NodeId, cookie: u64) -> Result<Listing, nfsstat3> {
        let (fd, rel) = self.open_dir(dir, OFlag::O_RDONLY)?;
        let statfd = fd.try_clone().map_err(|e| io_err(&e))?;
        let mut names = Vec::new();
        let mut d = Dir::from_fd(fd).map_err(nfs_err)?;
        for entry in d.iter() {
            let entry = entry.map_err(nfs_err)?;
            let name = entry.file_name().to_bytes();
            if name == b"." || name == b".." {
                continue;
            }
            let entry_cookie = cookie_of(name);
            if entry_cookie > cookie {
                names.push((entry_cookie, name.to_vec()));
            }
        }
        names.sort_unstable();
        Ok(Listing {
            fs: Arc::clone(self),
            dir: statfd,
            rel,
            names: names.into_iter(),
        })
    }

    /// FSSTAT from the file system holding the exported directory.
    pub(super) fn fsstat(&self, id: NodeId) -> Result<FSSTAT3resok, nfsstat3> {
        let r = self.resolve(id)?;
        let vfs = fstatvfs(&self.root).map_err(nfs_err)?;
        let frsize = vfs.fragment_size();
        let bytes = |blocks: u64| blocks.saturating_mul(frsize);
        Ok(FSSTAT3resok {
            obj_attributes: post_op_attr::Some(fattr(&r.st)),
            tbytes: bytes(vfs.blocks()),
            fbytes: bytes(vfs.blocks_free()),
            abytes: bytes(vfs.blocks_available()),
            tfiles: vfs.files(),
            ffiles: vfs.files_free(),
            afiles: vfs.files_available(),
            invarsec: 0,
        })
    }
}

/// What the `nfs3_server` handlers iterate over: names are listed up front, each is
/// stat'ed (and gets a handle) only when it is about to be sent.
pub(super) struct Listing {
    pub(super) fs: Arc<MirrorFs>,
    pub(super) dir: OwnedFd,
    pub(super) rel: PathBuf,
    pub(super) names: std::vec::IntoIter<(u64, Vec<u8>)>,
}

impl Listing {
    pub(super) fn next_entry(&mut self) -> NextResult<DirEntryPlus<NodeId>> {
        for (cookie, name) in self.names.by_ref() {
            let os_name = OsStr::from_bytes(&name);
            match fstatat(&self.dir, os_name, AtFlags::AT_SYMLINK_NOFOLLOW) {
                Ok(st) => {
                    let id = self.fs.remember(self.rel.join(os_name), &st);
                    return NextResult::Ok(DirEntryPlus {
                        fileid: st.st_ino,
                        name: filename3::from(name),
                        cookie,
                        name_attributes: Some(fattr(&st)),
                        name_handle: Some(id),
                    });
                }
                // Removed since it was listed.
                Err(Errno::ENOENT) => {}
                Err(error) => return NextResult::Err(nfs_err(error)),
            }
        }
        NextResult::Eof
    }
}

impl ReadDirPlusIterator<NodeId> for Listing {
    async fn next(&mut self) -> NextResult<DirEntryPlus<NodeId>> {
        self.next_entry()
    }
}

/// A readdir cookie: FNV-1a of the name, never 0 (0 means "from the start").
pub(super) fn cookie_of(name: &[u8]) -> u64 {
    let hash = name.iter().fold(0xcbf2_9ce4_8422_2325_u64, |hash, byte| {
        (hash ^ u64::from(*byte)).wrapping_mul(0x0100_0000_01b3)
    });
    hash.max(1)
}

/// Applies `attrs` in the order Linux knfsd does: size, owner (which clears
/// set-id bits), mode, times. Never follows a symlink.
pub(super) fn set_attrs(
    at: At<'_>,
    kind: ftype3,
    id: NodeId,
    attrs: &sattr3,
) -> Result<(), nfsstat3> {
    if let set_size3::Some(size) = attrs.size {
        match (kind, at) {
            (ftype3::NF3REG, At::Child(dir, name)) => truncate(dir, name, id, size)?,
            (ftype3::NF3DIR, _) => return Err(nfsstat3::NFS3ERR_ISDIR),
            _ => return Err(nfsstat3::NFS3ERR_INVAL),
        }
    }
    let uid = match attrs.uid {
        set_uid3::Some(uid) => Some(Uid::from_raw(uid)),
        set_uid3::None => None,
    };
    let gid = match attrs.gid {
        set_gid3::Some(gid) => Some(Gid::from_raw(gid)),
        set_gid3::None => None,
    };
    if uid.is_some() || gid.is_some() {
        match at {
            At::Root(fd) => fchown(fd, uid, gid),
            At::Child(dir, name) => fchownat(dir, name, uid, gid, AtFlags::AT_SYMLINK_NOFOLLOW),
        }
        .map_err(nfs_err)?;
    }
    // Linux has no mode on symlinks; knfsd ignores it too.
    if let (set_mode3::Some(mode), false) = (attrs.mode, kind == ftype3::NF3LNK) {
        let mode = Mode::from_bits_truncate(mode & 0o7777);
        match at {
            At::Root(fd) => fchmod(fd, mode).map_err(nfs_err)?,
            At::Child(dir, name) => chmod_at(dir, name, id, mode)?,
        }
    }
    let atime = match attrs.atime {
        set_atime::DONT_CHANGE => TimeSpec::UTIME_OMIT,
        set_atime::SET_TO_SERVER_TIME => TimeSpec::UTIME_NOW,
        set_atime::SET_TO_CLIENT_TIME(t) => timespec(t),
    };
    let mtime = match attrs.mtime {
        set_mtime::DONT_CHANGE => TimeSpec::UTIME_OMIT,
        set_mtime::SET_TO_SERVER_TIME => TimeSpec::UTIME_NOW,
        set_mtime::SET_TO_CLIENT_TIME(t) => timespec(t),
    };
    if atime != TimeSpec::UTIME_OMIT || mtime != TimeSpec::UTIME_OMIT {
        match at {
            At::Root(fd) => futimens(fd, &atime, &mtime),
            At::Child(dir, name) => {
                utimensat(dir, name, &atime, &mtime, UtimensatFlags::NoFollowSymlink)
            }
        }
        .map_err(nfs_err)?;
    }
    Ok(())
}

pub(super) fn truncate(
    dir: BorrowedFd<'_>,
    name: &OsStr,
    id: NodeId,
    size: u64,
) -> Result<(), nfsstat3> {
    let flags = OFlag::O_WRONLY | OFlag::O_NOFOLLOW | OFlag::O_NONBLOCK | OFlag::O_CLOEXEC;
    let file = File::from(openat(dir, name, flags, Mode::empty()).map_err(nfs_err)?);
    if NodeId::of(&fstat(&file).map_err(nfs_err)?) != id {
        return Err(nfsstat3::NFS3ERR_STALE);
    }
    file.set_len(size).map_err(|e| io_err(&e))
}

/// `chmod` of a name that is not a symlink. `fchmodat(AT_SYMLINK_NOFOLLOW)` needs
/// `/proc` or a recent kernel; without them, open the object and `fchmod` it.
pub(super) fn chmod_at(
    dir: BorrowedFd<'_>,
    name: &OsStr,
    id: NodeId,
    mode: Mode,
) -> Result<(), nfsstat3> {
    match fchmodat(dir, name, mode, FchmodatFlags::NoFollowSymlink) {
        Err(Errno::EOPNOTSUPP) => {
            let flags = OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_NONBLOCK | OFlag::O_CLOEXEC;
            let fd = openat(dir, name, flags, Mode::empty()).map_err(nfs_err)?;
            if NodeId::of(&fstat(&fd).map_err(nfs_err)?) != id {
                return Err(nfsstat3::NFS3ERR_STALE);
            }
            fchmod(&fd, mode).map_err(nfs_err)
        }
        result => result.map_err(nfs_err),
    }
}

pub(super) fn timespec(t: nfstime3) -> TimeSpec {
    TimeSpec::new(t.seconds.into(), t.nseconds.into())
}

pub(super) fn requested_mode(attrs: &sattr3) -> Option<u32> {
    match attrs.mode {
        set_mode3::Some(mode) => Some(mode & 0o7777),
        set_mode3::None => None,
    }
}

/// A name for a directory operation: exactly one path component.
pub(super) fn check_name(name: &[u8]) -> Result<&OsStr, nfsstat3> {
    if name.is_empty() || name == b"." || name == b".." || name.contains(&b'/') || name.contains(&0)
    {
        return Err(nfsstat3::NFS3ERR_INVAL);
    }
    if name.len() > NAME_MAX {
        return Err(nfsstat3::NFS3ERR_NAMETOOLONG);
    }
    Ok(OsStr::from_bytes(name))
}

pub(super) fn kind(st: &FileStat) -> ftype3 {
    match st.st_mode & nix::libc::S_IFMT {
        nix::libc::S_IFDIR => ftype3::NF3DIR,
        nix::libc::S_IFLNK => ftype3::NF3LNK,
        nix::libc::S_IFBLK => ftype3::NF3BLK,
        nix::libc::S_IFCHR => ftype3::NF3CHR,
        nix::libc::S_IFIFO => ftype3::NF3FIFO,
        nix::libc::S_IFSOCK => ftype3::NF3SOCK,
        _ => ftype3::NF3REG,
    }
}

pub(super) fn nfstime(seconds: i64, nanos: i64) -> nfstime3 {
    nfstime3 {
        seconds: u32::try_from(seconds.max(0)).unwrap_or(u32::MAX),
        nseconds: u32::try_from(nanos).unwrap_or(0),
    }
}

pub(super) fn fattr(st: &FileStat) -> fattr3 {
    let size = u64::try_from(st.st_size).unwrap_or(0);
    let blocks = u64::try_from(st.st_blocks).unwrap_or(0);
    let rdev = |n: u64| u32::try_from(n).unwrap_or(u32::MAX);
    fattr3 {
        type_: kind(st),
        mode: st.st_mode & 0o7777,
        nlink: u32::try_from(st.st_nlink).unwrap_or(u32::MAX),
        uid: st.st_uid,
        gid: st.st_gid,
        size,
        used: blocks.saturating_mul(512),
        rdev: specdata3 {
            specdata1: rdev(nix::sys::stat::major(st.st_rdev)),
            specdata2: rdev(nix::sys::stat::minor(st.st_rdev)),
        },
        fsid: st.st_dev,
        fileid: st.st_ino,
        atime: nfstime(st.st_atime, st.st_atime_nsec),
        mtime: nfstime(st.st_mtime, st.st_mtime_nsec),
        ctime: nfstime(st.st_ctime, st.st_ctime_nsec),
    }
}

pub(super) fn pre_op(fd: &OwnedFd) -> pre_op_attr {
    fstat(fd).map_or(pre_op_attr::None, |st| {
        let attr = fattr(&st);
        pre_op_attr::Some(wcc_attr {
            size: attr.size,
            mtime: attr.mtime,
            ctime: attr.ctime,
        })
    })
}

pub(super) fn post_op(fd: &OwnedFd) -> post_op_attr {
    fstat(fd).map_or(post_op_attr::None, |st| post_op_attr::Some(fattr(&st)))
}

/// A path that no longer leads to the object: the handle is stale.
pub(super) fn gone(error: Errno) -> nfsstat3 {
    match error {
        Errno::ENOENT | Errno::ENOTDIR | Errno::ELOOP => nfsstat3::NFS3ERR_STALE,
        error => nfs_err(error),
    }
}

pub(super) fn io_err(error: &io::Error) -> nfsstat3 {
    error
        .raw_os_error()
        .map_or(nfsstat3::NFS3ERR_IO, |code| nfs_err(Errno::from_raw(code)))
}

pub(super) fn nfs_err(error: Errno) -> nfsstat3 {
    match error {
        Errno::EPERM => nfsstat3::NFS3ERR_PERM,
        Errno::ENOENT => nfsstat3::NFS3ERR_NOENT,
        Errno::ENXIO => nfsstat3::NFS3ERR_NXIO,
        Errno::EACCES => nfsstat3::NFS3ERR_ACCES,
        Errno::EEXIST => nfsstat3::NFS3ERR_EXIST,
        Errno::EXDEV => nfsstat3::NFS3ERR_XDEV,
        Errno::ENODEV => nfsstat3::NFS3ERR_NODEV,
        Errno::ENOTDIR => nfsstat3::NFS3ERR_NOTDIR,
        Errno::EISDIR => nfsstat3::NFS3ERR_ISDIR,
        Errno::EINVAL | Errno::ELOOP => nfsstat3::NFS3ERR_INVAL,
        Errno::EFBIG => nfsstat3::NFS3ERR_FBIG,
        Errno::ENOSPC => nfsstat3::NFS3ERR_NOSPC,
        Errno::EROFS => nfsstat3::NFS3ERR_ROFS,
        Errno::EMLINK => nfsstat3::NFS3ERR_MLINK,
        Errno::ENAMETOOLONG => nfsstat3::NFS3ERR_NAMETOOLONG,
        Errno::ENOTEMPTY => nfsstat3::NFS3ERR_NOTEMPTY,
        Errno::EDQUOT => nfsstat3::NFS3ERR_DQUOT,
        Errno::ESTALE => nfsstat3::NFS3ERR_STALE,
        Errno::EOPNOTSUPP => nfsstat3::NFS3ERR_NOTSUPP,
        _ => nfsstat3::NFS3ERR_IO,
    }
}
