//! `MirrorFs` behind `nfs3_server`'s VFS traits; each call runs on the blocking pool.

use super::*;

/// `MirrorFs` behind `nfs3_server`'s VFS traits; each call runs on the blocking pool.
pub(super) struct MirrorVfs(pub(super) Arc<MirrorFs>);

impl MirrorVfs {
    pub(super) async fn blocking<T, F>(&self, f: F) -> Result<T, nfsstat3>
    where
        T: Send + 'static,
        F: FnOnce(&Arc<MirrorFs>) -> Result<T, nfsstat3> + Send + 'static,
    {
        let fs = Arc::clone(&self.0);
        tokio::task::spawn_blocking(move || f(&fs))
            .await
            .unwrap_or(Err(nfsstat3::NFS3ERR_SERVERFAULT))
    }
}

impl NfsReadFileSystem for MirrorVfs {
    type Handle = NodeId;

    fn root_dir(&self) -> NodeId {
        self.0.root_id
    }

    async fn lookup(&self, dirid: &NodeId, filename: &filename3<'_>) -> Result<NodeId, nfsstat3> {
        let (dir, name) = (*dirid, filename.as_ref().to_vec());
        self.blocking(move |fs| fs.lookup(dir, &name)).await
    }

    /// MOUNT's path walk: directories only, never a symlink.
    async fn lookup_by_path(&self, path: &str) -> Result<NodeId, nfsstat3> {
        let path = path.to_owned();
        self.blocking(move |fs| fs.lookup_dir_path(&path)).await
    }

    async fn getattr(&self, id: &NodeId) -> Result<fattr3, nfsstat3> {
        let id = *id;
        self.blocking(move |fs| fs.getattr(id)).await
    }

    async fn read(
        &self,
        id: &NodeId,
        offset: u64,
        count: u32,
    ) -> Result<(Vec<u8>, bool), nfsstat3> {
        let id = *id;
        self.blocking(move |fs| fs.read(id, offset, count)).await
    }

    async fn readdirplus(
        &self,
        dirid: &NodeId,
        cookie: u64,
    ) -> Result<impl ReadDirPlusIterator<NodeId>, nfsstat3> {
        let dir = *dirid;
        self.blocking(move |fs| fs.list(dir, cookie)).await
    }

    async fn readlink(&self, id: &NodeId) -> Result<nfspath3<'_>, nfsstat3> {
        let id = *id;
        self.blocking(move |fs| fs.readlink(id))
            .await
            .map(nfspath3::from)
    }
}

impl NfsFileSystem for MirrorVfs {
    async fn setattr(&self, id: &NodeId, setattr: sattr3) -> Result<fattr3, nfsstat3> {
        let id = *id;
        self.blocking(move |fs| fs.setattr(id, &setattr)).await
    }

    async fn write(
        &self,
        id: &NodeId,
        offset: u64,
        data: &[u8],
        stable: stable_how,
    ) -> Result<(fattr3, stable_how), nfsstat3> {
        let (id, data) = (*id, data.to_vec());
        self.blocking(move |fs| fs.write(id, offset, &data, stable))
            .await
    }

    async fn create(
        &self,
        dirid: &NodeId,
        filename: &filename3<'_>,
        attr: sattr3,
    ) -> Result<(NodeId, fattr3), nfsstat3> {
        let (dir, name) = (*dirid, filename.as_ref().to_vec());
        self.blocking(move |fs| fs.create(dir, &name, &attr)).await
    }

    async fn create_exclusive(
        &self,
        dirid: &NodeId,
        filename: &filename3<'_>,
        createverf: createverf3,
    ) -> Result<NodeId, nfsstat3> {
        let (dir, name) = (*dirid, filename.as_ref().to_vec());
        self.blocking(move |fs| fs.create_exclusive(dir, &name, createverf))
            .await
    }

    /// Not reached through the relay (which answers MKDIR with its attributes);
    /// kept correct anyway, with the default mode.
    async fn mkdir(
        &self,
        dirid: &NodeId,
        dirname: &filename3<'_>,
    ) -> Result<(NodeId, fattr3), nfsstat3> {
        let (dir, name) = (*dirid, dirname.as_ref().to_vec());
        self.blocking(move |fs| fs.mkdir(dir, &name, &sattr3::default()).0)
            .await
    }

    /// REMOVE only: the relay answers RMDIR, so a directory here is `NFS3ERR_ISDIR`.
    async fn remove(&self, dirid: &NodeId, filename: &filename3<'_>) -> Result<(), nfsstat3> {
        let (dir, name) = (*dirid, filename.as_ref().to_vec());
        self.blocking(move |fs| fs.remove(dir, &name)).await
    }

    async fn rename<'a>(
        &self,
        from_dirid: &NodeId,
        from_filename: &filename3<'a>,
        to_dirid: &NodeId,
        to_filename: &filename3<'a>,
    ) -> Result<(), nfsstat3> {
        let (from_dir, from) = (*from_dirid, from_filename.as_ref().to_vec());
        let (to_dir, to) = (*to_dirid, to_filename.as_ref().to_vec());
        self.blocking(move |fs| fs.rename(from_dir, &from, to_dir, &to))
            .await
    }

    async fn symlink<'a>(
        &self,
        dirid: &NodeId,
        linkname: &filename3<'a>,
        symlink: &nfspath3<'a>,
        attr: &sattr3,
    ) -> Result<(NodeId, fattr3), nfsstat3> {
        let (dir, name) = (*dirid, linkname.as_ref().to_vec());
        let (target, attr) = (symlink.as_ref().to_vec(), attr.clone());
        self.blocking(move |fs| fs.symlink(dir, &name, &target, &attr).0)
            .await
    }

    async fn commit(&self, id: &NodeId, _offset: u64, _count: u32) -> Result<(), nfsstat3> {
        let id = *id;
        self.blocking(move |fs| fs.commit(id)).await
    }
}
