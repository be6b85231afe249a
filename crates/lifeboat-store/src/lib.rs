//! The replica store: where replica disks, recovery points and the per-VM manifest live
//! (Azure Blob page blobs, or a local folder by default), behind one trait.
//!
//! Empty until the replica store issue fills it.
