//! Azure Blob Storage page blobs. Being written.
