//! The public port: one listener that answers the calls `nfs3_server` gets wrong
//! (portmap, MOUNT of sub-directories, MKDIR/SYMLINK/RMDIR/FSSTAT that must be exact)
//! and relays the others to it, record-marked RPC in and out.

use super::*;

/// Answers the calls `nfs3_server` gets wrong and relays the others to it.
pub(super) struct Relay {
    pub(super) fs: Arc<MirrorFs>,
    pub(super) backend: SocketAddr,
    pub(super) port: u16,
}

/// The calls the relay answers itself.
#[derive(Clone, Copy, Debug)]
pub(super) enum Intercepted {
    GetPort,
    Mkdir,
    Symlink,
    Rmdir,
    Fsstat,
}

impl Intercepted {
    pub(super) fn of(call: &call_body<'_>) -> Option<Self> {
        const GETPORT: u32 = portmap::PMAP_PROG::PMAPPROC_GETPORT as u32;
        const MKDIR: u32 = NFS_PROGRAM::NFSPROC3_MKDIR as u32;
        const SYMLINK: u32 = NFS_PROGRAM::NFSPROC3_SYMLINK as u32;
        const RMDIR: u32 = NFS_PROGRAM::NFSPROC3_RMDIR as u32;
        const FSSTAT: u32 = NFS_PROGRAM::NFSPROC3_FSSTAT as u32;
        if call.rpcvers != RPC_VERSION_2 {
            return None;
        }
        match (call.prog, call.vers, call.proc) {
            (portmap::PROGRAM, portmap::VERSION, GETPORT) => Some(Self::GetPort),
            (nfs::PROGRAM, nfs::VERSION, MKDIR) => Some(Self::Mkdir),
            (nfs::PROGRAM, nfs::VERSION, SYMLINK) => Some(Self::Symlink),
            (nfs::PROGRAM, nfs::VERSION, RMDIR) => Some(Self::Rmdir),
            (nfs::PROGRAM, nfs::VERSION, FSSTAT) => Some(Self::Fsstat),
            _ => None,
        }
    }
}

