//! The same-host path of one ring link: when a rank and the next one share `/dev/shm` (the
//! same machine, or containers that share an IPC namespace), the link's frames travel
//! through a byte ring in a shared memory segment instead of the TCP connection, the way
//! MPI's and NCCL's intra-node transports avoid the network stack. On loopback TCP every
//! byte is copied into the kernel and out again and pays for the TCP stack in between; here
//! it is copied into the segment once and read out of it once (the reduce-scatter adds
//! straight from the segment).
//!
//! The TCP connection stays open beside the segment and does the rest:
//! - it is the doorbell: a side that finds the ring full (producer) or empty (consumer)
//!   flags itself asleep in the segment and waits in `poll` on the socket; the other side,
//!   after moving its position, sends one byte if it sees the flag. (Flag store then position
//!   load on one side, position store then flag swap on the other, all sequentially
//!   consistent: one of the two sees the other's write, so no wake-up is lost.)
//! - it carries failure: a peer that dies or aborts closes its socket, which ends the wait
//!   at once with "connection closed by peer", exactly as a TCP link would report it;
//!   shutting our own socket down (an abort from another thread) ends our own waits.
//! - the handshake chooses the path: the producer's hello carries the nonce of a segment it
//!   created under a name made of the job token, its rank and that nonce; the consumer maps
//!   it, checks the nonce inside and echoes it in its accept. Any failure on the way (no
//!   `/dev/shm`, another host, a peer without this path, disabled) leaves the link on TCP.
//!
//! A name lives only between the producer's create and the consumer's map (or the producer's
//! fallback to TCP). A producer killed in between leaves it behind, so every create first
//! removes the names whose creator (its pid is the nonce's high half) is gone
//! ([`sweep_stale`]).
//!
//! Layout: one 4 KiB header page (magic, nonce, capacity, then the producer's position, the
//! consumer's position and the two sleep flags on cache lines of their own), then
//! [`CAPACITY`] bytes of ring. Positions are byte counts modulo 2^32; the ring holds
//! `head - tail` bytes. The consumer checks that this never exceeds the capacity and that
//! every run it reads is whole f32s, so a corrupt peer is an error, not a crash.

use std::fs::OpenOptions;
use std::io::{self, Write};
use std::net::TcpStream;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering::SeqCst};
use std::time::{Duration, Instant};

use memmap2::MmapMut;

const MAGIC: [u8; 8] = *b"FRNGSHM1";
/// Bytes of ring in a segment (a power of two, so positions may wrap at 2^32).
const CAPACITY: usize = 4 << 20;
const DATA: usize = 4096;
const HEAD: usize = 64;
const TAIL: usize = 128;
const PRODUCER_ASLEEP: usize = 192;
const CONSUMER_ASLEEP: usize = 256;
/// Each side publishes its position at least this often, so the other side can work on
/// the first part of a piece while the rest is copied.
const BLOCK: usize = 256 << 10;

const _: () = assert!(CAPACITY.is_power_of_two() && CAPACITY.is_multiple_of(BLOCK));

/// One link's shared segment, mapped by both ends.
pub(super) struct Segment {
    _map: MmapMut,
    base: *mut u8,
    /// The creator's file name while it still exists (removed once the other end has mapped
    /// it, or when the link falls back to TCP; the other end removes it too once mapped).
    path: Option<PathBuf>,
    timeout: Duration,
}

// SAFETY: the header words are only touched as atomics; the data area is shared under the
// ring protocol (the producer writes only between head and tail + capacity, the consumer
// reads only between tail and head).
unsafe impl Send for Segment {}
unsafe impl Sync for Segment {}

const SHM_DIR: &str = "/dev/shm";
const PREFIX: &str = "ferrite-ring-";
/// A name left this long by a creator that no longer exists is removed. Longer than any
/// handshake, so a segment whose creator lives in another pid namespace (containers that
/// share only `/dev/shm`), and so looks gone from here, is never removed while in use.
const STALE_AFTER: Duration = Duration::from_secs(120);

