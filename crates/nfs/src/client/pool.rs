//! The connection pool behind [`NfsClient`]: up to `max_connections` connections,
//! opened on demand (MOUNT, then NFS), checked before reuse, returned on drop only
//! when still reusable; the directory-handle cache and its STALE retry.

use super::*;

/// Handles of directories already walked to, by path (`a/b`). Directory handles are
/// server-wide, so every connection shares them; a STALE answer clears the cache
/// (and the operation is tried once more, see [`NfsClient::retry_stale`]).
pub(super) type DirCache = Arc<Mutex<HashMap<String, nfs_fh3>>>;

pub(super) struct Inner {
    pub(super) dirs: DirCache,
    pub(super) target: NfsTarget,
    pub(super) config: ClientConfig,
    pub(super) credential: opaque_auth<'static>,
    pub(super) permits: Semaphore,
    pub(super) idle: Mutex<Vec<Conn>>,
}

/// A connection checked out of the pool. Dropping it returns the connection
/// to the pool only if it is still reusable.
pub(super) struct Lease<'a> {
    pub(super) inner: &'a Inner,
    pub(super) conn: Option<Conn>,
    pub(super) _permit: SemaphorePermit<'a>,
}

impl Deref for Lease<'_> {
    type Target = Conn;
    fn deref(&self) -> &Conn {
        self.conn.as_ref().expect("lease holds a connection")
    }
}

impl DerefMut for Lease<'_> {
    fn deref_mut(&mut self) -> &mut Conn {
        self.conn.as_mut().expect("lease holds a connection")
    }
}

impl Drop for Lease<'_> {
    fn drop(&mut self) {
        if let Some(conn) = self.conn.take() {
            if conn.reusable {
                self.inner
                    .idle
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .push(conn);
            } else {
                tracing::debug!(export = %self.inner.target, "dropping NFS connection");
            }
        }
    }
}

/// A pool of NFSv3 connections to one export. Cheap to clone; clones share the pool.
#[derive(Clone)]
pub struct NfsClient {
    pub(super) inner: Arc<Inner>,
}

impl fmt::Debug for NfsClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NfsClient")
            .field("target", &self.inner.target)
            .field("config", &self.inner.config)
            .finish_non_exhaustive()
    }
}

impl NfsClient {
    /// Drop cached handles of `path` and everything below it (it is going away).
    pub(super) fn forget(&self, path: &[&str]) {
        let prefix = join(path);
        let below = format!("{prefix}/");
        self.inner
            .dirs
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .retain(|k, _| k != &prefix && !k.starts_with(&below));
    }

    /// Run `op`, which walks from cached directory handles. A STALE answer means a
    /// cached handle outlived its directory (removed and made again behind our back,
    /// or a server restarted with new handles): forget them all and run `op` once
    /// more, walking afresh. A call the server answered STALE did not happen, so the
    /// second run is safe; a directory that is really gone is `NotFound` then.
    pub(super) async fn retry_stale<T, Fut>(
        &self,
        mut op: impl FnMut() -> Fut,
    ) -> Result<T, NfsError>
    where
        Fut: Future<Output = Result<T, NfsError>>,
    {
        let result = op().await;
        if !is_stale(&result) {
            return result;
        }
        tracing::info!(export = %self.inner.target, "stale directory handle; clearing the handle cache and trying again");
        self.forget_all();
        let again = op().await;
        if is_stale(&again) {
            self.forget_all();
        }
        again
    }

    fn forget_all(&self) {
        self.inner
            .dirs
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clear();
    }

    /// Take an idle connection that is still alive, or open a new one.
    pub(super) async fn lease(&self) -> Result<Lease<'_>, NfsError> {
        let inner = &*self.inner;
        let permit = inner
            .permits
            .acquire()
            .await
            .map_err(|_| NfsError::Protocol("connection pool closed".to_owned()))?;
        loop {
            let conn = inner
                .idle
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .pop();
            match conn {
                Some(conn) if conn.is_alive() => {
                    return Ok(Lease {
                        inner,
                        conn: Some(conn),
                        _permit: permit,
                    });
                }
                Some(_) => {
                    tracing::debug!(export = %inner.target, "idle NFS connection was closed; discarding it");
                }
                None => break,
            }
        }
        let conn = self.connect().await?;
        Ok(Lease {
            inner,
            conn: Some(conn),
            _permit: permit,
        })
    }

    /// MOUNT the share and open the NFS connection, within `connect_timeout`.
    pub(super) async fn connect(&self) -> Result<Conn, NfsError> {
        let inner = &*self.inner;
        let target = &inner.target;
        let config = &inner.config;
        let last = Arc::new(Mutex::new(None));
        let connector = TransportConnector {
            last: Arc::clone(&last),
        };
        let mut builder =
            Nfs3ConnectionBuilder::new(connector, target.server.to_string(), &target.share)
                .connect_from_privileged_port(config.privileged_port)
                .credential(inner.credential.clone());
        if let Some(port) = target.port {
            builder = builder
                .portmapper_port(port)
                .mount_port(port)
                .nfs3_port(port);
        }
        let connect_error = |reason: String| NfsError::Connect {
            server: match target.port {
                Some(port) => SocketAddr::new(target.server, port).to_string(),
                None => target.server.to_string(),
            },
            share: target.share.clone(),
            reason,
        };
        let mounted = match tokio::time::timeout(config.connect_timeout, builder.mount()).await {
            Ok(Ok(mounted)) => mounted,
            Ok(Err(e)) => return Err(connect_error(describe_connect_error(&e, config))),
            Err(_) => {
                return Err(connect_error(format!(
                    "no answer within {:?}",
                    config.connect_timeout
                )));
            }
        };
        let root = mounted.root_nfs_fh3();
        // The MOUNT connection is closed here; only the NFS one is kept.
        let nfs = mounted.into_nfs3_client();
        let stream = last
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
            .ok_or_else(|| NfsError::Protocol("connector opened no NFS connection".to_owned()))?;
        tracing::debug!(export = %target, "connected to NFS export");
        Ok(Conn {
            nfs,
            stream,
            root,
            call_timeout: config.call_timeout,
            reusable: true,
            dirs: Arc::clone(&inner.dirs),
        })
    }

    #[cfg(test)]
    pub(super) fn idle_connections(&self) -> usize {
        self.inner
            .idle
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }
}

fn is_stale<T>(result: &Result<T, NfsError>) -> bool {
    matches!(result, Err(NfsError::Server { status, .. }) if status.contains("STALE"))
}
