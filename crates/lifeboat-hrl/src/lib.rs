//! Hyper-V Replica Log (HRL) change logs. Being written.