fn segment_path(token: u64, rank: usize, nonce: u64) -> PathBuf {
    Path::new(SHM_DIR).join(format!("{PREFIX}{token:016x}-{rank}-{nonce:016x}"))
}

/// A fresh nonce: the creator's pid in the high half (so a leftover name tells whose it
/// was), 32 random bits from the standard library's randomly keyed hasher in the low half.
pub(super) fn new_nonce() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u32(std::process::id());
    (u64::from(std::process::id()) << 32) | (h.finish() & 0xffff_ffff)
}

/// The pid a segment name's nonce carries, if the name is one of ours.
fn creator_pid(name: &str) -> Option<i32> {
    let nonce = name.strip_prefix(PREFIX)?.rsplit('-').next()?;
    if nonce.len() != 16 {
        return None;
    }
    let pid = u64::from_str_radix(nonce, 16).ok()? >> 32;
    i32::try_from(pid).ok().filter(|&p| p > 0)
}

fn process_exists(pid: i32) -> bool {
    // SAFETY: signal 0 only checks that the process exists; nothing is sent.
    let r = unsafe { libc::kill(pid, 0) };
    r == 0 || io::Error::last_os_error().raw_os_error() != Some(libc::ESRCH)
}

/// Removes the segment names in `dir` older than `min_age` whose creator no longer exists;
/// returns how many. Names of live processes, young names and other files stay.
pub(super) fn sweep_stale(dir: &Path, min_age: Duration) -> usize {
    let Ok(entries) = std::fs::read_dir(dir) else { return 0 };
    let mut removed = 0;
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name.to_str().and_then(creator_pid) else { continue };
        let age = entry.metadata().and_then(|m| m.modified()).ok().and_then(|t| t.elapsed().ok());
        if age.is_some_and(|a| a >= min_age) && !process_exists(pid) {
            match std::fs::remove_file(entry.path()) {
                Ok(()) => {
                    tracing::info!(path = %entry.path().display(), pid, "removed a shared-memory segment left by a gone process");
                    removed += 1;
                }
                Err(e) => {
                    tracing::debug!(path = %entry.path().display(), error = %e, "removing a stale segment")
                }
            }
        }
    }
    removed
}

impl Segment {
    /// The producer's side: creates and maps a fresh segment (mode 0600).
    pub fn create(token: u64, rank: usize, nonce: u64, timeout: Duration) -> io::Result<Self> {
        sweep_stale(Path::new(SHM_DIR), STALE_AFTER);
        let path = segment_path(token, rank, nonce);
        let file =
            OpenOptions::new().read(true).write(true).create_new(true).mode(0o600).open(&path)?;
        let mut seg = file
            .set_len((DATA + CAPACITY) as u64)
            .and_then(|()| Segment::map(&file, timeout))
            .inspect_err(|_| {
                let _ = std::fs::remove_file(&path);
            })?;
        seg.path = Some(path);
        // SAFETY: the header page is ours alone until the name is handed over.
        let header = unsafe { std::slice::from_raw_parts_mut(seg.base, 24) };
        header[0..8].copy_from_slice(&MAGIC);
        header[8..16].copy_from_slice(&nonce.to_le_bytes());
        header[16..24].copy_from_slice(&(CAPACITY as u64).to_le_bytes());
        Ok(seg)
    }

