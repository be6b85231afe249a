//! The Hyper-V backend (placeholder while it is being built).

#[cfg(windows)]
pub mod sys;
