//! The QEMU/KVM backend. Being written.
