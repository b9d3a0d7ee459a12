//! What the process asks of glibc's allocator, which otherwise keeps what it
//! once used: the start-up's peak (both parsed copies of the kernel's BTF),
//! and a scrape's copies of a large session table, stayed resident for the
//! process's lifetime.

/// Arenas the allocator may create. glibc gives every thread that allocates
/// an arena of its own, up to 8 per core, and memory freed in one is reused
/// only by it: with the session reader and the scrapes on threads of their
/// own, three runs of 200,000 sessions closing while scraped left 149 MB
/// resident, against 112 MB with two arenas.
const ARENA_MAX: libc::c_int = 2;

/// Call before any thread starts.
pub fn limit_arenas() {
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt only changes the allocator's settings; M_ARENA_MAX
    // takes effect for arenas created after it.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, ARENA_MAX);
    }
}

/// Returns the allocator's free pages to the system.
pub fn release_free() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only releases memory the allocator holds unused.
    unsafe {
        libc::malloc_trim(0);
    }
}
