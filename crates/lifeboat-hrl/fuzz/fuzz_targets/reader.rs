//! Runs the HRL reader on arbitrary bytes: it must never panic, and every write it yields
//! must carry data whose checksum holds. The bodies live in `lifeboat_hrl::fuzzing`, which the
//! crate's property tests also run: the raw bytes as a log, then the same bytes as a recipe
//! for a valid log that is then damaged (raw bytes alone rarely get past the header).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    lifeboat_hrl::fuzzing::check_reader(data);
    lifeboat_hrl::fuzzing::check_mutated_log(data);
});
