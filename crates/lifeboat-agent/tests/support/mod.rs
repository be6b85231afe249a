//! Support for the agent's end-to-end tests: the qemu-storage-daemon harness lives in
//! `lifeboat_qemu::testing` (shared with the crates above); the wrappers that observe or break
//! the real components are here, and how the engine tests open the engine on the harness.

#![allow(dead_code)]

pub mod engine;
pub mod faults;

pub use lifeboat_qemu::testing::{Qsd, assert_same};
