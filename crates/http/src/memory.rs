//! Giving freed heap memory back to the operating system after a burst of connections; both
//! servers call [`give_back`] from their periodic upkeep. It frees nothing itself and never
//! runs on a request.
//!
//! glibc's allocator keeps what a burst freed: 1,000 connections sending bodies up to the
//! body limit took a release-built sidecar from 16 to 142 MiB of RSS, and it stayed at 142 MiB
//! after they closed; trimming brings it back to 22 MiB (`loadtest/memory.py`, figures in
//! `loadtest/README.md`). Freed chunks sit in the
//! per-thread arenas, and only the top of a heap is returned on its own. `malloc_trim(0)`
//! releases the free pages of every arena. Other allocators (musl's, used by the static
//! container image) return memory on their own terms; there this is a no-op.

/// Free heap bytes above which [`give_back`] trims: below it a trim would gain little and would
/// only make the next requests fault pages in again.
/// Free bytes in the arenas right after the last trim (pages trimmed, chunks still free);
/// 0 before the first.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
static TRIMMED_FREE: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

pub const TRIM_ABOVE_BYTES: usize = 8 * 1024 * 1024;

/// Returns the allocator's free pages to the OS when it holds at least `above` free bytes;
/// the free bytes it saw when it trimmed, `None` when it did not. Trimming holds each arena's
/// lock briefly, so it belongs in upkeep every few seconds, not on a request.
pub fn give_back(above: usize) -> Option<usize> {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        use std::sync::atomic::Ordering;
        // SAFETY: `mallinfo2` only reads the allocator's counters under its own locks and
        // returns a plain struct; it has no preconditions.
        #[expect(unsafe_code, reason = "mallinfo2 has no safe wrapper in std")]
        let info = unsafe { libc::mallinfo2() };
        // Free bytes in the arenas; large allocations are mmapped and returned on free anyway.
        // Pages already trimmed still count as free, so trimming again is due only once this
        // many more bytes were freed since the last trim (or since memory was reused): a
        // large, fragmented heap is then not walked every time for nothing.
        let free = info.fordblks;
        let trimmed = TRIMMED_FREE.fetch_min(free, Ordering::Relaxed).min(free);
        if free < above || free - trimmed < above && trimmed > 0 {
            return None;
        }
        // SAFETY: `malloc_trim` takes the allocator's locks itself and only releases pages of
        // free chunks; no memory the program holds is affected.
        #[expect(unsafe_code, reason = "malloc_trim has no safe wrapper in std")]
        unsafe {
            libc::malloc_trim(0);
        }
        TRIMMED_FREE.store(free, Ordering::Relaxed);
        Some(free)
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        let _ = above;
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    #[test]
    fn freed_memory_above_the_threshold_is_trimmed_and_a_small_amount_is_not() {
        // Mid-sized blocks (below the mmap threshold, so they come from an arena); every other
        // one is freed, so the free ones cannot merge into the top of the heap and be returned
        // on their own: the fragmentation a burst of requests leaves.
        let blocks: Vec<Vec<u8>> = (0..512u32).map(|idx| vec![u8::try_from(idx % 251).unwrap_or(0); 64 * 1024]).collect();
        let (kept, freed): (Vec<_>, Vec<_>) = blocks.into_iter().enumerate().partition(|(idx, _)| idx % 2 == 0);
        drop(freed);
        assert!(give_back(usize::MAX).is_none(), "nothing is ever above usize::MAX free bytes");
        let free = give_back(8 * 1024 * 1024);
        assert!(free.is_some_and(|free| free >= 8 * 1024 * 1024), "16 MiB were freed, yet no trim: {free:?}");
        assert_eq!(kept.len(), 256);
    }
}
