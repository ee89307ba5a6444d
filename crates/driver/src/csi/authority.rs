//! gRPC clients that send a unix socket's path as the HTTP/2 `:authority`.
//!
//! gRPC C-core ≥ 1.57 (Python, C++, Ruby), grpc-java and grpc-swift send the socket
//! path, percent-encoded (`%2Fvar%2Flib%2F…csi.sock`), as `:authority` on a unix
//! socket. That is not an RFC 3986 authority, and h2 (under tonic) resets such a stream
//! with PROTOCOL_ERROR before any service sees it; Go's gRPC sends `localhost`. On a
//! unix socket the authority carries nothing (the socket names the peer), so
//! [`AuthorityFix`] sits between the socket and the HTTP/2 server and, on a connection
//! whose first request carries an authority h2 would refuse, rewrites it to
//! `localhost`.
//!
//! How: the client's frames are read as they arrive. Until the first complete header
//! block, its HPACK is decoded with a table that follows the client's. If that block's
//! authority is valid, everything (that block included) goes to h2 untouched from then
//! on: clients that already behave pay one decode per connection. Otherwise every
//! header block of the connection is decoded with the client's table and re-encoded as
//! literals without indexing (h2's table stays empty, so the two never disagree), with
//! `:authority: localhost`. Other frames pass unchanged; writes to the client are not
//! touched. This module knows HTTP/2 framing and HPACK only; nothing of CSI.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::{Buf, BufMut, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The authority a refused one is replaced with.
pub const REPLACEMENT: &[u8] = b"localhost";

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const FRAME_HEADER: usize = 9;
const HEADERS: u8 = 0x1;
const CONTINUATION: u8 = 0x9;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;
const PRIORITY: u8 = 0x20;
/// The largest frame payload sent to h2: HTTP/2's initial SETTINGS_MAX_FRAME_SIZE,
/// which h2 (as tonic configures it) keeps.
const MAX_FRAME: usize = 16_384;

/// Whether h2 accepts `value` as `:authority` (the same parse it applies).
pub fn is_valid_authority(value: &[u8]) -> bool {
    http::uri::Authority::try_from(value).is_ok()
}

enum Mode {
    /// Reading frames up to the end of the first header block.
    Inspect,
    /// Every header block is re-encoded.
    Rewrite,
    /// Bytes go to h2 as they come.
    PassThrough,
}

/// A header block being collected from HEADERS + CONTINUATION frames.
struct Block {
    stream_id: u32,
    end_stream: bool,
    /// The 5 priority bytes of the HEADERS frame, if it had them.
    priority: Option<[u8; 5]>,
    fragment: Vec<u8>,
    /// The frames as received, kept only while the first block decides the
    /// connection: it goes to h2 as it came if nothing needs rewriting.
    raw: Vec<u8>,
}

/// A client connection with refused `:authority` values rewritten; see the module doc.
pub struct AuthorityFix<S> {
    inner: S,
    mode: Mode,
    /// Bytes read from the client and not yet parsed.
    input: BytesMut,
    /// Bytes ready for h2.
    output: BytesMut,
    preface_seen: bool,
    block: Option<Block>,
    decoder: loona_hpack::Decoder<'static>,
    eof: bool,
}

impl<S> AuthorityFix<S> {
    pub fn new(inner: S) -> Self {
        Self {
            inner,
            mode: Mode::Inspect,
            input: BytesMut::new(),
            output: BytesMut::new(),
            preface_seen: false,
            block: None,
            decoder: loona_hpack::Decoder::new(),
            eof: false,
        }
    }

    /// Whether this connection's header blocks are being rewritten.
    pub fn rewriting(&self) -> bool {
        matches!(self.mode, Mode::Rewrite)
    }

