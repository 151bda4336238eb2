//! The data movement of the TCP ring: a pipelined reduce-scatter + all-gather over one pair
//! of connections, run on the ring's communication thread (see [`super::ring`]).
//!
//! The `2(world-1)` steps of the ring form one schedule: at step `j` rank `r` sends chunk
//! `r-j` and receives chunk `r-j-1` (mod world); the first `world-1` steps add what they
//! receive (reduce-scatter), the rest copy it (all-gather). Chunks travel in pieces, and a
//! sender thread streams each piece as soon as it is ready instead of waiting for the whole
//! previous step, while the calling thread receives; so both directions of both sockets
//! stay busy from the first piece to the last. Two rules, enforced here with progress
//! counters rather than trusted to the peers, keep the two threads off each other's pieces:
//! - sending piece `p` of step `j` waits until piece `p` of step `j-1` (the same chunk) has
//!   been received;
//! - receiving piece `p` of step `k` waits until piece `p` of step `k+1-world` (the same
//!   chunk, sent earlier) has been sent.

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::{Condvar, Mutex};

use super::ring::{
    FrameHeader, FRAME_HEADER_LEN, KIND_ALL_GATHER, KIND_REDUCE_SCATTER, KIND_SCALAR,
};
use super::shm::Segment;

/// One connection and the peer it leads to, for error messages.
pub(super) struct Link {
    pub stream: TcpStream,
    pub rank: usize,
    /// The peer's listening address from the rendezvous.
    pub addr: SocketAddr,
    /// The same-host path, when the handshake set one up: frames go through it and the
    /// socket only rings its doorbell and reports failures (see [`super::shm`]).
    pub shm: Option<Segment>,
}

/// Payloads are received in runs of at most this many f32, so the scratch they pass
/// through stays in the L2 cache.
const RUN: usize = 64 << 10;

impl Link {
    pub fn name(&self) -> String {
        format!("rank {} ({})", self.rank, self.addr)
    }

    pub fn write(&self, bytes: &[u8]) -> Result<(), String> {
        let sent = match &self.shm {
            Some(seg) => seg.send(&self.stream, bytes),
            None => (&self.stream).write_all(bytes).map_err(|e| why(&e)),
        };
        sent.map_err(|m| format!("sending to {}: {m}", self.name()))
    }

    pub fn read(&self, bytes: &mut [u8]) -> Result<(), String> {
        let got = match &self.shm {
            Some(seg) => {
                let mut at = 0;
                seg.recv(&self.stream, bytes.len(), &mut |run| {
                    bytes[at..at + run.len()].copy_from_slice(run);
                    at += run.len();
                    Ok(())
                })
            }
            None => (&self.stream).read_exact(bytes).map_err(|e| why(&e)),
        };
        got.map_err(|m| format!("receiving from {}: {m}", self.name()))
    }

    /// Receives `count` f32 and hands them to `f` in runs, in order: straight from the
    /// shared segment, or through `scratch` from the socket.
    pub fn read_f32s(
        &self,
        count: usize,
        scratch: &mut Vec<f32>,
        f: &mut dyn FnMut(&[f32]),
    ) -> Result<(), String> {
        let got = match &self.shm {
            Some(seg) => seg.recv(&self.stream, count * 4, &mut |run| {
                let vals = bytemuck::try_cast_slice(run)
                    .map_err(|_| format!("a run of {} bytes is not whole f32s", run.len()))?;
                f(vals);
                Ok(())
            }),
            None => self.read_runs(count, scratch, f).map_err(|e| why(&e)),
        };
        got.map_err(|m| format!("receiving from {}: {m}", self.name()))
    }

    /// The socket side of [`Link::read_f32s`]: `count` f32 through `scratch`, a run at a time.
    fn read_runs(
        &self,
        count: usize,
        scratch: &mut Vec<f32>,
        f: &mut dyn FnMut(&[f32]),
    ) -> io::Result<()> {
        scratch.resize(count.min(RUN), 0.0);
        let mut done = 0;
        while done < count {
            let run = &mut scratch[..(count - done).min(RUN)];
            (&self.stream).read_exact(bytemuck::cast_slice_mut(run))?;
            f(run);
            done += run.len();
        }
        Ok(())
    }

    pub fn shutdown(&self) {
        let _ = self.stream.shutdown(Shutdown::Both);
    }
}

/// Names the common failures plainly.
pub(super) fn why(e: &io::Error) -> String {
    match e.kind() {
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => "timed out".into(),
        io::ErrorKind::UnexpectedEof => "connection closed by peer".into(),
        // Which of these a dead peer shows depends on timing: the first write after the
        // peer closed is answered by a reset, the next fails with a broken pipe.
        io::ErrorKind::BrokenPipe
        | io::ErrorKind::ConnectionReset
        | io::ErrorKind::ConnectionAborted => format!("connection closed by peer ({e})"),
        _ => e.to_string(),
    }
}