pub(super) async fn accept_loop(listener: TcpListener, relay: Arc<Relay>) {
    // Dropping the set (when this task is aborted) aborts every connection.
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    // Every TCP probe is a connection: debug, never info.
                    debug!(%peer, "NFS connection opened");
                    let relay = Arc::clone(&relay);
                    connections.spawn(async move {
                        match relay.serve(stream).await {
                            Ok(()) => debug!(%peer, "NFS connection closed"),
                            Err(error) => debug!(%peer, %error, "NFS connection ended"),
                        }
                    });
                }
                Err(error) => {
                    // Out of descriptors and the like: don't spin.
                    warn!(%error, "embedded NFS server: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
}

impl Relay {
    /// Serves one client connection, with its own connection to the backend.
    pub(super) async fn serve(&self, client: TcpStream) -> io::Result<()> {
        client.set_nodelay(true)?;
        let backend = TcpStream::connect(self.backend).await?;
        backend.set_nodelay(true)?;
        let (mut client_rx, mut client_tx) = client.into_split();
        let (mut backend_rx, mut backend_tx) = backend.into_split();
        let (replies, mut outbox) = mpsc::channel::<Vec<u8>>(32);
        let backend_replies = replies.clone();

        let to_client = async move {
            while let Some(record) = outbox.recv().await {
                write_record(&mut client_tx, &record).await?;
            }
            client_tx.shutdown().await
        };
        let from_backend = async move {
            while let Some(record) = read_record(&mut backend_rx).await? {
                if backend_replies.send(record).await.is_err() {
                    break;
                }
            }
            Ok(())
        };
        let from_client = async move {
            while let Some(record) = read_record(&mut client_rx).await? {
                match self.answer(&record).await {
                    Some(reply) => {
                        if replies.send(reply).await.is_err() {
                            break;
                        }
                    }
                    None => write_record(&mut backend_tx, &record).await?,
                }
            }
            backend_tx.shutdown().await
        };
        // When either side closes, the connection is over: the losing reader is
        // dropped with its sender, and `to_client` flushes what is queued, then closes.
        let relay_calls = async move {
            tokio::select! {
                done = from_client => done,
                done = from_backend => done,
            }
        };
        tokio::try_join!(to_client, relay_calls).map(|_| ())
    }

    /// The reply to `record` if the relay answers it itself, else `None`.
    pub(super) async fn answer(&self, record: &[u8]) -> Option<Vec<u8>> {
        let (msg, header_len) = rpc_msg::unpack(&mut Cursor::new(record)).ok()?;
        let msg_body::CALL(call) = &msg.body else {
            return None;
        };
        let op = Intercepted::of(call)?;
        let args = record.get(header_len..)?;
        debug!(
            xid = msg.xid,
            ?op,
            "embedded NFS server: answering in the relay"
        );
        Some(self.run(op, msg.xid, args).await)
    }

    pub(super) async fn run(&self, op: Intercepted, xid: u32, args: &[u8]) -> Vec<u8> {
        match op {
            Intercepted::GetPort => match unpack_all::<portmap::mapping>(args) {
                Some(m) => success(xid, &self.getport(&m)),
                None => garbage_args(xid),
            },
            Intercepted::Mkdir => match unpack_all::<MKDIR3args<'_>>(args) {
                Some(args) => success(xid, &self.mkdir(args).await),
                None => garbage_args(xid),
            },
            Intercepted::Symlink => match unpack_all::<SYMLINK3args<'_>>(args) {
                Some(args) => success(xid, &self.symlink(args).await),
                None => garbage_args(xid),
            },
            Intercepted::Rmdir => match unpack_all::<RMDIR3args<'_>>(args) {
                Some(args) => success(xid, &self.rmdir(args).await),
                None => garbage_args(xid),
            },
            Intercepted::Fsstat => match unpack_all::<FSSTAT3args>(args) {
                Some(args) => success(xid, &self.fsstat(&args).await),
                None => garbage_args(xid),
            },
        }
    }

    /// Every program this server speaks is on this one port (TCP only).
    pub(super) fn getport(&self, m: &portmap::mapping) -> u32 {
        let served = m.prog == nfs::PROGRAM || m.prog == mount::PROGRAM;
        if served && m.prot == portmap::IPPROTO_TCP {
            u32::from(self.port)
        } else {
            0
        }
    }

    /// MKDIR and SYMLINK: a blocking call that makes one entry in the directory `dir`.
    /// Gives the new object's handle and attributes, or the status, each with the
    /// directory's attributes before and after.
    pub(super) async fn make_entry(
        &self,
        dir: &nfs_fh3,
        make: impl FnOnce(&MirrorFs, NodeId) -> (Result<(NodeId, fattr3), nfsstat3>, wcc_data)
        + Send
        + 'static,
    ) -> Result<(nfs_fh3, fattr3, wcc_data), (nfsstat3, wcc_data)> {
        let dir = self
            .fs
            .decode(dir)
            .map_err(|stat| (stat, wcc_data::default()))?;
        let fs = Arc::clone(&self.fs);
        match tokio::task::spawn_blocking(move || make(&fs, dir)).await {
            Ok((Ok((id, attr)), dir_wcc)) => Ok((self.fs.encode(id), attr, dir_wcc)),
            Ok((Err(stat), dir_wcc)) => Err((stat, dir_wcc)),
            Err(_) => Err((nfsstat3::NFS3ERR_SERVERFAULT, wcc_data::default())),
        }
    }

    pub(super) async fn mkdir(&self, args: MKDIR3args<'_>) -> MKDIR3res {
        let (name, attrs) = (args.where_.name.as_ref().to_vec(), args.attributes);
        let made = self
            .make_entry(&args.where_.dir, move |fs, dir| {
                fs.mkdir(dir, &name, &attrs)
            })
            .await;
        match made {
            Ok((fh, attr, dir_wcc)) => MKDIR3res::Ok(MKDIR3resok {
                obj: Nfs3Option::Some(fh),
                obj_attributes: Nfs3Option::Some(attr),
                dir_wcc,
            }),
            Err((stat, dir_wcc)) => MKDIR3res::Err((stat, MKDIR3resfail { dir_wcc })),
        }
    }

    pub(super) async fn symlink(&self, args: SYMLINK3args<'_>) -> SYMLINK3res {
        let name = args.where_.name.as_ref().to_vec();
        let target = args.symlink.symlink_data.as_ref().to_vec();
        let attrs = args.symlink.symlink_attributes;
        let made = self
            .make_entry(&args.where_.dir, move |fs, dir| {
                fs.symlink(dir, &name, &target, &attrs)
            })
            .await;
        match made {
            Ok((fh, attr, dir_wcc)) => SYMLINK3res::Ok(SYMLINK3resok {
                obj: Nfs3Option::Some(fh),
                obj_attributes: Nfs3Option::Some(attr),
                dir_wcc,
            }),
            Err((stat, dir_wcc)) => SYMLINK3res::Err((stat, SYMLINK3resfail { dir_wcc })),
        }
    }

    pub(super) async fn rmdir(&self, args: RMDIR3args<'_>) -> RMDIR3res {
        let dir = match self.fs.decode(&args.object.dir) {
            Ok(dir) => dir,
            Err(stat) => {
                return RMDIR3res::Err((
                    stat,
                    RMDIR3resfail {
                        dir_wcc: wcc_data::default(),
                    },
                ));
            }
        };
        let name = args.object.name.as_ref().to_vec();
        let fs = Arc::clone(&self.fs);
        let outcome = tokio::task::spawn_blocking(move || fs.rmdir(dir, &name)).await;
        match outcome {
            Ok((Ok(()), dir_wcc)) => RMDIR3res::Ok(RMDIR3resok { dir_wcc }),
            Ok((Err(stat), dir_wcc)) => RMDIR3res::Err((stat, RMDIR3resfail { dir_wcc })),
            Err(_) => RMDIR3res::Err((
                nfsstat3::NFS3ERR_SERVERFAULT,
                RMDIR3resfail {
                    dir_wcc: wcc_data::default(),
                },
            )),
        }
    }

    pub(super) async fn fsstat(&self, args: &FSSTAT3args) -> FSSTAT3res {
        let id = match self.fs.decode(&args.fsroot) {
            Ok(id) => id,
            Err(stat) => return FSSTAT3res::Err((stat, FSSTAT3resfail::default())),
        };
        let fs = Arc::clone(&self.fs);
        match tokio::task::spawn_blocking(move || fs.fsstat(id)).await {
            Ok(Ok(ok)) => FSSTAT3res::Ok(ok),
            Ok(Err(stat)) => FSSTAT3res::Err((stat, FSSTAT3resfail::default())),
            Err(_) => FSSTAT3res::Err((nfsstat3::NFS3ERR_SERVERFAULT, FSSTAT3resfail::default())),
        }
    }
}

