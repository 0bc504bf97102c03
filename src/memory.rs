//! Gives the memory a burst freed back to the system. glibc's allocator keeps
//! freed pages in its arenas unless they sit at the top of a heap: after a storm
//! of 1,000 users `berth up` stayed at 74 MiB with every connection closed, and
//! one `malloc_trim(0)` took it to 39 MiB (`ops/bench/src/up.rs`). mimalloc as
//! the allocator instead measured worse (45 MiB idle, 82 MiB after).

use std::time::Duration;

/// How often the allocator is asked. A trim walks every arena and locks each in
/// turn, so it is not run on every request; every 10 s keeps a process's
/// resident memory near what it uses without showing in the answers' times.
const EVERY: Duration = Duration::from_secs(10);

/// Starts a thread of its own (no runtime needed) that trims the allocator
/// every `EVERY`; does nothing where the allocator is not glibc's.
pub fn give_back_freed() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        let started = std::thread::Builder::new()
            .name("berth-memory".into())
            .stack_size(64 * 1024)
            .spawn(|| {
                loop {
                    std::thread::sleep(EVERY);
                    let began = std::time::Instant::now();
                    let released = trim();
                    tracing::trace!(
                        released,
                        took_us = began.elapsed().as_micros() as u64,
                        "trimmed the allocator"
                    );
                }
            });
        if let Err(e) = started {
            tracing::warn!(error = %e, "cannot start the thread that gives memory back");
        }
    }
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[expect(unsafe_code, reason = "malloc_trim is a C function of glibc")]
fn trim() -> bool {
    // SAFETY: malloc_trim takes no pointers and is thread-safe: glibc serialises
    // it with every other call into the allocator.
    unsafe { libc::malloc_trim(0) == 1 }
}