    /// Parse what `input` holds into `output`, frame by frame.
    fn process(&mut self) -> io::Result<()> {
        loop {
            if matches!(self.mode, Mode::PassThrough) {
                let rest = self.input.split();
                self.output.unsplit(rest);
                return Ok(());
            }
            if !self.preface_seen {
                if self.input.len() < PREFACE.len() {
                    return Ok(());
                }
                if &self.input[..PREFACE.len()] != PREFACE {
                    // Not HTTP/2 with prior knowledge: h2 says what is wrong.
                    self.mode = Mode::PassThrough;
                    continue;
                }
                let preface = self.input.split_to(PREFACE.len());
                self.output.unsplit(preface);
                self.preface_seen = true;
            }
            if self.input.len() < FRAME_HEADER {
                return Ok(());
            }
            let length = usize::from(self.input[0]) << 16
                | usize::from(self.input[1]) << 8
                | usize::from(self.input[2]);
            if self.input.len() < FRAME_HEADER + length {
                self.input.reserve(FRAME_HEADER + length - self.input.len());
                return Ok(());
            }
            let frame = self.input.split_to(FRAME_HEADER + length);
            let kind = frame[3];
            let flags = frame[4];
            let stream_id =
                u32::from_be_bytes([frame[5], frame[6], frame[7], frame[8]]) & 0x7fff_ffff;
            match (kind, self.block.as_mut()) {
                (HEADERS, None) => {
                    let mut payload = &frame[FRAME_HEADER..];
                    let mut pad = 0;
                    if flags & PADDED != 0 {
                        let Some((&n, rest)) = payload.split_first() else {
                            return Err(protocol("HEADERS frame too short for its padding"));
                        };
                        pad = usize::from(n);
                        payload = rest;
                    }
                    let mut priority = None;
                    if flags & PRIORITY != 0 {
                        if payload.len() < 5 {
                            return Err(protocol("HEADERS frame too short for its priority"));
                        }
                        priority = Some(payload[..5].try_into().expect("5 bytes"));
                        payload = &payload[5..];
                    }
                    if payload.len() < pad {
                        return Err(protocol("HEADERS padding longer than the frame"));
                    }
                    self.block = Some(Block {
                        stream_id,
                        end_stream: flags & END_STREAM != 0,
                        priority,
                        fragment: payload[..payload.len() - pad].to_vec(),
                        raw: if matches!(self.mode, Mode::Inspect) {
                            frame.to_vec()
                        } else {
                            Vec::new()
                        },
                    });
                }
                (CONTINUATION, Some(block)) if block.stream_id == stream_id => {
                    block.fragment.extend_from_slice(&frame[FRAME_HEADER..]);
                    if matches!(self.mode, Mode::Inspect) {
                        block.raw.extend_from_slice(&frame);
                    }
                }
                (_, Some(_)) => {
                    return Err(protocol(
                        "a header block interrupted by another frame (RFC 9113 §6.10)",
                    ));
                }
                _ => {
                    self.output.unsplit(frame);
                    continue;
                }
            }
            if flags & END_HEADERS != 0 {
                let block = self.block.take().expect("a block is being collected");
                self.finish(block)?;
            }
        }
    }

    /// A complete header block: decide (first block), then forward or re-encode.
    fn finish(&mut self, block: Block) -> io::Result<()> {
        let decoded = self.decoder.decode(&block.fragment);
        let mut fields = match decoded {
            Ok(fields) => fields,
            Err(e) if matches!(self.mode, Mode::Inspect) => {
                // h2 decodes the same bytes and answers with the right error.
                tracing::debug!(error = ?e, "undecodable first header block; passing through");
                self.output.extend_from_slice(&block.raw);
                self.mode = Mode::PassThrough;
                return Ok(());
            }
            Err(e) => return Err(protocol(&format!("HPACK: {e:?}"))),
        };
        if matches!(self.mode, Mode::Inspect) {
            let refused = fields
                .iter()
                .any(|(name, value)| name == b":authority" && !is_valid_authority(value));
            if !refused {
                self.output.extend_from_slice(&block.raw);
                self.mode = Mode::PassThrough;
                return Ok(());
            }
            tracing::debug!(
                "client sends a socket path as :authority; rewriting it to localhost on this connection"
            );
            self.mode = Mode::Rewrite;
        }
        for (name, value) in &mut fields {
            if name.as_slice() == b":authority" && !is_valid_authority(value) {
                *value = REPLACEMENT.to_vec();
            }
        }
        let mut encoded = Vec::with_capacity(block.fragment.len() + 64);
        for (name, value) in &fields {
            encode_literal(&mut encoded, name, value);
        }
        write_block(&mut self.output, &block, &encoded);
        Ok(())
    }
}

fn protocol(what: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("HTTP/2 from the client: {what}"),
    )
}