    /// The consumer's side: maps the segment rank `prev` announced and checks it is the one
    /// announced; removes its name (both ends have it mapped now).
    pub fn open(token: u64, prev: usize, nonce: u64, timeout: Duration) -> Result<Self, String> {
        let path = segment_path(token, prev, nonce);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&path)
            .map_err(|e| format!("{}: {e}", path.display()))?;
        let len = file.metadata().map_err(|e| e.to_string())?.len();
        if len != (DATA + CAPACITY) as u64 {
            return Err(format!("{} is {len} bytes, expected {}", path.display(), DATA + CAPACITY));
        }
        let seg = Segment::map(&file, timeout).map_err(|e| e.to_string())?;
        // SAFETY: the creator wrote the first 24 bytes before announcing the name.
        let header = unsafe { std::slice::from_raw_parts(seg.base, 24) };
        let cap = u64::from_le_bytes(header[16..24].try_into().unwrap());
        if header[0..8] != MAGIC || header[8..16] != nonce.to_le_bytes() || cap != CAPACITY as u64 {
            return Err("the segment's header does not match the announced one".into());
        }
        let _ = std::fs::remove_file(&path);
        Ok(seg)
    }

    fn map(file: &std::fs::File, timeout: Duration) -> io::Result<Self> {
        // SAFETY: a fresh tmpfs file of our own; the other end changes it only through the
        // protocol above.
        let mut map = unsafe { MmapMut::map_mut(file)? };
        let base = map.as_mut_ptr();
        Ok(Segment { _map: map, base, path: None, timeout })
    }

    /// Removes the segment's name; the mappings stay.
    pub fn unlink(&mut self) {
        if let Some(p) = self.path.take() {
            let _ = std::fs::remove_file(p);
        }
    }

    fn word(&self, at: usize) -> &AtomicU32 {
        // SAFETY: `at` is a 64-byte-aligned offset inside the header page.
        unsafe { &*(self.base.add(at) as *const AtomicU32) }
    }

    /// Producer: appends `bytes` to the ring, waiting for room.
    pub fn send(&self, stream: &TcpStream, bytes: &[u8]) -> Result<(), String> {
        let (head, tail) = (self.word(HEAD), self.word(TAIL));
        let mut h = head.load(SeqCst);
        let mut done = 0;
        while done < bytes.len() {
            let want = (bytes.len() - done).min(BLOCK);
            let room = || CAPACITY - (h.wrapping_sub(tail.load(SeqCst)) as usize).min(CAPACITY);
            self.wait(stream, PRODUCER_ASLEEP, &|| room() >= want)?;
            let at = h as usize % CAPACITY;
            let n = room().min(bytes.len() - done).min(CAPACITY - at).min(BLOCK);
            // SAFETY: `at..at + n` lies in the free part of the ring, which only we write.
            unsafe {
                std::ptr::copy_nonoverlapping(bytes[done..].as_ptr(), self.base.add(DATA + at), n)
            };
            h = h.wrapping_add(n as u32);
            head.store(h, SeqCst);
            self.ring_bell(stream, CONSUMER_ASLEEP);
            done += n;
        }
        Ok(())
    }

    /// Consumer: takes the next `len` bytes off the ring, handing them to `f` in contiguous
    /// runs (at most [`BLOCK`] bytes each, whole f32s as long as the peer sends whole f32s).
    pub fn recv(
        &self,
        stream: &TcpStream,
        len: usize,
        f: &mut dyn FnMut(&[u8]) -> Result<(), String>,
    ) -> Result<(), String> {
        let (head, tail) = (self.word(HEAD), self.word(TAIL));
        let mut t = tail.load(SeqCst);
        let mut done = 0;
        while done < len {
            let want = (len - done).min(BLOCK);
            let held = || head.load(SeqCst).wrapping_sub(t) as usize;
            self.wait(stream, CONSUMER_ASLEEP, &|| held() >= want)?;
            let avail = held();
            if avail > CAPACITY {
                return Err(format!("corrupt shared-memory ring: {avail} bytes held"));
            }
            let at = t as usize % CAPACITY;
            let n = avail.min(len - done).min(CAPACITY - at).min(BLOCK);
            // SAFETY: `at..at + n` lies in the filled part of the ring, which the producer
            // does not touch until we move the tail past it.
            f(unsafe { std::slice::from_raw_parts(self.base.add(DATA + at), n) })?;
            t = t.wrapping_add(n as u32);
            tail.store(t, SeqCst);
            self.ring_bell(stream, PRODUCER_ASLEEP);
            done += n;
        }
        Ok(())
    }

    /// Wakes the other side if it sleeps. A bell that cannot be rung means the other side
    /// is gone, which our own next wait reports; what we moved is done either way.
    fn ring_bell(&self, stream: &TcpStream, flag: usize) {
        if self.word(flag).swap(0, SeqCst) != 0 {
            let _ = (&*stream).write_all(&[1]);
        }
    }

    /// Waits until `ready()`, sleeping in `poll` on the socket under flag `flag`; fails when
    /// the socket closes (the peer died or finished, or an abort shut it) and what we wait
    /// for is not there, or after the timeout.
    fn wait(
        &self,
        stream: &TcpStream,
        flag: usize,
        ready: &dyn Fn() -> bool,
    ) -> Result<(), String> {
        if ready() {
            return Ok(());
        }
        let deadline = Instant::now() + self.timeout;
        let asleep = self.word(flag);
        loop {
            asleep.store(1, SeqCst);
            if ready() {
                asleep.store(0, SeqCst);
                return Ok(());
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                asleep.store(0, SeqCst);
                return Err("timed out".into());
            }
            let mut p = libc::pollfd { fd: stream.as_raw_fd(), events: libc::POLLIN, revents: 0 };
            let ms = left.as_millis().clamp(1, i32::MAX as u128) as i32;
            // SAFETY: one valid pollfd.
            let r = unsafe { libc::poll(&mut p, 1, ms) };
            asleep.store(0, SeqCst);
            if r < 0 {
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::Interrupted {
                    return Err(e.to_string());
                }
            } else if r > 0 {
                // What a peer published before it closed is still ours to take.
                let open = drain_bells(stream);
                if ready() {
                    return Ok(());
                }
                open?;
            }
        }
    }
}