/// Element range of chunk `c` of `len` elements split into `world` near-equal chunks.
fn chunk_range(len: usize, world: usize, c: usize) -> (usize, usize) {
    (c * len / world, (c + 1) * len / world)
}

/// The rank's side of the ring: its two connections and the scratch it receives into.
pub(super) struct RingLinks {
    pub rank: usize,
    pub world: usize,
    pub to_next: Link,
    pub from_prev: Link,
    /// Elements per piece.
    pub piece: usize,
    /// Received values waiting to be added in (reduce-scatter).
    pub scratch: Vec<f32>,
}

/// One step of the schedule.
#[derive(Clone, Copy)]
struct Step {
    kind: u32,
    /// Step number within its phase, as the frame header carries it.
    phase_step: usize,
    send: usize,
    recv: usize,
}

/// How far each side of the exchange has got, in pieces counted over the whole schedule.
#[derive(Default)]
struct Progress {
    sent: usize,
    received: usize,
    failed: Option<String>,
}

/// The buffer shared by the sender and receiver threads.
#[derive(Clone, Copy)]
struct Shared {
    ptr: *mut f32,
    len: usize,
}

// SAFETY: the two threads touch disjoint pieces at any time (the module's two rules).
unsafe impl Send for Shared {}
unsafe impl Sync for Shared {}

impl Shared {
    /// # Safety
    /// No thread may be writing `lo..hi` while the returned slice lives.
    unsafe fn get(&self, lo: usize, hi: usize) -> &[f32] {
        assert!(lo <= hi && hi <= self.len);
        std::slice::from_raw_parts(self.ptr.add(lo), hi - lo)
    }

    /// # Safety
    /// No other thread may be reading or writing `lo..hi` while the returned slice lives.
    #[allow(clippy::mut_from_ref)]
    unsafe fn get_mut(&self, lo: usize, hi: usize) -> &mut [f32] {
        assert!(lo <= hi && hi <= self.len);
        std::slice::from_raw_parts_mut(self.ptr.add(lo), hi - lo)
    }
}

impl RingLinks {
    fn steps(&self) -> Vec<Step> {
        let (r, w) = (self.rank, self.world);
        (0..2 * (w - 1))
            .map(|j| {
                let (kind, phase_step) = if j < w - 1 {
                    (KIND_REDUCE_SCATTER, j)
                } else {
                    (KIND_ALL_GATHER, j - (w - 1))
                };
                Step { kind, phase_step, send: (r + 2 * w - j) % w, recv: (r + 2 * w - j - 1) % w }
            })
            .collect()
    }

    /// Pieces of chunk `c` (an empty chunk still travels as one empty frame, so both sides
    /// agree on the frame count).
    fn pieces(&self, len: usize, c: usize) -> usize {
        let (lo, hi) = chunk_range(len, self.world, c);
        (hi - lo).div_ceil(self.piece).max(1)
    }