/// Unpacks a call's arguments, which must fill the rest of the record.
pub(super) fn unpack_all<T: Unpack>(args: &[u8]) -> Option<T> {
    let (value, used) = T::unpack(&mut Cursor::new(args)).ok()?;
    (used == args.len()).then_some(value)
}

pub(super) fn accepted(
    xid: u32,
    reply_data: accept_stat_data,
    body: &impl Pack,
) -> io::Result<Vec<u8>> {
    let msg = rpc_msg {
        xid,
        body: msg_body::REPLY(reply_body::MSG_ACCEPTED(accepted_reply {
            verf: opaque_auth::default(),
            reply_data,
        })),
    };
    let mut out = Vec::with_capacity(msg.packed_size() + body.packed_size());
    msg.pack(&mut out).map_err(io::Error::other)?;
    body.pack(&mut out).map_err(io::Error::other)?;
    Ok(out)
}

pub(super) fn success(xid: u32, body: &impl Pack) -> Vec<u8> {
    accepted(xid, accept_stat_data::SUCCESS, body).unwrap_or_else(|error| {
        warn!(%error, xid, "embedded NFS server: cannot encode a reply");
        system_err(xid)
    })
}

pub(super) fn garbage_args(xid: u32) -> Vec<u8> {
    accepted(xid, accept_stat_data::GARBAGE_ARGS, &Void).unwrap_or_default()
}

pub(super) fn system_err(xid: u32) -> Vec<u8> {
    accepted(xid, accept_stat_data::SYSTEM_ERR, &Void).unwrap_or_default()
}

/// Reads one RPC record (all its fragments); `None` at a clean end of stream.
pub(super) async fn read_record(r: &mut (impl AsyncRead + Unpin)) -> io::Result<Option<Vec<u8>>> {
    let mut record = Vec::new();
    loop {
        let mut header = [0u8; 4];
        if let Err(error) = r.read_exact(&mut header).await {
            if error.kind() == io::ErrorKind::UnexpectedEof && record.is_empty() {
                return Ok(None);
            }
            return Err(error);
        }
        let header = fragment_header::from(header);
        let start = record.len();
        let len = header.fragment_length() as usize;
        if start + len > MAX_RECORD {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("RPC record larger than {MAX_RECORD} bytes"),
            ));
        }
        record.resize(start + len, 0);
        r.read_exact(&mut record[start..]).await?;
        if header.eof() {
            return Ok(Some(record));
        }
    }
}

/// Writes `record` as a single last fragment, header and body in one vectored write
/// (two writes on a no-delay socket are two segments, and the reader may wake for
/// each), without copying the body.
pub(super) async fn write_record(
    w: &mut (impl AsyncWrite + Unpin),
    record: &[u8],
) -> io::Result<()> {
    let len = u32::try_from(record.len())
        .ok()
        .filter(|len| *len <= fragment_header::MASK)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "RPC record too large"))?;
    let header = fragment_header::new(len, true).into_xdr_buf();
    w.write_all_buf(&mut Buf::chain(header.as_slice(), record))
        .await
}
