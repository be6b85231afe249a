//! The async NBD client: the assemblers that collect one request's reply chunks into its
//! result, and [`NbdClient`], which connects, drives the handshake, pipelines reads and
//! block status queries, and only moves bytes between the socket and the pure functions of
//! `wire.rs`.

use bytes::{Bytes, BytesMut};
use std::collections::HashMap;
use std::fmt;
use std::ops::Range;
use std::path::Path;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

use super::wire::{
    CHUNK_HEADER_REST_BYTES, Chunk, ChunkHeader, DEFAULT_READ_REQUEST_BYTES, DEFAULT_WINDOW,
    Extent, GREETING_BYTES, Info, MAX_READ_REQUEST_BYTES, MAX_STATUS_REQUEST_BYTES,
    NBD_CMD_BLOCK_STATUS, NBD_CMD_DISC, NBD_CMD_FLUSH, NBD_CMD_READ, NBD_CMD_WRITE,
    NBD_FLAG_C_FIXED_NEWSTYLE, NBD_FLAG_C_NO_ZEROES, NBD_FLAG_NO_ZEROES, NBD_FLAG_READ_ONLY,
    NBD_FLAG_SEND_FLUSH, NBD_INFO_BLOCK_SIZE, NBD_OPT_GO, NBD_OPT_SET_META_CONTEXT,
    NBD_OPT_STRUCTURED_REPLY, NBD_REPLY_TYPE_OFFSET_DATA, NbdError, OPTION_REPLY_HEADER_BYTES,
    OptionReply, ReplyKind, Request, SIMPLE_REPLY_REST_BYTES, check_data_chunk, encode_go,
    encode_option, encode_request, encode_set_meta_context, option_name, parse_chunk,
    parse_chunk_header, parse_greeting, parse_option_reply, parse_option_reply_header,
    parse_reply_magic, parse_simple_reply, protocol, rep_error_name,
};

// ---------------------------------------------------------------------------------------------
// Assemblers: a request's chunks in, its result out.
// ---------------------------------------------------------------------------------------------

/// Collects the chunks of one read into its buffer.
///
/// # Guarantees
/// `finish` succeeds only if the chunks covered every byte of the request exactly once (or
/// the request was answered by one simple reply), so a server that forgets a range cannot
/// make the client return zeros it never sent.
#[derive(Debug)]
pub struct ReadAssembly {
    req: Request,
    buf: BytesMut,
    covered: Vec<Range<u64>>,
    error: Option<NbdError>,
    simple: bool,
}

impl ReadAssembly {
    /// A zero-filled buffer for `req`.
    pub fn new(req: Request) -> Self {
        Self::with_buffer(req, BytesMut::zeroed(req.len as usize))
    }

    /// Fill `buf` (zeroed, `req.len` bytes: a slice of a larger read's buffer).
    pub fn with_buffer(req: Request, buf: BytesMut) -> Self {
        debug_assert_eq!(buf.len(), req.len as usize);
        Self {
            req,
            buf,
            covered: Vec::new(),
            error: None,
            simple: false,
        }
    }

    /// The request.
    pub fn request(&self) -> &Request {
        &self.req
    }

    /// The part of the buffer a data chunk fills (after [`check_data_chunk`]); marks it covered.
    pub fn data_slot(&mut self, range: Range<usize>) -> &mut [u8] {
        let start = self.req.offset + range.start as u64;
        self.covered
            .push(start..start + (range.end - range.start) as u64);
        &mut self.buf[range]
    }

    /// The whole buffer, for a simple reply's data.
    pub fn simple_slot(&mut self) -> &mut [u8] {
        self.simple = true;
        &mut self.buf[..]
    }

    /// Record a server error for this request.
    pub fn fail(&mut self, errno: u32, message: String) {
        if self.error.is_none() {
            self.error = Some(self.req.error(errno, message));
        }
    }

