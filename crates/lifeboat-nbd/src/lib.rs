//! A small NBD client: what reading a fleecing view and writing an image in place need.
//! Newstyle fixed handshake, structured replies, meta contexts (`base:allocation`,
//! `qemu:dirty-bitmap:NAME`), `NBD_CMD_READ`, `NBD_CMD_WRITE`, `NBD_CMD_FLUSH`,
//! `NBD_CMD_BLOCK_STATUS` and `NBD_CMD_DISC`; no TLS, no extended headers.
//!
//! Its users: the QEMU backend (`lifeboat-qemu`) reads views through it; the engine's failback
//! writes a qcow2 original disk through a `qemu-nbd` serving it.
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
//! Everything is re-exported here (`lifeboat-qemu` re-exports the crate as `nbd`).

#![cfg(unix)]

mod client;
mod wire;

pub use client::{AckAssembly, NbdClient, Negotiated, ReadAssembly, StatusAssembly, coalesce};
// NB: the whole wire module, the protocol's constants and pure functions included: the QEMU
// backend's `discover` probes sockets with the greeting, and its tests build byte streams
// with them.
pub use wire::*;
