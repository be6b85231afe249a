//! Lifeboat API types. Being written.