    /// Take one parsed chunk.
    pub fn push(&mut self, chunk: Chunk) -> Result<(), NbdError> {
        match chunk {
            Chunk::None => {}
            Chunk::Data { offset, data } => {
                let range =
                    check_data_chunk(&self.req, (data.len() as u32).saturating_add(8), offset)?;
                self.data_slot(range).copy_from_slice(&data);
            }
            Chunk::Hole(range) => self.covered.push(range),
            Chunk::Error { errno, message, .. } => self.fail(errno, message),
            Chunk::Status { .. } => return Err(protocol("BLOCK_STATUS chunk in reply to read")),
        }
        Ok(())
    }

    /// The data, once the final chunk arrived.
    pub fn finish(self) -> Result<Bytes, NbdError> {
        self.finish_mut().map(BytesMut::freeze)
    }

    /// Like [`ReadAssembly::finish`], keeping the buffer mutable (to be `unsplit`).
    pub fn finish_mut(mut self) -> Result<BytesMut, NbdError> {
        if let Some(e) = self.error {
            return Err(e);
        }
        if !self.simple {
            self.covered.sort_by_key(|r| r.start);
            let mut at = self.req.offset;
            for r in &self.covered {
                if r.start != at {
                    return Err(protocol(format!(
                        "read reply chunks {} at {at} (request {}..{})",
                        if r.start < at {
                            "overlap"
                        } else {
                            "leave a gap"
                        },
                        self.req.offset,
                        self.req.end()
                    )));
                }
                at = r.end;
            }
            if at != self.req.end() {
                return Err(protocol(format!(
                    "read reply chunks end at {at}, short of the request's end {}",
                    self.req.end()
                )));
            }
        }
        Ok(self.buf)
    }
}

/// Collects the chunks of one block status request for one context.
#[derive(Debug)]
pub struct StatusAssembly {
    req: Request,
    context: u32,
    known: Vec<u32>,
    extents: Option<Vec<Extent>>,
    error: Option<NbdError>,
}

impl StatusAssembly {
    /// Expect `context` among the negotiated `known` ids.
    pub fn new(req: Request, context: u32, known: Vec<u32>) -> Self {
        Self {
            req,
            context,
            known,
            extents: None,
            error: None,
        }
    }

    /// Record a server error for this request.
    pub fn fail(&mut self, errno: u32, message: String) {
        if self.error.is_none() {
            self.error = Some(self.req.error(errno, message));
        }
    }

    /// Take one parsed chunk.
    pub fn push(&mut self, chunk: Chunk) -> Result<(), NbdError> {
        match chunk {
            Chunk::None => {}
            Chunk::Status { context, extents } => {
                if !self.known.contains(&context) {
                    return Err(protocol(format!(
                        "BLOCK_STATUS for context {context}, which was never negotiated"
                    )));
                }
                if context == self.context {
                    if self.extents.is_some() {
                        return Err(protocol(format!(
                            "two BLOCK_STATUS chunks for context {context}"
                        )));
                    }
                    self.extents = Some(extents);
                }
            }
            Chunk::Error { errno, message, .. } => self.fail(errno, message),
            Chunk::Data { .. } | Chunk::Hole(_) => {
                return Err(protocol("read data chunk in reply to block status"));
            }
        }
        Ok(())
    }

    /// The extents from the request's offset, clipped to its end, once the final chunk arrived.
    pub fn finish(self) -> Result<Vec<Extent>, NbdError> {
        if let Some(e) = self.error {
            return Err(e);
        }
        let mut extents = self.extents.ok_or_else(|| {
            protocol(format!(
                "block status reply without context {}",
                self.context
            ))
        })?;
        let end = self.req.end();
        // NB: the final extent may run past the request (the spec allows it); clip it.
        if let Some(last) = extents.last_mut() {
            last.range.end = last.range.end.min(end);
        }
        Ok(extents)
    }
}

/// Collects the reply to a request that returns no data (a write, a flush).
///
/// # Guarantees
/// `finish` succeeds only if the server said so without error: a data, hole or block status
/// chunk in reply is a protocol error, never taken as success.
#[derive(Debug)]
pub struct AckAssembly {
    req: Request,
    error: Option<NbdError>,
}

impl AckAssembly {
    /// Expect the reply to `req`.
    pub fn new(req: Request) -> Self {
        Self { req, error: None }
    }

