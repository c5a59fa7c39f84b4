//! The extension's allocator: blocks of [`LARGE`] bytes and more are mappings of their own,
//! shared by all threads; everything smaller goes to the system allocator (glibc).
//!
//! Why (issue 3, "peak memory below 3 times the largest message plus a fixed overhead"): glibc
//! raises its mapping threshold each time a mapped block is freed, so after the first large
//! message every large block comes from the allocating thread's arena, and an arena keeps
//! what it once held. With four mailboxes read in four threads, each thread's arena ended up
//! holding the buffers of the largest message that thread had seen — four largest messages,
//! not one. Here a freed large block goes back to one process-wide cache (at most
//! [`CACHE_BYTES`]), where the next large block of any thread finds it (or grows the largest
//! cached one, whose pages are reused), and the rest goes back to the system at once.
//! Together with the large-message gate of a check-mail run (`incoming::gate`: one large
//! message in memory at a time), the memory a run holds for large messages is about one
//! message's worth.
//!
//! [`release_cached`] returns the cache to the system (at the end of a run: an idle PHP
//! worker keeps nothing of it).

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::Mutex;

/// From this size on, a block is a mapping of its own.
pub const LARGE: usize = 64 * 1024;
/// Freed large blocks kept for reuse, at most this many bytes in all.
pub const CACHE_BYTES: usize = 1 << 20;
/// At most this many freed large blocks kept.
const CACHE_SLOTS: usize = 8;
/// The block's length is stored in front of it (16 bytes keep the usual alignment).
const HEADER: usize = 16;
const PAGE: usize = 4096;

/// Freed mappings `(base, length)` waiting for reuse.
struct Cache {
    blocks: [(usize, usize); CACHE_SLOTS],
    len: usize,
    bytes: usize,
}

impl Cache {
    const fn new() -> Cache {
        Cache {
            blocks: [(0, 0); CACHE_SLOTS],
            len: 0,
            bytes: 0,
        }
    }

    /// The smallest cached mapping of at least `length` bytes, taken out of the cache.
    fn take(&mut self, length: usize) -> Option<(usize, usize)> {
        let best = (0..self.len)
            .filter(|&i| self.blocks[i].1 >= length)
            .min_by_key(|&i| self.blocks[i].1)?;
        Some(self.remove(best))
    }

    /// The largest cached mapping, taken out of the cache.
    fn take_largest(&mut self) -> Option<(usize, usize)> {
        let largest = (0..self.len).max_by_key(|&i| self.blocks[i].1)?;
        Some(self.remove(largest))
    }

    fn remove(&mut self, i: usize) -> (usize, usize) {
        let block = self.blocks[i];
        self.len -= 1;
        self.blocks[i] = self.blocks[self.len];
        self.bytes -= block.1;
        block
    }

    /// Keeps a freed mapping when it fits; false: the caller unmaps it.
    fn keep(&mut self, block: (usize, usize)) -> bool {
        if self.len == CACHE_SLOTS || self.bytes + block.1 > CACHE_BYTES {
            return false;
        }
        self.blocks[self.len] = block;
        self.len += 1;
        self.bytes += block.1;
        true
    }
}

static CACHE: Mutex<Cache> = Mutex::new(Cache::new());

fn cache() -> std::sync::MutexGuard<'static, Cache> {
    // Nothing panics while the lock is held; a poisoned lock is still consistent.
    CACHE.lock().unwrap_or_else(|e| e.into_inner())
}

/// The allocator (see the module docs); the extension (`php`) makes it the global one.
pub struct Allocator;

fn is_large(size: usize, align: usize) -> bool {
    size >= LARGE && align <= HEADER
}

/// The mapping length for `size` bytes of data.
fn mapping_length(size: usize) -> Option<usize> {
    Some(size.checked_add(HEADER + PAGE - 1)? / PAGE * PAGE)
}