    /// Replaces `buf` on every rank by the mean over ranks: the same bits on every rank,
    /// since each element's sum is made once, by its owner, and then copied.
    pub fn all_reduce_mean(&mut self, buf: &mut [f32], op: u32) -> Result<(), String> {
        let steps = self.steps();
        // Global index of the first piece of every step, on the send and the receive side.
        let mut send_at = vec![0usize; steps.len() + 1];
        let mut recv_at = vec![0usize; steps.len() + 1];
        for (j, s) in steps.iter().enumerate() {
            send_at[j + 1] = send_at[j] + self.pieces(buf.len(), s.send);
            recv_at[j + 1] = recv_at[j] + self.pieces(buf.len(), s.recv);
        }
        let (len, world, piece) = (buf.len(), self.world, self.piece);
        let header = |s: &Step, chunk: usize, p: usize| {
            let (lo, hi) = chunk_range(len, world, chunk);
            let plo = lo + p * piece;
            let phi = (plo + piece).min(hi);
            let h = FrameHeader {
                kind: s.kind,
                op,
                len: len as u64,
                offset: plo as u64,
                count: (phi - plo) as u32,
                step: s.phase_step as u32,
            };
            (h, plo, phi)
        };
        let progress = Mutex::new(Progress::default());
        let moved = Condvar::new();
        let (to_next, from_prev) = (&self.to_next, &self.from_prev);
        // Whichever side fails first is the cause; it shuts both sockets so the other side
        // (blocked in a read or write) fails at once instead of waiting for its timeout.
        let fail = |m: String| {
            let mut p = progress.lock().unwrap_or_else(|e| e.into_inner());
            p.failed.get_or_insert(m);
            moved.notify_all();
            to_next.shutdown();
            from_prev.shutdown();
        };
        // Waits until `done(progress)`; Err once the other side has failed.
        let wait = |done: &dyn Fn(&Progress) -> bool| -> Result<(), ()> {
            let mut p = progress.lock().unwrap_or_else(|e| e.into_inner());
            while !done(&p) {
                if p.failed.is_some() {
                    return Err(());
                }
                p = moved.wait(p).unwrap_or_else(|e| e.into_inner());
            }
            Ok(())
        };
        let advance = |f: &dyn Fn(&mut Progress)| {
            f(&mut progress.lock().unwrap_or_else(|e| e.into_inner()));
            moved.notify_all();
        };
        let shared = Shared { ptr: buf.as_mut_ptr(), len };
        let n = world as f32;
        let scratch = &mut self.scratch;
        std::thread::scope(|s| {
            let sender = s.spawn(|| {
                for (j, st) in steps.iter().enumerate() {
                    for p in 0..send_at[j + 1] - send_at[j] {
                        let ready = |g: &Progress| j == 0 || g.received > recv_at[j - 1] + p;
                        if wait(&ready).is_err() {
                            return;
                        }
                        let (h, lo, hi) = header(st, st.send, p);
                        // SAFETY: rule 1 — the receiver is done with this piece.
                        let data = unsafe { shared.get(lo, hi) };
                        let sent = to_next
                            .write(&h.encode())
                            .and_then(|()| to_next.write(bytemuck::cast_slice(data)));
                        if let Err(m) = sent {
                            return fail(m);
                        }
                        advance(&|g| g.sent += 1);
                    }
                }
            });
            'steps: for (k, st) in steps.iter().enumerate() {
                let last_add = k + 2 == world;
                for p in 0..recv_at[k + 1] - recv_at[k] {
                    let sent_before = (k + 1).checked_sub(world).map(|j| send_at[j] + p);
                    let ready = |g: &Progress| sent_before.is_none_or(|i| g.sent > i);
                    if wait(&ready).is_err() {
                        break 'steps;
                    }
                    let (want, lo, hi) = header(st, st.recv, p);
                    // SAFETY: rule 2 — the sender is done with this piece.
                    let out = unsafe { shared.get_mut(lo, hi) };
                    if let Err(m) = recv_piece(from_prev, scratch, want, out, st.kind, last_add, n)
                    {
                        fail(m);
                        break 'steps;
                    }
                    advance(&|g| g.received += 1);
                }
            }
            if sender.join().is_err() {
                fail("sender thread panicked".into());
            }
        });
        match progress.into_inner().unwrap_or_else(|e| e.into_inner()).failed {
            Some(m) => Err(m),
            None => Ok(()),
        }
    }

    /// Every rank's `x`, in rank order.
    pub fn gather_scalars(&mut self, x: f64, op: u32) -> Result<Vec<f64>, String> {
        let (r, w) = (self.rank, self.world);
        let mut vals = vec![0.0f64; w];
        vals[r] = x;
        for step in 0..w - 1 {
            let (send, recv) = ((r + w - step) % w, (r + 2 * w - step - 1) % w);
            let h = |i: usize| FrameHeader {
                kind: KIND_SCALAR,
                op,
                len: w as u64,
                offset: i as u64,
                count: 1,
                step: step as u32,
            };
            // 40 bytes fit any socket buffer, so send-then-receive cannot deadlock.
            let mut frame = h(send).encode().to_vec();
            frame.extend_from_slice(&vals[send].to_le_bytes());
            self.to_next.write(&frame)?;
            let mut b = [0u8; FRAME_HEADER_LEN];
            self.from_prev.read(&mut b)?;
            expect_header(&self.from_prev, &b, h(recv))?;
            let mut v = [0u8; 8];
            self.from_prev.read(&mut v)?;
            vals[recv] = f64::from_le_bytes(v);
        }
        Ok(vals)
    }
}

pub(super) fn expect_header(
    link: &Link,
    b: &[u8; FRAME_HEADER_LEN],
    want: FrameHeader,
) -> Result<(), String> {
    let got = FrameHeader::decode(b);
    if got != want {
        return Err(format!("{} sent frame {got:?}, expected {want:?}", link.name()));
    }
    Ok(())
}

/// Receives one piece into `out`: added in (reduce-scatter; on its last step the owner also
/// divides by the world size `n`) or copied (all-gather: the owner's bits land directly).
fn recv_piece(
    link: &Link,
    scratch: &mut Vec<f32>,
    want: FrameHeader,
    out: &mut [f32],
    kind: u32,
    last_add: bool,
    n: f32,
) -> Result<(), String> {
    let mut hb = [0u8; FRAME_HEADER_LEN];
    link.read(&mut hb)?;
    expect_header(link, &hb, want)?;
    if kind == KIND_ALL_GATHER && link.shm.is_none() {
        return link.read(bytemuck::cast_slice_mut(out));
    }
    let mut at = 0;
    link.read_f32s(out.len(), scratch, &mut |vals| {
        let o = &mut out[at..at + vals.len()];
        at += vals.len();
        if kind == KIND_ALL_GATHER {
            o.copy_from_slice(vals);
        } else if last_add {
            o.iter_mut().zip(vals).for_each(|(o, v)| *o = (*o + v) / n);
        } else {
            o.iter_mut().zip(vals).for_each(|(o, v)| *o += v);
        }
    })
}