    /// Record a server error for this request.
    pub fn fail(&mut self, errno: u32, message: String) {
        if self.error.is_none() {
            self.error = Some(self.req.error(errno, message));
        }
    }

    /// Take one parsed chunk.
    pub fn push(&mut self, chunk: Chunk) -> Result<(), NbdError> {
        match chunk {
            Chunk::None => Ok(()),
            Chunk::Error { errno, message, .. } => {
                self.fail(errno, message);
                Ok(())
            }
            Chunk::Data { .. } | Chunk::Hole(_) | Chunk::Status { .. } => Err(protocol(format!(
                "data or block status chunk in reply to a {}",
                self.req.name()
            ))),
        }
    }

    /// Success, or the server's error.
    pub fn finish(self) -> Result<(), NbdError> {
        match self.error {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

/// Merge adjacent extents with equal flags.
pub fn coalesce(extents: impl IntoIterator<Item = Extent>) -> Vec<Extent> {
    let mut out: Vec<Extent> = Vec::new();
    for e in extents {
        match out.last_mut() {
            Some(last) if last.range.end == e.range.start && last.flags == e.flags => {
                last.range.end = e.range.end
            }
            _ => out.push(e),
        }
    }
    out
}

// ---------------------------------------------------------------------------------------------
// The async client.
// ---------------------------------------------------------------------------------------------

/// What the handshake agreed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Negotiated {
    /// The export's size in bytes.
    pub size: u64,
    /// Its transmission flags.
    pub flags: u16,
    /// The selected meta contexts: name and id.
    pub contexts: Vec<(String, u32)>,
    /// The largest read request to send.
    pub max_read_bytes: u32,
}

enum Pending {
    Read(ReadAssembly),
    Status(StatusAssembly),
    Ack(AckAssembly),
}

/// An NBD connection to one export, over a unix socket (or any byte stream in tests).
///
/// # Guarantees
/// - Requests of one call may be pipelined (up to `window` in flight), replies are matched by
///   handle, and every reply is checked against its request.
/// - After an error that leaves the stream out of step (I/O, timeout, protocol violation, a
///   cancelled call) the client refuses further calls ([`NbdClient::is_broken`]); reconnect.
pub struct NbdClient<S = UnixStream> {
    stream: BufReader<S>,
    export: String,
    negotiated: Negotiated,
    next_handle: u64,
    read_request_bytes: u32,
    window: usize,
    timeout: Duration,
    broken: bool,
}

impl<S> fmt::Debug for NbdClient<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NbdClient")
            .field("export", &self.export)
            .field("negotiated", &self.negotiated)
            .field("broken", &self.broken)
            .finish_non_exhaustive()
    }
}

impl NbdClient<UnixStream> {
    /// Connect to `export` on the server at `socket` and select `contexts`.
    pub async fn connect_unix(
        socket: &Path,
        export: &str,
        contexts: &[String],
        timeout: Duration,
    ) -> Result<Self, NbdError> {
        let stream = tokio::time::timeout(timeout, UnixStream::connect(socket))
            .await
            .map_err(|_| NbdError::Timeout(timeout))?
            .map_err(|source| NbdError::Connect {
                socket: socket.to_owned(),
                source,
            })?;
        Self::handshake(stream, export, contexts, timeout).await
    }
}

async fn within<T>(
    timeout: Duration,
    fut: impl Future<Output = Result<T, NbdError>>,
) -> Result<T, NbdError> {
    tokio::time::timeout(timeout, fut)
        .await
        .map_err(|_| NbdError::Timeout(timeout))?
}

impl<S: AsyncRead + AsyncWrite + Unpin + Send> NbdClient<S> {
    /// Run the handshake on `stream`: structured replies, `contexts`, then `NBD_OPT_GO`.
    pub async fn handshake(
        stream: S,
        export: &str,
        contexts: &[String],
        timeout: Duration,
    ) -> Result<Self, NbdError> {
        let mut stream = BufReader::new(stream);
        let negotiated = within(timeout, negotiate(&mut stream, export, contexts)).await?;
        Ok(Self {
            stream,
            export: export.to_owned(),
            next_handle: 1,
            read_request_bytes: DEFAULT_READ_REQUEST_BYTES.min(negotiated.max_read_bytes),
            window: DEFAULT_WINDOW,
            timeout,
            broken: false,
            negotiated,
        })
    }

