//! Keeping the sidecar's resident memory small. It runs in every meshed
//! pod, so its RSS is paid once per pod.
//!
//! * One malloc arena: glibc gives each thread that allocates its own
//!   arena (≈1 MB resident each, up to 8 per core). The proxy runs on one
//!   thread; stray helper threads (tokio's blocking pool: file reads, name
//!   resolution) need no arenas of their own.
//! * Startup code released: `skep` is one 40 MB binary for every role, and
//!   the kernel maps a file page together with its neighbours (fault-around,
//!   large folios), so parsing the command line, getting the first
//!   certificate (gRPC, key generation, X.509 parsing) and setting up leave
//!   ~10 MB of the binary mapped that the proxy loop never runs again. Once
//!   the sidecar is ready those read-only file mappings are dropped from the
//!   page tables (MADV_DONTNEED: for a private mapping never written, the
//!   page cache keeps the pages and any later use faults them back in, as
//!   it does on every process start); what the relay uses comes back on
//!   first use.

use std::io;

/// Caps glibc's malloc at one arena (a no-op elsewhere).
pub fn single_malloc_arena() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallopt only changes allocator tuning; M_ARENA_MAX is a
        // valid parameter and 1 a valid value.
        let ok = unsafe { libc::mallopt(libc::M_ARENA_MAX, 1) };
        if ok != 1 {
            tracing::debug!("mallopt(M_ARENA_MAX, 1) refused");
        }
    }
}

/// A mapping of the executable that may be dropped from the page tables.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Region {
    start: usize,
    end: usize,
}

/// The executable's file mappings that are not writable and hold no
/// anonymous (copied-on-write) page, resident or swapped, from
/// /proc/self/smaps text. A mapping whose pages were ever written
/// (relocated data made read-only afterwards: RELRO) holds such pages and
/// is never listed: dropping those would bring back the unrelocated file
/// contents. A mapping whose `Anonymous:` or `Swap:` line is missing is
/// not listed either.
fn droppable(smaps: &str, exe: &str) -> Vec<Region> {
    /// The mapping being read: its range, whether its kind qualifies, and
    /// whether its Anonymous and Swap lines said 0 kB.
    struct Candidate {
        region: Region,
        qualifies: bool,
        no_anon: bool,
        no_swap: bool,
    }
    let mut out = Vec::new();
    let mut current: Option<Candidate> = None;
    let mut flush = |c: Option<Candidate>| {
        if let Some(c) = c
            && c.qualifies
            && c.no_anon
            && c.no_swap
        {
            out.push(c.region);
        }
    };
    let zero = |v: Option<&str>| v.and_then(|v| v.parse::<u64>().ok()) == Some(0);
    for line in smaps.lines() {
        let mut fields = line.split_whitespace();
        let Some(first) = fields.next() else {
            continue;
        };
        if let Some((a, b)) = first.split_once('-')
            && let (Ok(start), Ok(end)) =
                (usize::from_str_radix(a, 16), usize::from_str_radix(b, 16))
        {
            flush(current.take());
            let perms = fields.next().unwrap_or("");
            let path = fields.nth(3).unwrap_or("");
            current = Some(Candidate {
                region: Region { start, end },
                qualifies: perms.starts_with('r')
                    && perms.as_bytes().get(1) == Some(&b'-')
                    && perms.ends_with('p')
                    && path == exe,
                no_anon: false,
                no_swap: false,
            });
            continue;
        }
        if let Some(c) = current.as_mut() {
            match first {
                "Anonymous:" => c.no_anon = zero(fields.next()),
                "Swap:" => c.no_swap = zero(fields.next()),
                _ => {}
            }
        }
    }
    flush(current.take());
    out
}

/// Drops the executable's read-only, never-written mappings from the page
/// tables; returns how many bytes of address range were released.
pub fn release_startup_code() -> io::Result<usize> {
    let exe = std::fs::read_link("/proc/self/exe")?;
    let exe = exe.to_string_lossy().into_owned();
    let smaps = std::fs::read_to_string("/proc/self/smaps")?;
    let mut released = 0;
    for r in droppable(&smaps, &exe) {
        // SAFETY: the range is a whole private, read-only file mapping of
        // the executable without anonymous pages (checked above); for such
        // a mapping MADV_DONTNEED only unmaps page-table entries, and the
        // next access reads the same bytes back from the page cache.
        let rc = unsafe {
            libc::madvise(
                r.start as *mut libc::c_void,
                r.end - r.start,
                libc::MADV_DONTNEED,
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        released += r.end - r.start;
    }
    Ok(released)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SMAPS: &str = "\
55d0-55e0 r--p 00000000 fe:00 12 /bin/skep
Rss:                2400 kB
Anonymous:             0 kB
Swap:                  0 kB
55e0-55f0 r-xp 00740000 fe:00 12 /bin/skep
Rss:               11296 kB
Anonymous:             0 kB
Swap:                  0 kB
55f0-5600 r--p 01e24000 fe:00 12 /bin/skep
Rss:                 848 kB
Anonymous:           848 kB
Swap:                  0 kB
5600-5610 rw-p 01ef7000 fe:00 12 /bin/skep
Anonymous:            44 kB
5610-5620 rw-p 00000000 00:00 0 [heap]
Anonymous:           244 kB
7f00-7f10 r-xp 00000000 fe:00 99 /usr/lib/libc.so.6
Anonymous:             0 kB
Swap:                  0 kB
5620-5630 r--p 01f00000 fe:00 12 /bin/skep
Anonymous:             0 kB
Swap:                  8 kB
";

    #[test]
    fn only_the_executables_clean_read_only_mappings() {
        assert_eq!(
            droppable(SMAPS, "/bin/skep"),
            vec![
                Region {
                    start: 0x55d0,
                    end: 0x55e0
                },
                Region {
                    start: 0x55e0,
                    end: 0x55f0
                },
            ],
            "RELRO (anonymous pages, resident or swapped), writable data, heap and \
             libraries stay"
        );
    }

    #[test]
    fn a_mapping_without_an_anonymous_line_stays() {
        let smaps = "55d0-55e0 r-xp 00000000 fe:00 12 /bin/skep\nRss: 4 kB\n";
        assert!(droppable(smaps, "/bin/skep").is_empty());
    }

    /// On this very test process: the text is dropped and the process
    /// keeps running (the code faults back in).
    #[test]
    fn releasing_keeps_the_process_working() {
        let released = release_startup_code().expect("madvise");
        assert!(released > 0, "the test binary's text is a clean mapping");
        let v: Vec<u64> = (0..1000).map(|i| i * 3).collect();
        assert_eq!(v.iter().sum::<u64>(), 1_498_500);
    }
}
