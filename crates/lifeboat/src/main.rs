//! The `lifeboat` command. Being written.
fn main() {}
