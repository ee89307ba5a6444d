//! The TCP transport under `nfs3_client`: end-of-stream is an error (`nfs3_client`
//! alone retries a zero-length read forever), and the last stream opened is kept so
//! the pool can check an idle connection before reuse.

use super::*;

/// TCP transport for `nfs3_client` that reports end-of-stream as an error.
///
/// The stream is shared with the pooled connection so it can check, before
/// reuse, whether the server closed the connection while it sat idle.
pub(super) struct Transport {
    pub(super) stream: Arc<TcpStream>,
}

impl AsyncRead for Transport {
    async fn async_read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        loop {
            self.stream.readable().await?;
            match self.stream.try_read(buf) {
                Ok(0) => {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the NFS server closed the connection",
                    ));
                }
                Ok(n) => return Ok(n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
        }
    }
}

impl AsyncWrite for Transport {
    async fn async_write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        loop {
            self.stream.writable().await?;
            match self.stream.try_write(buf) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => return Ok(n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
        }
    }
}

/// Opens [`Transport`]s and remembers the last stream it opened: the
/// connection builder opens the NFS connection last, and the pool keeps that
/// stream for idle checks.
pub(super) struct TransportConnector {
    pub(super) last: Arc<Mutex<Option<Arc<TcpStream>>>>,
}

impl TransportConnector {
    pub(super) fn wrap(&self, stream: TcpStream) -> Transport {
        // Requests are written whole; don't let Nagle hold back the last segment.
        let _ = stream.set_nodelay(true);
        let stream = Arc::new(stream);
        *self.last.lock().unwrap_or_else(PoisonError::into_inner) = Some(Arc::clone(&stream));
        Transport { stream }
    }
}

impl Connector for TransportConnector {
    type Connection = Transport;

    async fn connect(&self, addr: SocketAddr) -> io::Result<Transport> {
        let stream = TcpStream::connect(addr).await?;
        Ok(self.wrap(stream))
    }

    async fn connect_with_port(&self, addr: SocketAddr, local_port: u16) -> io::Result<Transport> {
        let (socket, local) = match addr {
            SocketAddr::V4(_) => (TcpSocket::new_v4()?, IpAddr::V4(Ipv4Addr::UNSPECIFIED)),
            SocketAddr::V6(_) => (TcpSocket::new_v6()?, IpAddr::V6(Ipv6Addr::UNSPECIFIED)),
        };
        // Lets a port whose previous connection is in TIME_WAIT be bound again.
        socket.set_reuseaddr(true)?;
        socket.bind(SocketAddr::new(local, local_port))?;
        let stream = socket.connect(addr).await.map_err(|e| {
            if e.kind() == io::ErrorKind::AddrNotAvailable {
                // Same 4-tuple still in TIME_WAIT: make the caller try the next port.
                io::Error::new(io::ErrorKind::AddrInUse, e)
            } else {
                e
            }
        })?;
        Ok(self.wrap(stream))
    }
}

// ---------------------------------------------------------------------------
// Connections and pool
