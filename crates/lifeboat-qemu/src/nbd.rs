//! A small NBD client: just what reading a fleecing view needs. Newstyle fixed handshake,
//! structured replies, meta contexts (`base:allocation`, `qemu:dirty-bitmap:NAME`),
//! `NBD_CMD_READ`, `NBD_CMD_BLOCK_STATUS` and `NBD_CMD_DISC`; no TLS, no extended headers,
//! no writes.
//!
//! ```text
//!  client                                   server (QEMU's NBD server)
//!    │ <── NBDMAGIC IHAVEOPT flags ─────────── │  handshake
//!    │ ─── client flags ─────────────────────> │
//!    │ ─── OPT_STRUCTURED_REPLY ─────────────> │ <── ACK
//!    │ ─── OPT_SET_META_CONTEXT [ctx...] ────> │ <── META_CONTEXT(id, name)* ACK
//!    │ ─── OPT_GO(export, [BLOCK_SIZE]) ─────> │ <── INFO(EXPORT, BLOCK_SIZE...)* ACK
//!    │                                          │  transmission
//!    │ ─── CMD_READ h1, CMD_READ h2 ... ─────> │  (up to `window` in flight)
//!    │ <── chunk(h2 OFFSET_DATA) chunk(h1 OFFSET_HOLE) chunk(h1 NONE|DONE) ...
//!    │ ─── CMD_BLOCK_STATUS ─────────────────> │ <── chunk(BLOCK_STATUS ctx) ... DONE
//!    │ ─── CMD_DISC ─────────────────────────> │  (no reply)
//! ```
//!
//! The wire format lives in pure functions over byte slices ([`parse_greeting`],
//! [`parse_option_reply_header`], [`parse_option_reply`], [`parse_reply_magic`],
//! [`parse_simple_reply`], [`parse_chunk_header`], [`parse_chunk`]) and two assemblers
//! ([`ReadAssembly`], [`StatusAssembly`]) that turn a request's chunks into its result. Every
//! length and offset a server sends is checked against the request before it is used, so a
//! hostile or broken server gets a [`NbdError::Protocol`] naming what was wrong, never a
//! panic or an unbounded allocation. The async [`NbdClient`] only moves bytes between a socket
//! and those functions.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use std::collections::HashMap;
use std::fmt;
use std::io;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