/// RFC 7541 §6.2.2: a literal field without indexing, with a literal name, no Huffman.
fn encode_literal(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    use loona_hpack::encoder::encode_integer_into;
    out.push(0x00);
    for string in [name, value] {
        encode_integer_into(string.len(), 7, 0, out).expect("writing to a Vec");
        out.extend_from_slice(string);
    }
}

/// One HEADERS frame (priority kept, padding dropped), CONTINUATION frames for the rest.
fn write_block(out: &mut BytesMut, block: &Block, encoded: &[u8]) {
    let mut rest = encoded;
    let mut first = true;
    loop {
        let room = if first && block.priority.is_some() {
            MAX_FRAME - 5
        } else {
            MAX_FRAME
        };
        let take = rest.len().min(room);
        let (chunk, tail) = rest.split_at(take);
        rest = tail;
        let mut flags = if rest.is_empty() { END_HEADERS } else { 0 };
        let (kind, extra) = if first {
            if block.end_stream {
                flags |= END_STREAM;
            }
            if block.priority.is_some() {
                flags |= PRIORITY;
            }
            (HEADERS, block.priority.as_ref().map_or(&[][..], |p| &p[..]))
        } else {
            (CONTINUATION, &[][..])
        };
        let length = chunk.len() + extra.len();
        out.put_uint(length as u64, 3);
        out.put_u8(kind);
        out.put_u8(flags);
        out.put_u32(block.stream_id);
        out.extend_from_slice(extra);
        out.extend_from_slice(chunk);
        first = false;
        if rest.is_empty() {
            return;
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for AuthorityFix<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        loop {
            if !this.output.is_empty() {
                let n = this.output.len().min(buf.remaining());
                buf.put_slice(&this.output[..n]);
                this.output.advance(n);
                return Poll::Ready(Ok(()));
            }
            if this.eof {
                return Poll::Ready(Ok(()));
            }
            if matches!(this.mode, Mode::PassThrough) && this.input.is_empty() {
                // Decided and drained: read straight into the caller's buffer.
                return Pin::new(&mut this.inner).poll_read(cx, buf);
            }
            let mut chunk = [0u8; 8192];
            let mut read = ReadBuf::new(&mut chunk);
            ready!(Pin::new(&mut this.inner).poll_read(cx, &mut read))?;
            if read.filled().is_empty() {
                this.eof = true;
                // What is left unparsed goes as it is; h2 reports a truncated frame.
                let rest = this.input.split();
                this.output.unsplit(rest);
                continue;
            }
            this.input.extend_from_slice(read.filled());
            this.process()?;
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for AuthorityFix<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

impl<S: tonic::transport::server::Connected> tonic::transport::server::Connected
    for AuthorityFix<S>
{
    type ConnectInfo = S::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A client's bytes: preface, SETTINGS, then header blocks HPACK-encoded by
    /// `encoder` (which indexes, so later blocks refer to the table).
    /// A header list as the client's encoder takes it.
    type Fields = Vec<(&'static [u8], &'static [u8])>;

    fn client_bytes(blocks: &[(u32, Fields)], split_at: Option<usize>) -> Vec<u8> {
        let mut out = PREFACE.to_vec();
        out.extend_from_slice(&[0, 0, 0, 0x4, 0, 0, 0, 0, 0]); // empty SETTINGS
        let mut encoder = loona_hpack::Encoder::new();
        for (stream, fields) in blocks {
            let encoded = encoder.encode(fields.iter().copied());
            let (first, rest) =
                encoded.split_at(split_at.unwrap_or(encoded.len()).min(encoded.len()));
            let header = |out: &mut Vec<u8>, len: usize, kind: u8, flags: u8| {
                out.extend_from_slice(&(len as u32).to_be_bytes()[1..]);
                out.push(kind);
                out.push(flags);
                out.extend_from_slice(&stream.to_be_bytes());
            };
            let last = if rest.is_empty() { END_HEADERS } else { 0 };
            header(&mut out, first.len(), HEADERS, last);
            out.extend_from_slice(first);
            if !rest.is_empty() {
                header(&mut out, rest.len(), CONTINUATION, END_HEADERS);
                out.extend_from_slice(rest);
            }
            // A DATA frame between blocks.
            header(&mut out, 1, 0x0, END_STREAM);
            out.push(0);
        }
        out
    }

    /// What h2 would receive: the header blocks decoded with a fresh table.
    fn server_blocks(bytes: &[u8]) -> Vec<Vec<(Vec<u8>, Vec<u8>)>> {
        assert_eq!(&bytes[..PREFACE.len()], PREFACE);
        let mut rest = &bytes[PREFACE.len()..];
        let mut decoder = loona_hpack::Decoder::new();
        let mut blocks = Vec::new();
        let mut fragment = Vec::new();
        while !rest.is_empty() {
            let len = usize::from(rest[0]) << 16 | usize::from(rest[1]) << 8 | usize::from(rest[2]);
            let (kind, flags) = (rest[3], rest[4]);
            if kind == HEADERS || kind == CONTINUATION {
                fragment.extend_from_slice(&rest[9..9 + len]);
                if flags & END_HEADERS != 0 {
                    blocks.push(decoder.decode(&fragment).unwrap());
                    fragment.clear();
                }
            }
            rest = &rest[9 + len..];
        }
        blocks
    }

    async fn through_fix(bytes: Vec<u8>, chunk: usize) -> (Vec<u8>, bool) {
        let (mut client, server) = tokio::io::duplex(1 << 20);
        let writer = tokio::spawn(async move {
            for piece in bytes.chunks(chunk) {
                client.write_all(piece).await.unwrap();
            }
            client.shutdown().await.unwrap();
            client
        });
        let mut fix = AuthorityFix::new(server);
        let mut out = Vec::new();
        fix.read_to_end(&mut out).await.unwrap();
        drop(writer.await.unwrap());
        (out, fix.rewriting())
    }

    fn request(authority: &'static [u8]) -> Fields {
        vec![
            (b":method", b"POST"),
            (b":scheme", b"http"),
            (b":path", b"/csi.v1.Identity/Probe"),
            (b":authority", authority),
            (b"content-type", b"application/grpc"),
            (b"te", b"trailers"),
        ]
    }

    #[test]
    fn the_check_is_h2s() {
        assert!(is_valid_authority(b"localhost"));
        assert!(is_valid_authority(b"127.0.0.1:10000"));
        assert!(!is_valid_authority(b"%2Fvar%2Flib%2Fkubelet%2Fcsi.sock"));
        assert!(!is_valid_authority(b"/var/lib/kubelet/csi.sock"));
    }

    #[tokio::test]
    async fn a_socket_path_authority_becomes_localhost_on_every_request() {
        let path: &[u8] = b"%2Fvar%2Flib%2Fkubelet%2Fplugins%2Fstowage.csi.dev%2Fcsi.sock";
        // Three requests; the later ones refer to the client's table for :authority.
        let blocks = vec![(1, request(path)), (3, request(path)), (5, request(path))];
        for (split, chunk) in [(None, 1), (Some(7), 5), (None, 4096)] {
            let (out, rewriting) = through_fix(client_bytes(&blocks, split), chunk).await;
            assert!(rewriting);
            let seen = server_blocks(&out);
            assert_eq!(seen.len(), 3);
            for block in &seen {
                let authority = block.iter().find(|(n, _)| n == b":authority").unwrap();
                assert_eq!(authority.1, REPLACEMENT);
                let path = block.iter().find(|(n, _)| n == b":path").unwrap();
                assert_eq!(path.1, b"/csi.v1.Identity/Probe");
                assert_eq!(block.len(), 6);
            }
        }
    }

    #[tokio::test]
    async fn a_valid_authority_passes_byte_for_byte() {
        let blocks = vec![(1, request(b"localhost")), (3, request(b"%2Fx.sock"))];
        let bytes = client_bytes(&blocks, Some(3));
        let (out, rewriting) = through_fix(bytes.clone(), 3).await;
        assert!(!rewriting, "decided on the first request");
        assert_eq!(out, bytes);
    }

    #[tokio::test]
    async fn a_long_header_block_is_split_into_continuations() {
        let long = vec![b'x'; 40_000];
        let long: &'static [u8] = Box::leak(long.into_boxed_slice());
        let mut fields = request(b"%2Fs.sock");
        fields.push((b"x-long", long));
        let (out, _) = through_fix(client_bytes(&[(1, fields)], None), 8192).await;
        let seen = server_blocks(&out);
        assert_eq!(
            seen[0]
                .iter()
                .find(|(n, _)| n == b"x-long")
                .unwrap()
                .1
                .len(),
            40_000
        );
    }
}