unsafe fn map(size: usize) -> *mut u8 {
    let Some(length) = mapping_length(size) else {
        return std::ptr::null_mut();
    };
    let (fits, smaller) = {
        let mut cache = cache();
        match cache.take(length) {
            Some(block) => (Some(block), None),
            None => (None, cache.take_largest()),
        }
    };
    // No cached block is large enough: the largest one grows (its pages are reused, so the
    // memory in use grows by the difference only), else a new mapping.
    let grown = smaller.and_then(|(base, old)| {
        let moved = libc::mremap(base as *mut libc::c_void, old, length, libc::MREMAP_MAYMOVE);
        if moved == libc::MAP_FAILED {
            libc::munmap(base as *mut libc::c_void, old);
            None
        } else {
            Some((moved as usize, length))
        }
    });
    let (base, length) = match fits.or(grown) {
        Some(block) => block,
        None => {
            let base = libc::mmap(
                std::ptr::null_mut(),
                length,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            );
            if base == libc::MAP_FAILED {
                return std::ptr::null_mut();
            }
            (base as usize, length)
        }
    };
    *(base as *mut usize) = length;
    (base + HEADER) as *mut u8
}

/// The mapping `(base, length)` behind a large block.
unsafe fn mapping_of(ptr: *mut u8) -> (usize, usize) {
    let base = ptr as usize - HEADER;
    (base, *(base as *const usize))
}

unsafe fn unmap(ptr: *mut u8) {
    let block = mapping_of(ptr);
    let kept = cache().keep(block);
    if !kept {
        libc::munmap(block.0 as *mut libc::c_void, block.1);
    }
}

unsafe impl GlobalAlloc for Allocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if is_large(layout.size(), layout.align()) {
            map(layout.size())
        } else {
            System.alloc(layout)
        }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if is_large(layout.size(), layout.align()) {
            let ptr = map(layout.size());
            if !ptr.is_null() {
                std::ptr::write_bytes(ptr, 0, layout.size());
            }
            ptr
        } else {
            System.alloc_zeroed(layout)
        }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        if is_large(layout.size(), layout.align()) {
            unmap(ptr)
        } else {
            System.dealloc(ptr, layout)
        }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let was_large = is_large(layout.size(), layout.align());
        let large = is_large(new_size, layout.align());
        match (was_large, large) {
            (false, false) => System.realloc(ptr, layout, new_size),
            (true, true) => {
                let (base, length) = mapping_of(ptr);
                let Some(wanted) = mapping_length(new_size) else {
                    return std::ptr::null_mut();
                };
                if wanted <= length {
                    return ptr;
                }
                // Grown by the kernel, moved without copying when it must move.
                let moved = libc::mremap(
                    base as *mut libc::c_void,
                    length,
                    wanted,
                    libc::MREMAP_MAYMOVE,
                );
                if moved == libc::MAP_FAILED {
                    return std::ptr::null_mut();
                }
                *(moved as *mut usize) = wanted;
                (moved as usize + HEADER) as *mut u8
            }
            // Across the threshold: to the other allocator.
            _ => {
                let new_layout = Layout::from_size_align_unchecked(new_size, layout.align());
                let new = self.alloc(new_layout);
                if !new.is_null() {
                    std::ptr::copy_nonoverlapping(ptr, new, layout.size().min(new_size));
                    self.dealloc(ptr, layout);
                }
                new
            }
        }
    }
}

