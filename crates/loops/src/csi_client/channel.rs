//! The client side of a CSI socket: a tonic `Channel` over a unix socket, for the bench,
//! the tests and the provisioner loops. Its writes are coalesced per scheduler turn
//! (see `Coalesced`), so a unary call reaches the server as one write.

use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::UnixStream;
use tonic::transport::{Channel, Endpoint, Uri};

/// Connect to the CSI server listening on `socket`.
pub async fn connect(socket: &Path) -> Result<Channel, tonic::transport::Error> {
    let socket: PathBuf = socket.to_owned();
    // The URI is required by tonic but unused: every connection goes to the socket.
    Endpoint::from_static("http://csi.invalid")
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let socket = socket.clone();
            async move {
                let stream = UnixStream::connect(socket).await?;
                Ok::<_, io::Error>(TokioIo::new(Coalesced::new(stream)))
            }
        }))
        .await
}

/// Most bytes held back for coalescing; a write beyond it goes out first.
const COALESCE_LIMIT: usize = 64 * 1024;

/// A stream whose flushes wait one scheduler turn before they write.
///
/// hyper's HTTP/2 client flushes a request's HEADERS frame before the task that pipes
/// its body has queued the DATA frames (the stream gets send capacity only once its
/// HEADERS are out), so every unary call crossed the socket as two writes and the
/// server woke once for each. Here a flush with bytes pending first yields once (wakes
/// its own task and returns `Pending`); the body task runs in that turn, and the next
/// flush writes HEADERS and DATA together: one write, one wake-up on the server, as
/// grpc-go's batching writer sends a unary call. Only when the bytes go out changes;
/// which bytes, and their order, never do.
struct Coalesced<S> {
    inner: S,
    pending: Vec<u8>,
    /// This flush already yielded once: the next one writes.
    yielded: bool,
}

impl<S: AsyncWrite + Unpin> Coalesced<S> {
    fn new(inner: S) -> Self {
        Self {
            inner,
            pending: Vec::new(),
            yielded: false,
        }
    }

    /// Write every pending byte to the stream.
    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while !self.pending.is_empty() {
            let written = ready!(Pin::new(&mut self.inner).poll_write(cx, &self.pending))?;
            if written == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.pending.drain(..written);
        }
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Coalesced<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Coalesced<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        if this.pending.len() + buf.len() > COALESCE_LIMIT {
            ready!(this.poll_drain(cx))?;
            if buf.len() >= COALESCE_LIMIT {
                return Pin::new(&mut this.inner).poll_write(cx, buf);
            }
        }
        this.pending.extend_from_slice(buf);
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if !this.pending.is_empty() && !this.yielded {
            this.yielded = true;
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        ready!(this.poll_drain(cx))?;
        this.yielded = false;
        Pin::new(&mut this.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        ready!(this.poll_drain(cx))?;
        Pin::new(&mut this.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::task::{Wake, Waker};

    use super::*;

    /// Records every write and flush that reaches the stream; `blocked` makes writes
    /// return `Pending` (a full socket buffer).
    #[derive(Default)]
    struct Recorder {
        writes: Vec<Vec<u8>>,
        flushes: usize,
        blocked: bool,
    }

    impl AsyncWrite for Recorder {
        fn poll_write(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            if self.blocked {
                return Poll::Pending;
            }
            self.writes.push(buf.to_vec());
            Poll::Ready(Ok(buf.len()))
        }
        fn poll_flush(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            self.flushes += 1;
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    #[derive(Default)]
    struct CountingWaker(AtomicUsize);

    impl Wake for CountingWaker {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
        fn wake_by_ref(self: &Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    fn write(s: &mut Coalesced<Recorder>, cx: &mut Context<'_>, bytes: &[u8]) -> usize {
        match Pin::new(s).poll_write(cx, bytes) {
            Poll::Ready(Ok(n)) => n,
            other => panic!("write of {} bytes: {other:?}", bytes.len()),
        }
    }

    #[test]
    fn a_flush_waits_one_turn_then_writes_everything_at_once() {
        let woken = Arc::new(CountingWaker::default());
        let waker = Waker::from(Arc::clone(&woken));
        let mut cx = Context::from_waker(&waker);
        let mut s = Coalesced::new(Recorder::default());

        assert_eq!(write(&mut s, &mut cx, b"HEADERS"), 7);
        assert!(Pin::new(&mut s).poll_flush(&mut cx).is_pending());
        assert_eq!(
            woken.0.load(Ordering::SeqCst),
            1,
            "the yield wakes its own task"
        );
        assert!(
            s.inner.writes.is_empty(),
            "nothing written before the turn ends"
        );

        assert_eq!(write(&mut s, &mut cx, b"DATA"), 4);
        assert!(matches!(
            Pin::new(&mut s).poll_flush(&mut cx),
            Poll::Ready(Ok(()))
        ));
        assert_eq!(s.inner.writes, vec![b"HEADERSDATA".to_vec()]);
        assert_eq!(s.inner.flushes, 1);

        // Nothing pending: a flush passes straight through, no yield.
        assert!(Pin::new(&mut s).poll_flush(&mut cx).is_ready());
        assert_eq!(woken.0.load(Ordering::SeqCst), 1);
        // The next burst yields once again.
        write(&mut s, &mut cx, b"PING");
        assert!(Pin::new(&mut s).poll_flush(&mut cx).is_pending());
        assert!(Pin::new(&mut s).poll_flush(&mut cx).is_ready());
        assert_eq!(s.inner.writes.last().unwrap(), b"PING");
    }

    #[test]
    fn large_writes_go_out_in_order_after_what_was_pending() {
        let waker = Waker::from(Arc::new(CountingWaker::default()));
        let mut cx = Context::from_waker(&waker);
        let mut s = Coalesced::new(Recorder::default());
        let big = vec![7u8; COALESCE_LIMIT];

        write(&mut s, &mut cx, b"small");
        assert_eq!(write(&mut s, &mut cx, &big), big.len());
        assert_eq!(s.inner.writes, vec![b"small".to_vec(), big]);
        assert!(s.pending.is_empty());
    }

    #[test]
    fn a_blocked_stream_keeps_the_bytes_until_it_drains() {
        let waker = Waker::from(Arc::new(CountingWaker::default()));
        let mut cx = Context::from_waker(&waker);
        let mut s = Coalesced::new(Recorder {
            blocked: true,
            ..Recorder::default()
        });

        write(&mut s, &mut cx, b"frame");
        assert!(Pin::new(&mut s).poll_flush(&mut cx).is_pending()); // the yield
        assert!(Pin::new(&mut s).poll_flush(&mut cx).is_pending()); // blocked
        assert!(Pin::new(&mut s).poll_shutdown(&mut cx).is_pending());
        assert_eq!(s.pending, b"frame");

        s.inner.blocked = false;
        assert!(Pin::new(&mut s).poll_shutdown(&mut cx).is_ready());
        assert_eq!(s.inner.writes, vec![b"frame".to_vec()]);
    }
}
