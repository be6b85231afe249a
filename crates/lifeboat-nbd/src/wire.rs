//! The NBD wire format: the protocol's constants, [`NbdError`], and pure functions over byte
//! slices that encode the client's options and requests and parse what a server sends back
//! (greeting, option replies, simple replies, structured reply chunks, block status
//! descriptors).
//!
//! Every length and offset a server sends is checked against the request before it is used,
//! so hostile bytes end in a [`NbdError::Protocol`] naming what was wrong, never a panic or an
//! unbounded allocation. Nothing here does I/O: the client in `client.rs` reads and writes the
//! socket and hands the bytes to these functions.

use bytes::{Buf, BufMut, Bytes};
use std::io;
use std::ops::Range;
use std::path::PathBuf;
use std::time::Duration;

/// `NBDMAGIC`: the first 8 bytes a server sends.
pub const NBD_INIT_MAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`: newstyle servers send it after `NBDMAGIC`; clients prefix every option with it.
pub const NBD_OPTS_MAGIC: u64 = 0x4948_4156_454f_5054;
/// What an oldstyle server sends instead of `IHAVEOPT`.
pub const NBD_OLDSTYLE_MAGIC: u64 = 0x0000_4202_8186_1253;
/// The magic of every option reply.
pub const NBD_REP_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// The magic of every transmission request.
pub const NBD_REQUEST_MAGIC: u32 = 0x2560_9513;
/// The magic of a simple (unstructured) reply.
pub const NBD_SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// The magic of a structured reply chunk.
pub const NBD_STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

/// Handshake flag: the server speaks fixed newstyle.
pub const NBD_FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
/// Handshake flag: the server can skip the 124 zero bytes of `NBD_OPT_EXPORT_NAME`.
pub const NBD_FLAG_NO_ZEROES: u16 = 1 << 1;
/// Client flag: the client speaks fixed newstyle.
pub const NBD_FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
/// Client flag: the client wants no zero padding.
pub const NBD_FLAG_C_NO_ZEROES: u32 = 1 << 1;

/// Option: ask for structured replies.
pub const NBD_OPT_STRUCTURED_REPLY: u32 = 8;
/// Option: select meta contexts for block status.
pub const NBD_OPT_SET_META_CONTEXT: u32 = 10;
/// Option: select the export and end the handshake.
pub const NBD_OPT_GO: u32 = 7;
/// Option: end the handshake without an export.
pub const NBD_OPT_ABORT: u32 = 2;

/// Option reply: done with this option.
pub const NBD_REP_ACK: u32 = 1;
/// Option reply: one piece of information about the export (`NBD_OPT_GO`).
pub const NBD_REP_INFO: u32 = 3;
/// Option reply: one selected meta context (`NBD_OPT_SET_META_CONTEXT`).
pub const NBD_REP_META_CONTEXT: u32 = 4;
/// Option replies with this bit set are errors.
pub const NBD_REP_FLAG_ERROR: u32 = 1 << 31;

/// `NBD_REP_INFO` type: export size and transmission flags.
pub const NBD_INFO_EXPORT: u16 = 0;
/// `NBD_REP_INFO` type: block size constraints.
pub const NBD_INFO_BLOCK_SIZE: u16 = 3;

/// Command: read.
pub const NBD_CMD_READ: u16 = 0;
/// Command: write (the data follows the request).
pub const NBD_CMD_WRITE: u16 = 1;
/// Command: disconnect (no reply).
pub const NBD_CMD_DISC: u16 = 2;
/// Command: make every completed write durable.
pub const NBD_CMD_FLUSH: u16 = 3;
/// Transmission flag: the export is read-only.
pub const NBD_FLAG_READ_ONLY: u16 = 1 << 1;
/// Transmission flag: the server accepts `NBD_CMD_FLUSH`.
pub const NBD_FLAG_SEND_FLUSH: u16 = 1 << 2;
/// Command: block status of the selected meta contexts.
pub const NBD_CMD_BLOCK_STATUS: u16 = 7;

/// Chunk flag: the last chunk of this request.
pub const NBD_REPLY_FLAG_DONE: u16 = 1 << 0;
/// Chunk type: nothing (only valid as the final chunk).
pub const NBD_REPLY_TYPE_NONE: u16 = 0;
/// Chunk type: data at an offset.
pub const NBD_REPLY_TYPE_OFFSET_DATA: u16 = 1;
/// Chunk type: a range that reads as zeros.
pub const NBD_REPLY_TYPE_OFFSET_HOLE: u16 = 2;
/// Chunk type: block status descriptors of one meta context.
pub const NBD_REPLY_TYPE_BLOCK_STATUS: u16 = 5;
/// Chunk types with this bit set are errors.
pub const NBD_REPLY_TYPE_ERROR_BIT: u16 = 1 << 15;
/// Chunk type: an error for the whole request.
pub const NBD_REPLY_TYPE_ERROR: u16 = NBD_REPLY_TYPE_ERROR_BIT | 1;
/// Chunk type: an error at one offset.
pub const NBD_REPLY_TYPE_ERROR_OFFSET: u16 = NBD_REPLY_TYPE_ERROR_BIT | 2;

/// `base:allocation` flag: the range is not allocated.
pub const NBD_STATE_HOLE: u32 = 1 << 0;
/// `base:allocation` flag: the range reads as zeros.
pub const NBD_STATE_ZERO: u32 = 1 << 1;
/// `qemu:dirty-bitmap:NAME` flag: the range is dirty.
pub const NBD_STATE_DIRTY: u32 = 1 << 0;

/// The allocation meta context.
pub const BASE_ALLOCATION: &str = "base:allocation";

/// The largest read request sent: QEMU's server refuses more than 32 MiB per request.
pub const MAX_READ_REQUEST_BYTES: u32 = 32 << 20;
/// The read request size the client uses unless told otherwise: many 1 MiB requests in
/// flight read a QEMU export about twice as fast as 32 MiB ones (measured here over a unix
/// socket, 512 MiB read in 64 MiB calls: 32 MiB × 1 in flight 400-680 MiB/s, 4 MiB × 4
/// 610-690 MiB/s, 1 MiB × 8 880-1080 MiB/s; `qemu::tests::read_throughput` re-measures).
pub const DEFAULT_READ_REQUEST_BYTES: u32 = 1 << 20;
/// How many requests one call keeps in flight unless told otherwise.
pub const DEFAULT_WINDOW: usize = 8;
/// The largest block status request sent (the protocol's length is 32 bits).
pub const MAX_STATUS_REQUEST_BYTES: u32 = 1 << 31;
/// The largest option reply payload accepted (strings are at most 4096 bytes by the spec).
pub const MAX_OPTION_REPLY_BYTES: u32 = 64 << 10;
/// The largest chunk payload accepted that is not read data (block status descriptors,
/// error messages). QEMU sends at most 1 MiB of descriptors per chunk.
pub const MAX_CHUNK_PAYLOAD_BYTES: u32 = 16 << 20;
/// Length of a request on the wire.
pub const REQUEST_BYTES: usize = 28;
/// Length of an option reply header.
pub const OPTION_REPLY_HEADER_BYTES: usize = 20;
/// Length of the server's greeting (`NBDMAGIC`, `IHAVEOPT`, handshake flags).
pub const GREETING_BYTES: usize = 18;
/// Length of a simple reply after its magic.
pub const SIMPLE_REPLY_REST_BYTES: usize = 12;
/// Length of a chunk header after its magic.
pub const CHUNK_HEADER_REST_BYTES: usize = 16;

/// Why an NBD exchange failed.
#[derive(Debug, thiserror::Error)]
pub enum NbdError {
    /// The server's socket could not be reached.
    #[error("cannot connect to NBD socket {}: {source}", socket.display())]
    Connect {
        /// The socket.
        socket: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// Reading or writing the connection failed.
    #[error("NBD connection I/O failed: {0}")]
    Io(#[from] io::Error),
    /// The server did not answer in time.
    #[error("NBD server did not answer within {0:?}")]
    Timeout(Duration),
    /// The server broke the protocol; the connection is unusable.
    #[error("NBD protocol violation: {0}")]
    Protocol(String),
    /// The server refused an option during the handshake.
    #[error("NBD server refused {option}: {reply} {message:?}")]
    Refused {
        /// The option.
        option: &'static str,
        /// The reply type's name.
        reply: String,
        /// The server's message.
        message: String,
    },
    /// The server failed a command; the connection stays usable.
    #[error("NBD server failed {command} of {len} bytes at {offset}: {} (errno {errno}) {message:?}", errno_name(*errno))]
    Command {
        /// `read` or `block status`.
        command: &'static str,
        /// The request's offset.
        offset: u64,
        /// The request's length.
        len: u64,
        /// The NBD error number.
        errno: u32,
        /// The server's message, if any.
        message: String,
    },
    /// The caller asked for something the export cannot give.
    #[error("NBD request out of range: {0}")]
    Invalid(String),
}

impl NbdError {
    /// Whether the connection can still be used after this error.
    pub fn keeps_connection(&self) -> bool {
        matches!(self, Self::Command { .. } | Self::Invalid(_))
    }
}

pub(super) fn protocol(detail: impl Into<String>) -> NbdError {
    NbdError::Protocol(detail.into())
}

/// The name of an NBD error number.
pub fn errno_name(errno: u32) -> &'static str {
    match errno {
        1 => "EPERM",
        5 => "EIO",
        12 => "ENOMEM",
        22 => "EINVAL",
        28 => "ENOSPC",
        75 => "EOVERFLOW",
        95 => "ENOTSUP",
        108 => "ESHUTDOWN",
        _ => "unknown error",
    }
}

pub(super) fn option_name(option: u32) -> &'static str {
    match option {
        NBD_OPT_GO => "NBD_OPT_GO",
        NBD_OPT_STRUCTURED_REPLY => "NBD_OPT_STRUCTURED_REPLY",
        NBD_OPT_SET_META_CONTEXT => "NBD_OPT_SET_META_CONTEXT",
        NBD_OPT_ABORT => "NBD_OPT_ABORT",
        _ => "an option",
    }
}

pub(super) fn rep_error_name(reply: u32) -> String {
    let name = match reply {
        0x8000_0001 => "NBD_REP_ERR_UNSUP",
        0x8000_0002 => "NBD_REP_ERR_POLICY",
        0x8000_0003 => "NBD_REP_ERR_INVALID",
        0x8000_0004 => "NBD_REP_ERR_PLATFORM",
        0x8000_0005 => "NBD_REP_ERR_TLS_REQD",
        0x8000_0006 => "NBD_REP_ERR_UNKNOWN",
        0x8000_0007 => "NBD_REP_ERR_SHUTDOWN",
        0x8000_0008 => "NBD_REP_ERR_BLOCK_SIZE_REQD",
        0x8000_0009 => "NBD_REP_ERR_TOO_BIG",
        0x8000_000a => "NBD_REP_ERR_EXT_HEADER_REQD",
        _ => return format!("error reply {reply:#x}"),
    };
    name.to_owned()
}

// ---------------------------------------------------------------------------------------------
// Handshake: pure encoders and parsers.
// ---------------------------------------------------------------------------------------------

/// Parse the server's greeting; return its handshake flags.
pub fn parse_greeting(bytes: &[u8; GREETING_BYTES]) -> Result<u16, NbdError> {
    let mut b = &bytes[..];
    let init = b.get_u64();
    if init != NBD_INIT_MAGIC {
        return Err(protocol(format!(
            "greeting magic {init:#018x} is not NBDMAGIC: not an NBD server"
        )));
    }
    let opts = b.get_u64();
    if opts == NBD_OLDSTYLE_MAGIC {
        return Err(protocol(
            "the server speaks the oldstyle handshake, which this client does not",
        ));
    }
    if opts != NBD_OPTS_MAGIC {
        return Err(protocol(format!(
            "greeting magic {opts:#018x} is not IHAVEOPT"
        )));
    }
    let flags = b.get_u16();
    if flags & NBD_FLAG_FIXED_NEWSTYLE == 0 {
        return Err(protocol("the server does not speak fixed newstyle"));
    }
    Ok(flags)
}

/// Encode one option: `IHAVEOPT`, the option, its data.
pub fn encode_option(option: u32, data: &[u8]) -> Result<Vec<u8>, NbdError> {
    let len = u32::try_from(data.len())
        .map_err(|_| NbdError::Invalid("option data over 4 GiB".into()))?;
    let mut out = Vec::with_capacity(16 + data.len());
    out.put_u64(NBD_OPTS_MAGIC);
    out.put_u32(option);
    out.put_u32(len);
    out.put_slice(data);
    Ok(out)
}

fn put_string(out: &mut Vec<u8>, s: &str) -> Result<(), NbdError> {
    if s.len() > 4096 {
        return Err(NbdError::Invalid(format!(
            "string of {} bytes is over NBD's 4096",
            s.len()
        )));
    }
    // NB: the length fits: 4096 was checked above.
    out.put_u32(s.len() as u32);
    out.put_slice(s.as_bytes());
    Ok(())
}

/// The data of `NBD_OPT_SET_META_CONTEXT`: the export name and the context queries.
pub fn encode_set_meta_context(export: &str, contexts: &[String]) -> Result<Vec<u8>, NbdError> {
    let mut out = Vec::new();
    put_string(&mut out, export)?;
    let count =
        u32::try_from(contexts.len()).map_err(|_| NbdError::Invalid("too many contexts".into()))?;
    out.put_u32(count);
    for c in contexts {
        put_string(&mut out, c)?;
    }
    Ok(out)
}

/// The data of `NBD_OPT_GO`: the export name and the information requested.
pub fn encode_go(export: &str, infos: &[u16]) -> Result<Vec<u8>, NbdError> {
    let mut out = Vec::new();
    put_string(&mut out, export)?;
    let count =
        u16::try_from(infos.len()).map_err(|_| NbdError::Invalid("too many infos".into()))?;
    out.put_u16(count);
    for i in infos {
        out.put_u16(*i);
    }
    Ok(out)
}

/// The fixed part of an option reply.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OptionReplyHeader {
    /// The reply type (`NBD_REP_*`).
    pub reply: u32,
    /// The payload's length (checked against [`MAX_OPTION_REPLY_BYTES`]).
    pub len: u32,
}

/// Parse an option reply header for `option`.
pub fn parse_option_reply_header(
    bytes: &[u8; OPTION_REPLY_HEADER_BYTES],
    option: u32,
) -> Result<OptionReplyHeader, NbdError> {
    let mut b = &bytes[..];
    let magic = b.get_u64();
    if magic != NBD_REP_MAGIC {
        return Err(protocol(format!("option reply magic {magic:#x} is wrong")));
    }
    let answered = b.get_u32();
    if answered != option {
        return Err(protocol(format!(
            "option reply is for option {answered}, not {option} ({})",
            option_name(option)
        )));
    }
    let reply = b.get_u32();
    let len = b.get_u32();
    if len > MAX_OPTION_REPLY_BYTES {
        return Err(protocol(format!(
            "option reply of {len} bytes to {} is over the {MAX_OPTION_REPLY_BYTES} accepted",
            option_name(option)
        )));
    }
    Ok(OptionReplyHeader { reply, len })
}

/// One piece of `NBD_REP_INFO`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Info {
    /// The export's size and transmission flags.
    Export {
        /// Size in bytes.
        size: u64,
        /// Transmission flags.
        flags: u16,
    },
    /// Block size constraints.
    BlockSize {
        /// Minimum.
        min: u32,
        /// Preferred.
        preferred: u32,
        /// Maximum payload.
        max: u32,
    },
    /// Something this client does not use (the spec says: ignore it).
    Other(u16),
}

/// An option reply, parsed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum OptionReply {
    /// Done with the option.
    Ack,
    /// One selected meta context.
    MetaContext {
        /// The id block status chunks will carry.
        id: u32,
        /// The context's name.
        name: String,
    },
    /// Information about the export.
    Info(Info),
    /// The server refused: the error reply type and its message.
    Error {
        /// The `NBD_REP_ERR_*` type.
        reply: u32,
        /// The message.
        message: String,
    },
}

/// Parse an option reply's payload.
pub fn parse_option_reply(
    header: OptionReplyHeader,
    payload: &[u8],
) -> Result<OptionReply, NbdError> {
    if payload.len() != header.len as usize {
        return Err(protocol(
            "option reply payload length differs from its header",
        ));
    }
    let mut b = payload;
    match header.reply {
        NBD_REP_ACK if payload.is_empty() => Ok(OptionReply::Ack),
        NBD_REP_ACK => Err(protocol("NBD_REP_ACK with a payload")),
        NBD_REP_META_CONTEXT => {
            if b.len() < 5 {
                return Err(protocol(format!(
                    "NBD_REP_META_CONTEXT of {} bytes is too short",
                    b.len()
                )));
            }
            let id = b.get_u32();
            let name = String::from_utf8(b.to_vec())
                .map_err(|_| protocol("meta context name is not UTF-8"))?;
            Ok(OptionReply::MetaContext { id, name })
        }
        NBD_REP_INFO => {
            if b.len() < 2 {
                return Err(protocol("NBD_REP_INFO without a type"));
            }
            let ty = b.get_u16();
            match ty {
                NBD_INFO_EXPORT => {
                    if b.len() != 10 {
                        return Err(protocol(format!(
                            "NBD_INFO_EXPORT of {} bytes, not 12",
                            b.len() + 2
                        )));
                    }
                    Ok(OptionReply::Info(Info::Export {
                        size: b.get_u64(),
                        flags: b.get_u16(),
                    }))
                }
                NBD_INFO_BLOCK_SIZE => {
                    if b.len() != 12 {
                        return Err(protocol(format!(
                            "NBD_INFO_BLOCK_SIZE of {} bytes, not 14",
                            b.len() + 2
                        )));
                    }
                    let (min, preferred, max) = (b.get_u32(), b.get_u32(), b.get_u32());
                    if min == 0 || !min.is_power_of_two() || preferred < min || max < min {
                        return Err(protocol(format!(
                            "NBD_INFO_BLOCK_SIZE min {min} preferred {preferred} max {max} is inconsistent"
                        )));
                    }
                    Ok(OptionReply::Info(Info::BlockSize {
                        min,
                        preferred,
                        max,
                    }))
                }
                other => Ok(OptionReply::Info(Info::Other(other))),
            }
        }
        reply if reply & NBD_REP_FLAG_ERROR != 0 => Ok(OptionReply::Error {
            reply,
            message: String::from_utf8_lossy(payload).into_owned(),
        }),
        other => Err(protocol(format!("unknown option reply type {other}"))),
    }
}

// ---------------------------------------------------------------------------------------------
// Transmission: pure encoders and parsers.
// ---------------------------------------------------------------------------------------------

/// Encode a transmission request.
pub fn encode_request(
    flags: u16,
    command: u16,
    handle: u64,
    offset: u64,
    len: u32,
) -> [u8; REQUEST_BYTES] {
    let mut out = [0u8; REQUEST_BYTES];
    let mut b = &mut out[..];
    b.put_u32(NBD_REQUEST_MAGIC);
    b.put_u16(flags);
    b.put_u16(command);
    b.put_u64(handle);
    b.put_u64(offset);
    b.put_u32(len);
    out
}

/// Which kind of reply follows a magic.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReplyKind {
    /// A simple reply: [`SIMPLE_REPLY_REST_BYTES`] more bytes of header.
    Simple,
    /// A structured chunk: [`CHUNK_HEADER_REST_BYTES`] more bytes of header.
    Chunk,
}

/// Tell a simple reply from a structured chunk by its magic.
pub fn parse_reply_magic(bytes: [u8; 4]) -> Result<ReplyKind, NbdError> {
    match u32::from_be_bytes(bytes) {
        NBD_SIMPLE_REPLY_MAGIC => Ok(ReplyKind::Simple),
        NBD_STRUCTURED_REPLY_MAGIC => Ok(ReplyKind::Chunk),
        other => Err(protocol(format!(
            "reply magic {other:#010x} is neither simple nor structured"
        ))),
    }
}

/// A simple reply's header after its magic: error and handle.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SimpleReply {
    /// The NBD error (0: success).
    pub errno: u32,
    /// The request's handle.
    pub handle: u64,
}

/// Parse the rest of a simple reply header.
pub fn parse_simple_reply(bytes: &[u8; SIMPLE_REPLY_REST_BYTES]) -> SimpleReply {
    let mut b = &bytes[..];
    SimpleReply {
        errno: b.get_u32(),
        handle: b.get_u64(),
    }
}

/// A structured chunk's header after its magic.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChunkHeader {
    /// `NBD_REPLY_FLAG_*`.
    pub flags: u16,
    /// `NBD_REPLY_TYPE_*`.
    pub ty: u16,
    /// The request's handle.
    pub handle: u64,
    /// The payload's length.
    pub len: u32,
}

impl ChunkHeader {
    /// Whether this is the request's last chunk.
    pub fn done(&self) -> bool {
        self.flags & NBD_REPLY_FLAG_DONE != 0
    }
}

/// Parse the rest of a chunk header.
pub fn parse_chunk_header(bytes: &[u8; CHUNK_HEADER_REST_BYTES]) -> ChunkHeader {
    let mut b = &bytes[..];
    ChunkHeader {
        flags: b.get_u16(),
        ty: b.get_u16(),
        handle: b.get_u64(),
        len: b.get_u32(),
    }
}

/// What a request asked for, to check its replies against.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Request {
    /// `NBD_CMD_READ`, `NBD_CMD_WRITE`, `NBD_CMD_FLUSH` or `NBD_CMD_BLOCK_STATUS`.
    pub command: u16,
    /// Offset.
    pub offset: u64,
    /// Length.
    pub len: u32,
}

impl Request {
    pub(super) fn end(&self) -> u64 {
        self.offset + u64::from(self.len)
    }

    pub(super) fn name(&self) -> &'static str {
        match self.command {
            NBD_CMD_READ => "read",
            NBD_CMD_BLOCK_STATUS => "block status",
            NBD_CMD_WRITE => "write",
            NBD_CMD_FLUSH => "flush",
            _ => "command",
        }
    }

    /// The largest chunk payload a reply to this request may carry.
    pub fn max_chunk_payload(&self) -> u32 {
        match self.command {
            NBD_CMD_READ => self.len.saturating_add(8).max(MAX_CHUNK_PAYLOAD_BYTES),
            _ => MAX_CHUNK_PAYLOAD_BYTES,
        }
    }

    pub(super) fn error(&self, errno: u32, message: String) -> NbdError {
        NbdError::Command {
            command: self.name(),
            offset: self.offset,
            len: u64::from(self.len),
            errno,
            message,
        }
    }
}

/// One block status descriptor, made absolute.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Extent {
    /// The bytes described.
    pub range: Range<u64>,
    /// The context's flags (`NBD_STATE_*`).
    pub flags: u32,
}

/// A structured chunk, parsed and checked against its request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Chunk {
    /// `NBD_REPLY_TYPE_NONE`.
    None,
    /// Data at an absolute offset inside the request.
    Data {
        /// The offset.
        offset: u64,
        /// The bytes.
        data: Bytes,
    },
    /// Zeros over an absolute range inside the request.
    Hole(Range<u64>),
    /// Block status of one context: descriptors from the request's offset.
    Status {
        /// The meta context id.
        context: u32,
        /// The descriptors, made absolute; the last may run past the request.
        extents: Vec<Extent>,
    },
    /// An error chunk.
    Error {
        /// The NBD error number (non-zero).
        errno: u32,
        /// The message.
        message: String,
        /// The offset for `NBD_REPLY_TYPE_ERROR_OFFSET`.
        offset: Option<u64>,
    },
}

fn check_inside(req: &Request, what: &str, start: u64, len: u64) -> Result<Range<u64>, NbdError> {
    let end = start
        .checked_add(len)
        .ok_or_else(|| protocol(format!("{what} at {start}+{len} overflows")))?;
    if start < req.offset || end > req.end() {
        return Err(protocol(format!(
            "{what} {start}..{end} lies outside the {} request {}..{}",
            req.name(),
            req.offset,
            req.end()
        )));
    }
    Ok(start..end)
}

/// Check an `OFFSET_DATA` chunk of `chunk_len` payload bytes whose 8-byte offset is `offset`;
/// return the range of the request's buffer the data fills.
pub fn check_data_chunk(
    req: &Request,
    chunk_len: u32,
    offset: u64,
) -> Result<Range<usize>, NbdError> {
    if req.command != NBD_CMD_READ {
        return Err(protocol(format!(
            "OFFSET_DATA chunk in reply to {}",
            req.name()
        )));
    }
    if chunk_len <= 8 {
        return Err(protocol(format!(
            "OFFSET_DATA chunk of {chunk_len} bytes carries no data"
        )));
    }
    let range = check_inside(req, "OFFSET_DATA", offset, u64::from(chunk_len - 8))?;
    // NB: both ends are inside a request whose length is a u32, so the casts cannot truncate.
    Ok((range.start - req.offset) as usize..(range.end - req.offset) as usize)
}

fn parse_error_payload(
    mut b: &[u8],
    with_offset: bool,
) -> Result<(u32, String, Option<u64>), NbdError> {
    let fixed = if with_offset { 14 } else { 6 };
    if b.len() < fixed {
        return Err(protocol(format!(
            "error chunk of {} bytes is shorter than {fixed}",
            b.len()
        )));
    }
    let errno = b.get_u32();
    let msg_len = usize::from(b.get_u16());
    if msg_len > b.len() - (fixed - 6) {
        return Err(protocol(format!(
            "error chunk message of {msg_len} bytes runs past the chunk"
        )));
    }
    let message = String::from_utf8_lossy(&b[..msg_len]).into_owned();
    b.advance(msg_len);
    let offset = if with_offset {
        if b.len() != 8 {
            return Err(protocol(
                "NBD_REPLY_TYPE_ERROR_OFFSET length disagrees with its message",
            ));
        }
        Some(b.get_u64())
    } else {
        None
    };
    if errno == 0 {
        return Err(protocol("error chunk with error number 0"));
    }
    Ok((errno, message, offset))
}

/// Parse a chunk's payload and check it against its request.
pub fn parse_chunk(header: &ChunkHeader, payload: Bytes, req: &Request) -> Result<Chunk, NbdError> {
    if payload.len() != header.len as usize {
        return Err(protocol("chunk payload length differs from its header"));
    }
    match header.ty {
        NBD_REPLY_TYPE_NONE => {
            if !payload.is_empty() || !header.done() {
                return Err(protocol("NBD_REPLY_TYPE_NONE must be empty and final"));
            }
            Ok(Chunk::None)
        }
        NBD_REPLY_TYPE_OFFSET_DATA => {
            if payload.len() < 8 {
                return Err(protocol("OFFSET_DATA chunk shorter than its offset"));
            }
            let mut b = payload;
            let offset = b.get_u64();
            check_data_chunk(req, header.len, offset)?;
            Ok(Chunk::Data { offset, data: b })
        }
        NBD_REPLY_TYPE_OFFSET_HOLE => {
            if req.command != NBD_CMD_READ {
                return Err(protocol(format!(
                    "OFFSET_HOLE chunk in reply to {}",
                    req.name()
                )));
            }
            if payload.len() != 12 {
                return Err(protocol(format!(
                    "OFFSET_HOLE chunk of {} bytes, not 12",
                    payload.len()
                )));
            }
            let mut b = payload;
            let (offset, len) = (b.get_u64(), b.get_u32());
            if len == 0 {
                return Err(protocol("OFFSET_HOLE of length 0"));
            }
            Ok(Chunk::Hole(check_inside(
                req,
                "OFFSET_HOLE",
                offset,
                u64::from(len),
            )?))
        }
        NBD_REPLY_TYPE_BLOCK_STATUS => {
            if req.command != NBD_CMD_BLOCK_STATUS {
                return Err(protocol(format!(
                    "BLOCK_STATUS chunk in reply to {}",
                    req.name()
                )));
            }
            if payload.len() < 12 || !(payload.len() - 4).is_multiple_of(8) {
                return Err(protocol(format!(
                    "BLOCK_STATUS chunk of {} bytes is not a context id and whole descriptors",
                    payload.len()
                )));
            }
            let mut b = payload;
            let context = b.get_u32();
            let mut extents = Vec::with_capacity(b.len() / 8);
            let mut at = req.offset;
            while b.has_remaining() {
                if at >= req.end() {
                    return Err(protocol(format!(
                        "BLOCK_STATUS descriptor after the end {} of the request",
                        req.end()
                    )));
                }
                let (len, flags) = (b.get_u32(), b.get_u32());
                if len == 0 {
                    return Err(protocol("BLOCK_STATUS descriptor of length 0"));
                }
                let end = at
                    .checked_add(u64::from(len))
                    .ok_or_else(|| protocol("BLOCK_STATUS extent overflows"))?;
                extents.push(Extent {
                    range: at..end,
                    flags,
                });
                at = end;
            }
            Ok(Chunk::Status { context, extents })
        }
        NBD_REPLY_TYPE_ERROR | NBD_REPLY_TYPE_ERROR_OFFSET => {
            let (errno, message, offset) =
                parse_error_payload(&payload, header.ty == NBD_REPLY_TYPE_ERROR_OFFSET)?;
            if let Some(o) = offset {
                check_inside(req, "NBD_REPLY_TYPE_ERROR_OFFSET", o, 1)?;
            }
            Ok(Chunk::Error {
                errno,
                message,
                offset,
            })
        }
        ty if ty & NBD_REPLY_TYPE_ERROR_BIT != 0 => {
            // NB: the spec asks clients to treat unknown error types as errors of the
            // request; their payload starts like NBD_REPLY_TYPE_ERROR's.
            let (errno, message) = match parse_error_payload(&payload, false) {
                Ok((errno, message, _)) => (
                    errno,
                    format!("(unknown error chunk type {ty:#x}) {message}"),
                ),
                Err(_) => (5, format!("unknown error chunk type {ty:#x}")),
            };
            Ok(Chunk::Error {
                errno,
                message,
                offset: None,
            })
        }
        ty => Err(protocol(format!(
            "unknown chunk type {ty} in reply to {}",
            req.name()
        ))),
    }
}