/// Returns the cached large blocks to the system.
pub fn release_cached() {
    let mut blocks = [(0, 0); CACHE_SLOTS];
    let mut n = 0;
    {
        let mut cache = cache();
        while let Some(block) = cache.take(0) {
            blocks[n] = block;
            n += 1;
        }
    }
    for &(base, length) in &blocks[..n] {
        unsafe { libc::munmap(base as *mut libc::c_void, length) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cache_gives_the_smallest_block_that_fits_and_stays_within_its_bounds() {
        let mut cache = Cache::new();
        assert!(cache.keep((1, 3 * LARGE)));
        assert!(cache.keep((2, LARGE)));
        assert!(cache.keep((3, 2 * LARGE)));
        assert_eq!(cache.take(LARGE + 1), Some((3, 2 * LARGE)));
        assert_eq!(cache.take(4 * LARGE), None);
        assert!(cache.keep((3, 2 * LARGE)));
        assert_eq!(cache.take_largest(), Some((1, 3 * LARGE)));
        assert!(cache.keep((1, 3 * LARGE)));
        assert_eq!(cache.take(2 * LARGE), Some((3, 2 * LARGE)));
        assert_eq!(cache.bytes, 4 * LARGE);
        // Over the byte budget: refused (the caller unmaps it).
        assert!(!cache.keep((4, CACHE_BYTES)));
        assert_eq!(cache.take(0), Some((2, LARGE)));
        assert_eq!(cache.take(0), Some((1, 3 * LARGE)));
        assert_eq!(cache.take(0), None);
        assert_eq!(cache.bytes, 0);
        for i in 0..CACHE_SLOTS {
            assert!(cache.keep((i, PAGE)));
        }
        assert!(!cache.keep((99, PAGE)), "no more than CACHE_SLOTS blocks");
    }

    /// A byte vector of the allocator's own, to drive it the way `Vec` does.
    struct Block {
        ptr: *mut u8,
        layout: Layout,
    }

    impl Block {
        fn new(size: usize, zeroed: bool) -> Block {
            let layout = Layout::from_size_align(size, 1).unwrap();
            let ptr = unsafe {
                if zeroed {
                    Allocator.alloc_zeroed(layout)
                } else {
                    Allocator.alloc(layout)
                }
            };
            assert!(!ptr.is_null());
            Block { ptr, layout }
        }

        fn bytes(&mut self) -> &mut [u8] {
            unsafe { std::slice::from_raw_parts_mut(self.ptr, self.layout.size()) }
        }

        fn resize(&mut self, size: usize) {
            self.ptr = unsafe { Allocator.realloc(self.ptr, self.layout, size) };
            assert!(!self.ptr.is_null());
            self.layout = Layout::from_size_align(size, 1).unwrap();
        }
    }

    impl Drop for Block {
        fn drop(&mut self) {
            unsafe { Allocator.dealloc(self.ptr, self.layout) }
        }
    }

    fn pattern(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31) ^ seed)
            .collect()
    }

    #[test]
    fn data_survives_growing_and_shrinking_across_the_threshold() {
        let mut block = Block::new(1000, false);
        block.bytes().copy_from_slice(&pattern(1000, 1));
        // small -> large -> larger (remapped) -> large (in place) -> small
        for (size, kept) in [
            (3 * LARGE, 1000),
            (20 * LARGE, 3 * LARGE),
            (LARGE, LARGE),
            (500, 500),
        ] {
            let before = block.bytes()[..kept].to_vec();
            block.resize(size);
            assert_eq!(&block.bytes()[..kept], &before[..], "resized to {size}");
            let len = block.bytes().len();
            block.bytes().copy_from_slice(&pattern(len, size as u8));
        }
        let mut zeroed = Block::new(5 * LARGE, true);
        assert!(zeroed.bytes().iter().all(|&b| b == 0));
        zeroed.bytes().fill(7);
        drop(zeroed);
        // A cached block given out again is zeroed when asked to be.
        let mut again = Block::new(5 * LARGE, true);
        assert!(again.bytes().iter().all(|&b| b == 0));
        again.bytes().fill(9);
        drop(again);
        // So is one grown from a smaller cached block.
        let mut grown = Block::new(9 * LARGE, true);
        assert!(grown.bytes().iter().all(|&b| b == 0));
        drop(grown);
        // Blocks freed by one thread serve another, each with its own contents.
        let threads: Vec<_> = (0..4u8)
            .map(|t| {
                std::thread::spawn(move || {
                    for n in 0..20u8 {
                        let size = LARGE + usize::from(n) * 1000;
                        let mut block = Block::new(size, false);
                        block.bytes().copy_from_slice(&pattern(size, t ^ n));
                        assert_eq!(block.bytes(), &pattern(size, t ^ n)[..]);
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        release_cached();
    }
}