/// `NBDMAGIC`: the first 8 bytes a server sends.
pub(crate) const NBD_INIT_MAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`: newstyle servers send it after `NBDMAGIC`; clients prefix every option with it.
pub(crate) const NBD_OPTS_MAGIC: u64 = 0x4948_4156_454f_5054;
/// What an oldstyle server sends instead of `IHAVEOPT`.
pub(crate) const NBD_OLDSTYLE_MAGIC: u64 = 0x0000_4202_8186_1253;
/// The magic of every option reply.
pub(crate) const NBD_REP_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// The magic of every transmission request.
pub(crate) const NBD_REQUEST_MAGIC: u32 = 0x2560_9513;
/// The magic of a simple (unstructured) reply.
pub(crate) const NBD_SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// The magic of a structured reply chunk.
pub(crate) const NBD_STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

/// Handshake flag: the server speaks fixed newstyle.
pub(crate) const NBD_FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
/// Handshake flag: the server can skip the 124 zero bytes of `NBD_OPT_EXPORT_NAME`.
pub(crate) const NBD_FLAG_NO_ZEROES: u16 = 1 << 1;
/// Client flag: the client speaks fixed newstyle.
pub(crate) const NBD_FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
/// Client flag: the client wants no zero padding.
pub(crate) const NBD_FLAG_C_NO_ZEROES: u32 = 1 << 1;

/// Option: ask for structured replies.
pub(crate) const NBD_OPT_STRUCTURED_REPLY: u32 = 8;
/// Option: select meta contexts for block status.
pub(crate) const NBD_OPT_SET_META_CONTEXT: u32 = 10;
/// Option: select the export and end the handshake.
pub(crate) const NBD_OPT_GO: u32 = 7;
/// Option: end the handshake without an export.
pub(crate) const NBD_OPT_ABORT: u32 = 2;

/// Option reply: done with this option.
pub(crate) const NBD_REP_ACK: u32 = 1;
/// Option reply: one piece of information about the export (`NBD_OPT_GO`).
pub(crate) const NBD_REP_INFO: u32 = 3;
/// Option reply: one selected meta context (`NBD_OPT_SET_META_CONTEXT`).
pub(crate) const NBD_REP_META_CONTEXT: u32 = 4;
/// Option replies with this bit set are errors.
pub(crate) const NBD_REP_FLAG_ERROR: u32 = 1 << 31;

/// `NBD_REP_INFO` type: export size and transmission flags.
pub(crate) const NBD_INFO_EXPORT: u16 = 0;
/// `NBD_REP_INFO` type: block size constraints.
pub(crate) const NBD_INFO_BLOCK_SIZE: u16 = 3;

/// Command: read.
pub(crate) const NBD_CMD_READ: u16 = 0;
/// Command: disconnect (no reply).
pub(crate) const NBD_CMD_DISC: u16 = 2;
/// Command: block status of the selected meta contexts.
pub(crate) const NBD_CMD_BLOCK_STATUS: u16 = 7;

/// Chunk flag: the last chunk of this request.
pub(crate) const NBD_REPLY_FLAG_DONE: u16 = 1 << 0;
/// Chunk type: nothing (only valid as the final chunk).
pub(crate) const NBD_REPLY_TYPE_NONE: u16 = 0;
/// Chunk type: data at an offset.
pub(crate) const NBD_REPLY_TYPE_OFFSET_DATA: u16 = 1;
/// Chunk type: a range that reads as zeros.
pub(crate) const NBD_REPLY_TYPE_OFFSET_HOLE: u16 = 2;
/// Chunk type: block status descriptors of one meta context.
pub(crate) const NBD_REPLY_TYPE_BLOCK_STATUS: u16 = 5;
/// Chunk types with this bit set are errors.
pub(crate) const NBD_REPLY_TYPE_ERROR_BIT: u16 = 1 << 15;
/// Chunk type: an error for the whole request.
pub(crate) const NBD_REPLY_TYPE_ERROR: u16 = NBD_REPLY_TYPE_ERROR_BIT | 1;
/// Chunk type: an error at one offset.
pub(crate) const NBD_REPLY_TYPE_ERROR_OFFSET: u16 = NBD_REPLY_TYPE_ERROR_BIT | 2;

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
pub(crate) const MAX_STATUS_REQUEST_BYTES: u32 = 1 << 31;
/// The largest option reply payload accepted (strings are at most 4096 bytes by the spec).
pub(crate) const MAX_OPTION_REPLY_BYTES: u32 = 64 << 10;
/// The largest chunk payload accepted that is not read data (block status descriptors,
/// error messages). QEMU sends at most 1 MiB of descriptors per chunk.
pub(crate) const MAX_CHUNK_PAYLOAD_BYTES: u32 = 16 << 20;
/// Length of a request on the wire.
pub(crate) const REQUEST_BYTES: usize = 28;
/// Length of an option reply header.
pub(crate) const OPTION_REPLY_HEADER_BYTES: usize = 20;
/// Length of the server's greeting (`NBDMAGIC`, `IHAVEOPT`, handshake flags).
pub(crate) const GREETING_BYTES: usize = 18;
/// Length of a simple reply after its magic.
pub(crate) const SIMPLE_REPLY_REST_BYTES: usize = 12;
/// Length of a chunk header after its magic.
pub(crate) const CHUNK_HEADER_REST_BYTES: usize = 16;

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

fn protocol(detail: impl Into<String>) -> NbdError {
    NbdError::Protocol(detail.into())
}

/// The name of an NBD error number.
pub(crate) fn errno_name(errno: u32) -> &'static str {
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

fn option_name(option: u32) -> &'static str {
    match option {
        NBD_OPT_GO => "NBD_OPT_GO",
        NBD_OPT_STRUCTURED_REPLY => "NBD_OPT_STRUCTURED_REPLY",
        NBD_OPT_SET_META_CONTEXT => "NBD_OPT_SET_META_CONTEXT",
        NBD_OPT_ABORT => "NBD_OPT_ABORT",
        _ => "an option",
    }
}

fn rep_error_name(reply: u32) -> String {
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
    /// `NBD_CMD_READ` or `NBD_CMD_BLOCK_STATUS`.
    pub command: u16,
    /// Offset.
    pub offset: u64,
    /// Length.
    pub len: u32,
}

impl Request {
    fn end(&self) -> u64 {
        self.offset + u64::from(self.len)
    }

    fn name(&self) -> &'static str {
        match self.command {
            NBD_CMD_READ => "read",
            NBD_CMD_BLOCK_STATUS => "block status",
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

    fn error(&self, errno: u32, message: String) -> NbdError {
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
        self.guard()?;
        self.check_range(offset, len)?;
        if len == 0 {
            return Ok(Bytes::new());
        }
        let total = usize::try_from(len)
            .map_err(|_| NbdError::Invalid(format!("{len} bytes do not fit memory")))?;
        let step = u64::from(self.read_request_bytes.max(1));
        let mut requests = Vec::new();
        let mut at = offset;
        while at < offset + len {
            // NB: at most max_read_bytes, which is a u32.
            let n = (offset + len - at).min(step) as u32;
            requests.push(Request {
                command: NBD_CMD_READ,
                offset: at,
                len: n,
            });
            at += u64::from(n);
        }
        // NB: one zeroed buffer, split into one piece per request; the pieces are unsplit
        // back in order without copying, so data lands exactly once, straight from the socket.
        // It starts on a page boundary, so that a store may write the data with direct I/O.
        let mut whole = lifeboat_store::aligned_buffer(total);
        let mut pieces: std::collections::VecDeque<BytesMut> = requests
            .iter()
            .map(|r| whole.split_to(r.len as usize))
            .collect();
        self.broken = true;
        let mut results: Vec<Option<BytesMut>> = vec![None; requests.len()];
        let outcome = self
            .run(
                &requests,
                |req, _| {
                    Pending::Read(ReadAssembly::with_buffer(
                        *req,
                        pieces.pop_front().unwrap_or_default(),
                    ))
                },
                &mut results,
            )
            .await;
        self.settle(&outcome);
        outcome?;
        let mut parts = results.into_iter();
        let mut out = parts
            .next()
            .flatten()
            .ok_or_else(|| protocol("read finished without data"))?;
        for part in parts {
            out.unsplit(part.ok_or_else(|| protocol("read finished without data"))?);
        }
        Ok(out.freeze())
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

    /// Send `requests` (up to `window` in flight) and collect their results in order.
    async fn run<T: FromPending>(
        &mut self,
        requests: &[Request],
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
                let stream = self.stream.get_mut();
                within(self.timeout, async {
                    stream.write_all(&bytes).await?;
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
            Pending::Status(_) => Err(protocol("block status finished as a read")),
        }
    }
}

impl FromPending for Vec<Extent> {
    fn finish(pending: Pending) -> Result<Self, NbdError> {
        match pending {
            Pending::Status(s) => s.finish(),
            Pending::Read(_) => Err(protocol("read finished as a block status")),
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