    /// What the handshake agreed.
    pub fn negotiated(&self) -> &Negotiated {
        &self.negotiated
    }

    /// The export's size in bytes.
    pub fn size(&self) -> u64 {
        self.negotiated.size
    }

    /// Whether an earlier failure left the connection unusable.
    pub fn is_broken(&self) -> bool {
        self.broken
    }

    /// Set how many requests one call keeps in flight (at least 1).
    pub fn set_window(&mut self, window: usize) {
        self.window = window.max(1);
    }

    /// Set the size reads are split into (capped by what the server accepts, at least 512
    /// bytes; default [`DEFAULT_READ_REQUEST_BYTES`]).
    pub fn set_read_request_bytes(&mut self, bytes: u32) {
        self.read_request_bytes = bytes.clamp(512, self.negotiated.max_read_bytes.max(512));
    }

    /// The id of a negotiated meta context.
    pub fn context_id(&self, name: &str) -> Option<u32> {
        self.negotiated
            .contexts
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, id)| *id)
    }

    fn check_range(&self, offset: u64, len: u64) -> Result<(), NbdError> {
        match offset.checked_add(len) {
            Some(end) if end <= self.size() => Ok(()),
            _ => Err(NbdError::Invalid(format!(
                "{offset}+{len} is past the end {} of export {:?}",
                self.size(),
                self.export
            ))),
        }
    }

    fn guard(&self) -> Result<(), NbdError> {
        if self.broken {
            return Err(protocol(format!(
                "the connection to export {:?} broke earlier; reconnect",
                self.export
            )));
        }
        Ok(())
    }

    /// Read `len` bytes at `offset`; holes come back as zeros.
    pub async fn read(&mut self, offset: u64, len: u64) -> Result<Bytes, NbdError> {
        let mut data = self.read_many(&[(offset, len)]).await?;
        data.pop()
            .ok_or_else(|| protocol("read finished without data"))
    }

    /// Read each of `ranges` (`(offset, len)`), all their requests pipelined (up to the
    /// window in flight): scattered blocks cost about one round trip per window, not one
    /// each. The data of each range, in order.
    pub async fn read_many(&mut self, ranges: &[(u64, u64)]) -> Result<Vec<Bytes>, NbdError> {
        self.guard()?;
        for &(offset, len) in ranges {
            self.check_range(offset, len)?;
            usize::try_from(len)
                .map_err(|_| NbdError::Invalid(format!("{len} bytes do not fit memory")))?;
        }
        let step = u64::from(self.read_request_bytes.max(1));
        let mut requests = Vec::new();
        // NB: one zeroed buffer per range, split into one piece per request; the pieces are
        // unsplit back in order without copying, so data lands exactly once, straight from
        // the socket. Each starts on a page boundary, so that a store may write the data with
        // direct I/O.
        let mut buffers = std::collections::VecDeque::new();
        // How many requests each range has.
        let mut counts = Vec::with_capacity(ranges.len());
        for &(offset, len) in ranges {
            let mut whole = lifeboat_store::aligned_buffer(len as usize);
            let mut at = offset;
            let first = requests.len();
            while at < offset + len {
                // NB: at most max_read_bytes, which is a u32.
                let n = (offset + len - at).min(step) as u32;
                requests.push(Request {
                    command: NBD_CMD_READ,
                    offset: at,
                    len: n,
                });
                buffers.push_back(whole.split_to(n as usize));
                at += u64::from(n);
            }
            counts.push(requests.len() - first);
        }
        self.broken = true;
        let mut results: Vec<Option<BytesMut>> = vec![None; requests.len()];
        let outcome = self
            .run(
                &requests,
                &[],
                |req, _| {
                    Pending::Read(ReadAssembly::with_buffer(
                        *req,
                        buffers.pop_front().unwrap_or_default(),
                    ))
                },
                &mut results,
            )
            .await;
        self.settle(&outcome);
        outcome?;
        let mut parts = results.into_iter();
        let mut out = Vec::with_capacity(ranges.len());
        for count in counts {
            let mut data = BytesMut::new();
            for part in parts.by_ref().take(count) {
                let part = part.ok_or_else(|| protocol("read finished without data"))?;
                if data.is_empty() {
                    data = part;
                } else {
                    data.unsplit(part);
                }
            }
            out.push(data.freeze());
        }
        Ok(out)
    }

    /// Write each of `writes` (`(offset, data)`), all their requests pipelined (up to the
    /// window in flight). Complete, not yet durable, when it returns ([`NbdClient::flush`]).
    pub async fn write_many(&mut self, writes: &[(u64, Bytes)]) -> Result<(), NbdError> {
        self.guard()?;
        if !self.is_writable() {
            return Err(NbdError::Invalid(format!(
                "export {:?} is read-only",
                self.export
            )));
        }
        let step = u64::from(self.negotiated.max_read_bytes.max(512));
        let mut requests = Vec::new();
        let mut payloads = Vec::new();
        for (offset, data) in writes {
            let len = data.len() as u64;
            self.check_range(*offset, len)?;
            let mut at = 0;
            while at < len {
                let n = (len - at).min(step);
                requests.push(Request {
                    command: NBD_CMD_WRITE,
                    offset: offset + at,
                    // NB: at most max_read_bytes, which is a u32.
                    len: n as u32,
                });
                payloads.push(data.slice(at as usize..(at + n) as usize));
                at += n;
            }
        }
        self.acknowledged(&requests, &payloads).await
    }

    /// The block status of `context` over `offset..offset+len`, as extents covering the whole
    /// range (adjacent extents with equal flags merged).
    pub async fn block_status(
        &mut self,
        context: &str,
        offset: u64,
        len: u64,
    ) -> Result<Vec<Extent>, NbdError> {
        self.guard()?;
        self.check_range(offset, len)?;
        let id = self.context_id(context).ok_or_else(|| {
            NbdError::Invalid(format!(
                "meta context {context:?} was not negotiated on export {:?}",
                self.export
            ))
        })?;
        let known: Vec<u32> = self.negotiated.contexts.iter().map(|(_, id)| *id).collect();
        let mut extents = Vec::new();
        let mut at = offset;
        while at < offset + len {
            // NB: at most 2 GiB, which fits the u32.
            let n = (offset + len - at).min(u64::from(MAX_STATUS_REQUEST_BYTES)) as u32;
            let req = Request {
                command: NBD_CMD_BLOCK_STATUS,
                offset: at,
                len: n,
            };
            self.broken = true;
            let mut result: Vec<Option<Vec<Extent>>> = vec![None];
            let outcome = self
                .run(
                    &[req],
                    &[],
                    |req, _| Pending::Status(StatusAssembly::new(*req, id, known.clone())),
                    &mut result,
                )
                .await;
            self.settle(&outcome);
            outcome?;
            let got = result
                .pop()
                .flatten()
                .ok_or_else(|| protocol("block status finished without extents"))?;
            let end = got.last().map(|e| e.range.end).unwrap_or(at);
            if end <= at {
                return Err(protocol("block status reply made no progress"));
            }
            extents.extend(got);
            at = end;
        }
        Ok(coalesce(extents))
    }

    /// Whether the export accepts writes.
    pub fn is_writable(&self) -> bool {
        self.negotiated.flags & NBD_FLAG_READ_ONLY == 0
    }

    /// Write `data` at `offset`, split into requests the server accepts, pipelined. The
    /// writes are complete (not yet durable: see [`NbdClient::flush`]) when it returns.
    pub async fn write(&mut self, offset: u64, data: Bytes) -> Result<(), NbdError> {
        self.write_many(&[(offset, data)]).await
    }

    /// Make every completed write durable on the server's storage (a no-op when the server
    /// says it needs no flush).
    pub async fn flush(&mut self) -> Result<(), NbdError> {
        self.guard()?;
        if self.negotiated.flags & NBD_FLAG_SEND_FLUSH == 0 {
            return Ok(());
        }
        let req = Request {
            command: NBD_CMD_FLUSH,
            offset: 0,
            len: 0,
        };
        self.acknowledged(&[req], &[]).await
    }

    async fn acknowledged(
        &mut self,
        requests: &[Request],
        payloads: &[Bytes],
    ) -> Result<(), NbdError> {
        self.broken = true;
        let mut results: Vec<Option<()>> = vec![None; requests.len()];
        let outcome = self
            .run(
                requests,
                payloads,
                |req, _| Pending::Ack(AckAssembly::new(*req)),
                &mut results,
            )
            .await;
        self.settle(&outcome);
        outcome
    }

    /// Say goodbye (`NBD_CMD_DISC`) and close the write side.
    pub async fn disconnect(mut self) -> Result<(), NbdError> {
        let handle = self.next_handle;
        let req = encode_request(0, NBD_CMD_DISC, handle, 0, 0);
        let stream = self.stream.get_mut();
        within(self.timeout, async {
            stream.write_all(&req).await?;
            stream.flush().await?;
            stream.shutdown().await?;
            Ok(())
        })
        .await
    }

    fn settle<T>(&mut self, outcome: &Result<T, NbdError>) {
        self.broken = match outcome {
            Ok(_) => false,
            Err(e) => !e.keeps_connection(),
        };
    }

    /// Send `requests` (up to `window` in flight), each followed by its payload when
    /// `payloads` has one (writes), and collect their results in order.
    async fn run<T: FromPending>(
        &mut self,
        requests: &[Request],
        payloads: &[Bytes],
        mut start: impl FnMut(&Request, usize) -> Pending,
        results: &mut [Option<T>],
    ) -> Result<(), NbdError> {
        let mut inflight: HashMap<u64, (usize, Pending)> = HashMap::new();
        let mut next = 0;
        let mut first_error: Option<NbdError> = None;
        loop {
            // Keep the window full, unless a request already failed.
            while first_error.is_none() && next < requests.len() && inflight.len() < self.window {
                let req = &requests[next];
                let handle = self.next_handle;
                self.next_handle = self.next_handle.wrapping_add(1);
                let bytes = encode_request(0, req.command, handle, req.offset, req.len);
                let payload = payloads.get(next);
                let stream = self.stream.get_mut();
                within(self.timeout, async {
                    stream.write_all(&bytes).await?;
                    if let Some(payload) = payload {
                        stream.write_all(payload).await?;
                    }
                    Ok(())
                })
                .await?;
                inflight.insert(handle, (next, start(req, next)));
                next += 1;
            }
            if inflight.is_empty() {
                break;
            }
            within(self.timeout, async {
                Ok(self.stream.get_mut().flush().await?)
            })
            .await?;
            if let Some((index, pending)) =
                within(self.timeout, receive(&mut self.stream, &mut inflight)).await?
            {
                match T::finish(pending) {
                    Ok(value) => results[index] = Some(value),
                    Err(e) if e.keeps_connection() => {
                        first_error.get_or_insert(e);
                    }
                    Err(e) => return Err(e),
                }
            }
        }
        match first_error {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

trait FromPending: Sized {
    fn finish(pending: Pending) -> Result<Self, NbdError>;
}

impl FromPending for BytesMut {
    fn finish(pending: Pending) -> Result<Self, NbdError> {
        match pending {
            Pending::Read(r) => r.finish_mut(),
            _ => Err(protocol("another request finished as a read")),
        }
    }
}

impl FromPending for Vec<Extent> {
    fn finish(pending: Pending) -> Result<Self, NbdError> {
        match pending {
            Pending::Status(s) => s.finish(),
            _ => Err(protocol("another request finished as a block status")),
        }
    }
}

impl FromPending for () {
    fn finish(pending: Pending) -> Result<Self, NbdError> {
        match pending {
            Pending::Ack(a) => a.finish(),
            _ => Err(protocol("a read or block status finished as a write")),
        }
    }
}

/// Read one reply unit (a simple reply or one chunk) and route it; return the request it
/// completed, if any.
async fn receive<S: AsyncRead + Unpin>(
    stream: &mut BufReader<S>,
    inflight: &mut HashMap<u64, (usize, Pending)>,
) -> Result<Option<(usize, Pending)>, NbdError> {
    let mut magic = [0u8; 4];
    stream.read_exact(&mut magic).await?;
    match parse_reply_magic(magic)? {
        ReplyKind::Simple => {
            let mut rest = [0u8; SIMPLE_REPLY_REST_BYTES];
            stream.read_exact(&mut rest).await?;
            let reply = parse_simple_reply(&rest);
            let (index, mut pending) = inflight.remove(&reply.handle).ok_or_else(|| {
                protocol(format!("simple reply for unknown handle {}", reply.handle))
            })?;
            match &mut pending {
                Pending::Read(r) if reply.errno == 0 => {
                    stream.read_exact(r.simple_slot()).await.map(|_| ())?
                }
                Pending::Read(r) => r.fail(reply.errno, String::new()),
                Pending::Status(s) if reply.errno != 0 => s.fail(reply.errno, String::new()),
                Pending::Status(_) => return Err(protocol("simple success reply to block status")),
                Pending::Ack(a) if reply.errno != 0 => a.fail(reply.errno, String::new()),
                Pending::Ack(_) => {}
            }
            Ok(Some((index, pending)))
        }
        ReplyKind::Chunk => {
            let mut rest = [0u8; CHUNK_HEADER_REST_BYTES];
            stream.read_exact(&mut rest).await?;
            let header = parse_chunk_header(&rest);
            let (_, pending) = inflight
                .get_mut(&header.handle)
                .ok_or_else(|| protocol(format!("chunk for unknown handle {}", header.handle)))?;
            match pending {
                Pending::Read(r) if header.ty == NBD_REPLY_TYPE_OFFSET_DATA => {
                    // NB: data goes straight from the socket into the request's buffer, after
                    // its offset was checked: no copy, no allocation sized by the server.
                    let mut off = [0u8; 8];
                    if header.len < 8 {
                        return Err(protocol("OFFSET_DATA chunk shorter than its offset"));
                    }
                    stream.read_exact(&mut off).await?;
                    let range = check_data_chunk(r.request(), header.len, u64::from_be_bytes(off))?;
                    stream.read_exact(r.data_slot(range)).await?;
                }
                Pending::Read(r) => {
                    let payload = read_payload(stream, &header, r.request()).await?;
                    r.push(parse_chunk(&header, payload, r.request())?)?;
                }
                Pending::Status(s) => {
                    let payload = read_payload(stream, &header, &s.req).await?;
                    let chunk = parse_chunk(&header, payload, &s.req)?;
                    s.push(chunk)?;
                }
                Pending::Ack(a) => {
                    let payload = read_payload(stream, &header, &a.req).await?;
                    let chunk = parse_chunk(&header, payload, &a.req)?;
                    a.push(chunk)?;
                }
            }
            if header.done() {
                return Ok(inflight.remove(&header.handle));
            }
            Ok(None)
        }
    }
}

async fn read_payload<S: AsyncRead + Unpin>(
    stream: &mut BufReader<S>,
    header: &ChunkHeader,
    req: &Request,
) -> Result<Bytes, NbdError> {
    if header.len > req.max_chunk_payload() {
        return Err(protocol(format!(
            "chunk of {} bytes (type {}) is larger than any valid reply to this {} request",
            header.len,
            header.ty,
            req.name()
        )));
    }
    let mut payload = vec![0u8; header.len as usize];
    stream.read_exact(&mut payload).await?;
    Ok(Bytes::from(payload))
}

async fn send_option<S: AsyncWrite + Unpin>(
    stream: &mut S,
    option: u32,
    data: &[u8],
) -> Result<(), NbdError> {
    stream.write_all(&encode_option(option, data)?).await?;
    stream.flush().await?;
    Ok(())
}

async fn read_option_reply<S: AsyncRead + Unpin>(
    stream: &mut S,
    option: u32,
) -> Result<OptionReply, NbdError> {
    let mut head = [0u8; OPTION_REPLY_HEADER_BYTES];
    stream.read_exact(&mut head).await?;
    let header = parse_option_reply_header(&head, option)?;
    let mut payload = vec![0u8; header.len as usize];
    stream.read_exact(&mut payload).await?;
    parse_option_reply(header, &payload)
}

fn refused(option: u32, reply: u32, message: String) -> NbdError {
    NbdError::Refused {
        option: option_name(option),
        reply: rep_error_name(reply),
        message,
    }
}

async fn negotiate<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut BufReader<S>,
    export: &str,
    contexts: &[String],
) -> Result<Negotiated, NbdError> {
    let mut greeting = [0u8; GREETING_BYTES];
    stream.read_exact(&mut greeting).await?;
    let flags = parse_greeting(&greeting)?;
    let mut client_flags = NBD_FLAG_C_FIXED_NEWSTYLE;
    if flags & NBD_FLAG_NO_ZEROES != 0 {
        client_flags |= NBD_FLAG_C_NO_ZEROES;
    }
    stream
        .get_mut()
        .write_all(&client_flags.to_be_bytes())
        .await?;

    send_option(stream.get_mut(), NBD_OPT_STRUCTURED_REPLY, &[]).await?;
    match read_option_reply(stream, NBD_OPT_STRUCTURED_REPLY).await? {
        OptionReply::Ack => {}
        OptionReply::Error { reply, message } => {
            return Err(refused(NBD_OPT_STRUCTURED_REPLY, reply, message));
        }
        other => {
            return Err(protocol(format!(
                "unexpected reply {other:?} to NBD_OPT_STRUCTURED_REPLY"
            )));
        }
    }

    let mut selected = Vec::new();
    if !contexts.is_empty() {
        send_option(
            stream.get_mut(),
            NBD_OPT_SET_META_CONTEXT,
            &encode_set_meta_context(export, contexts)?,
        )
        .await?;
        loop {
            match read_option_reply(stream, NBD_OPT_SET_META_CONTEXT).await? {
                OptionReply::Ack => break,
                OptionReply::MetaContext { id, name } => {
                    if !contexts.contains(&name) {
                        return Err(protocol(format!(
                            "server selected meta context {name:?}, which was not asked for"
                        )));
                    }
                    if selected.iter().any(|(n, i)| n == &name || *i == id) {
                        return Err(protocol(format!(
                            "meta context {name:?} (id {id}) selected twice"
                        )));
                    }
                    selected.push((name, id));
                }
                OptionReply::Error { reply, message } => {
                    return Err(refused(NBD_OPT_SET_META_CONTEXT, reply, message));
                }
                other => {
                    return Err(protocol(format!(
                        "unexpected reply {other:?} to NBD_OPT_SET_META_CONTEXT"
                    )));
                }
            }
        }
        if let Some(missing) = contexts
            .iter()
            .find(|c| !selected.iter().any(|(n, _)| n == *c))
        {
            return Err(NbdError::Refused {
                option: "NBD_OPT_SET_META_CONTEXT",
                reply: "no such context".into(),
                message: format!("export {export:?} has no meta context {missing:?}"),
            });
        }
    }

    send_option(
        stream.get_mut(),
        NBD_OPT_GO,
        &encode_go(export, &[NBD_INFO_BLOCK_SIZE])?,
    )
    .await?;
    let mut export_info = None;
    let mut max_read_bytes = MAX_READ_REQUEST_BYTES;
    loop {
        match read_option_reply(stream, NBD_OPT_GO).await? {
            OptionReply::Ack => break,
            OptionReply::Info(Info::Export { size, flags }) => export_info = Some((size, flags)),
            OptionReply::Info(Info::BlockSize { max, .. }) => {
                max_read_bytes = max_read_bytes.min(max)
            }
            OptionReply::Info(Info::Other(_)) => {}
            OptionReply::Error { reply, message } => {
                return Err(refused(NBD_OPT_GO, reply, message));
            }
            other => {
                return Err(protocol(format!(
                    "unexpected reply {other:?} to NBD_OPT_GO"
                )));
            }
        }
    }
    let (size, flags) =
        export_info.ok_or_else(|| protocol("NBD_OPT_GO ended without NBD_INFO_EXPORT"))?;
    if size > i64::MAX as u64 {
        return Err(protocol(format!(
            "export size {size} is beyond what offsets can address"
        )));
    }
    Ok(Negotiated {
        size,
        flags,
        contexts: selected,
        max_read_bytes,
    })
}
