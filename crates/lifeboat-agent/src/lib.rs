//! The node agent: hypervisor backends (QEMU/KVM over QMP and NBD; Hyper-V over WMI and
//! RCT), change-log writing and shipping, initial replication, resync and failover.
//!
//! Empty until the agent issue fills it.
