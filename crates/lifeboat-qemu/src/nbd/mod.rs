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
//!
//! The code is in two files:
//! - `wire.rs`: the protocol's constants, [`NbdError`], the encoders of options and requests
//!   and the parsers of everything a server sends;
//! - `client.rs`: the assemblers and [`NbdClient`] (connection, handshake, pipelined reads,
//!   block status queries), built on `wire.rs`.
//!
//! Everything is re-exported here, so its path stays `nbd::X`.

mod client;
mod wire;

pub use client::{NbdClient, Negotiated, ReadAssembly, StatusAssembly, coalesce};
pub use wire::{
    BASE_ALLOCATION, Chunk, ChunkHeader, DEFAULT_READ_REQUEST_BYTES, DEFAULT_WINDOW, Extent, Info,
    MAX_READ_REQUEST_BYTES, NBD_STATE_DIRTY, NBD_STATE_HOLE, NBD_STATE_ZERO, NbdError, OptionReply,
    OptionReplyHeader, ReplyKind, Request, SimpleReply, check_data_chunk, encode_go, encode_option,
    encode_request, encode_set_meta_context, parse_chunk, parse_chunk_header, parse_greeting,
    parse_option_reply, parse_option_reply_header, parse_reply_magic, parse_simple_reply,
};
// NB: the crate-private constants (and `errno_name`) keep their `nbd::X` paths for the rest
// of the crate too: `discover` probes sockets with the greeting, the tests build byte streams
// with them. A glob re-exports each item at most as visible as it is, so nothing private
// leaks out of the crate.
pub(crate) use wire::*;
