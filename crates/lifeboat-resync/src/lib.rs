//! Fixed-block maps and resync planning. Being written.
