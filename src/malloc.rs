//! glibc's malloc as the extension sets it at module start (`php::startup`): blocks of
//! [`LARGE`] bytes and more are mappings of their own, given back to the system when freed.
//!
//! Why (issue 3, "peak memory below 3 times the largest message plus a fixed overhead"): glibc
//! raises its mapping threshold each time a mapped block is freed, so after the first large
//! message every large block came from the allocating thread's arena, and an arena keeps what
//! it once held: with four mailboxes read in four threads, each thread's arena held the
//! buffers of the largest message that thread had seen — four largest messages, not one.
//! Setting `M_MMAP_THRESHOLD` turns that dynamic threshold off (and the trim threshold's with
//! it): every large block is mapped, grown with `mremap` by `realloc`, and unmapped when freed,
//! whichever thread allocated it. Together with the large-message gate of a check-mail run
//! (`incoming::gate`: one large message in memory at a time), the memory a run holds for large
//! messages is about one message's worth. The setting is glibc's own, for the whole PHP
//! process (PHP's own memory manager maps its 2 MiB chunks itself and is not affected).
//!
//! The core does not use this module: the PHP boundary applies it once, and the memory test
//! (`tests/checkmail_memory.rs`) applies the same to measure what ships.

/// From this size on, a block is a mapping of its own (the large-message gate's size).
pub const LARGE: usize = crate::incoming::gate::LARGE;

/// Fixes glibc's mapping threshold at [`LARGE`]; false when glibc refused.
pub fn tune() -> bool {
    // SAFETY: mallopt only changes malloc's parameters; glibc serialises it with allocations.
    unsafe { libc::mallopt(libc::M_MMAP_THRESHOLD, LARGE as libc::c_int) == 1 }
}