impl Drop for Segment {
    fn drop(&mut self) {
        self.unlink();
    }
}

/// Reads the doorbell bytes waiting on the socket without blocking; the end of the stream
/// means the peer is gone.
fn drain_bells(stream: &TcpStream) -> Result<(), String> {
    let mut b = [0u8; 64];
    loop {
        // SAFETY: `b` is a valid buffer of its length.
        let n = unsafe {
            libc::recv(stream.as_raw_fd(), b.as_mut_ptr().cast(), b.len(), libc::MSG_DONTWAIT)
        };
        match n {
            0 => return Err("connection closed by peer".into()),
            n if n > 0 => continue,
            _ => {
                let e = io::Error::last_os_error();
                return match e.kind() {
                    io::ErrorKind::WouldBlock => Ok(()),
                    io::ErrorKind::Interrupted => continue,
                    _ => Err(super::pipeline::why(&e)),
                };
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::File;
    use std::time::SystemTime;

    /// A pid that existed and is gone: a child that has exited and been reaped.
    fn dead_pid() -> u32 {
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        child.wait().unwrap();
        pid
    }

    #[test]
    fn nonces_carry_the_creators_pid() {
        let name = format!("{PREFIX}{:016x}-1-{:016x}", 42, new_nonce());
        assert_eq!(creator_pid(&name), Some(std::process::id() as i32));
        assert_ne!(new_nonce(), new_nonce());
        assert_eq!(creator_pid("ferrite-ring-zz"), None);
        assert_eq!(creator_pid("other-0000000100000000"), None);
    }

    #[test]
    fn sweep_removes_only_old_names_of_gone_creators() {
        let dir = tempfile::tempdir().unwrap();
        let name = |pid: u32| format!("{PREFIX}{:016x}-0-{:016x}", 7, (u64::from(pid) << 32) | 5);
        let old = SystemTime::now() - Duration::from_secs(600);
        let make = |name: &str, modified: SystemTime| {
            let f = File::create(dir.path().join(name)).unwrap();
            f.set_modified(modified).unwrap();
        };
        let dead = dead_pid();
        make(&name(dead), old);
        make(&name(std::process::id()), old);
        make(&name(dead).replace("-0-", "-1-"), SystemTime::now());
        make("unrelated-file", old);
        assert_eq!(sweep_stale(dir.path(), Duration::from_secs(120)), 1);
        let mut left: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        left.sort();
        let mut want = vec![
            name(std::process::id()),
            name(dead).replace("-0-", "-1-"),
            "unrelated-file".to_owned(),
        ];
        want.sort();
        assert_eq!(left, want, "only the old name of the gone creator goes");
    }
}
