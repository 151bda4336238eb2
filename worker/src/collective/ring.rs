//! A CPU all-reduce over a ring of TCP connections: rank `r` sends to rank `r+1` and
//! receives from rank `r-1` (mod world).
//!
//! `all_reduce_mean` splits the buffer into `world` chunks and runs a reduce-scatter
//! (`world-1` steps; afterwards rank `r` owns the full sum of chunk `r+1`, which it divides
//! by `world`) and then an all-gather (`world-1` steps copying the owners' bits), so every
//! rank ends with bitwise identical values. In each step a scoped thread sends one chunk
//! while the caller's thread receives and adds the other, both in pieces of
//! `piece_bytes`, so sending, receiving and adding overlap.
//!
//! Wire format (all integers little-endian):
//! - Handshake, [`HANDSHAKE_LEN`] bytes: magic `FRNG`, version u16, kind u16
//!   (hello/accept/reject), rank u32, world u32, token u64, 8 zero bytes. The connecting
//!   rank sends hello; the accepting rank checks magic, version, the sender's rank (must be
//!   its predecessor), world and the job token, and answers accept or reject. Connections
//!   that fail the check are refused and the acceptor keeps listening until its deadline.
//! - Data frames, a [`FrameHeader`] of [`FRAME_HEADER_LEN`] bytes (kind, op counter,
//!   buffer length, element offset, element count, step) followed by `count` f32 (or f64
//!   for scalars; f32 payloads are sent from and received into the buffer without
//!   conversion, hence the little-endian-only check below). The receiver knows exactly
//!   which header comes next and refuses any other before reading the payload, so a
//!   desynchronised or lying peer is an error.
//!
//! Every socket read and write has a timeout; an error shuts both connections down (so the
//! neighbours fail fast too) and leaves the collective broken.

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use ferrite_kernels::CpuBackend;

use super::Collective;
use crate::WorkerError;

// f32 payloads go on the wire as the buffer's own bytes, which are little-endian only here.
#[cfg(not(target_endian = "little"))]
compile_error!("the ring's wire format is little-endian; add byte swapping for this target");

pub const MAGIC: [u8; 4] = *b"FRNG";
pub const VERSION: u16 = 1;
pub const HANDSHAKE_LEN: usize = 32;
pub const FRAME_HEADER_LEN: usize = 32;

/// Frame kinds.
pub const KIND_REDUCE_SCATTER: u32 = 1;
pub const KIND_ALL_GATHER: u32 = 2;
pub const KIND_SCALAR: u32 = 3;

/// How one rank joins the ring.
#[derive(Clone, Debug)]
pub struct RingConfig {
    pub rank: usize,
    /// Listening address of every rank, indexed by rank; its length is the world size.
    pub peers: Vec<SocketAddr>,
    /// Identifies the job and attempt; peers with another token are refused.
    pub token: u64,
    /// Limit on every socket read and write once the ring is up.
    pub io_timeout: Duration,
    /// How long to keep retrying the connection to the next rank and waiting for the
    /// previous one while peers start.
    pub connect_timeout: Duration,
    /// Size of the pieces a chunk is sent in (a multiple of 4).
    pub piece_bytes: usize,
}

impl RingConfig {
    /// Defaults: 30 s I/O timeout, 10 s to connect, 1 MiB pieces.
    pub fn new(rank: usize, peers: Vec<SocketAddr>, token: u64) -> Self {
        RingConfig {
            rank,
            peers,
            token,
            io_timeout: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(10),
            piece_bytes: 1 << 20,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HandshakeKind {
    Hello = 0,
    Accept = 1,
    Reject = 2,
}

/// One handshake message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Handshake {
    pub kind: HandshakeKind,
    pub rank: u32,
    pub world: u32,
    pub token: u64,
}

impl Handshake {
    pub fn encode(&self) -> [u8; HANDSHAKE_LEN] {
        let mut b = [0u8; HANDSHAKE_LEN];
        b[0..4].copy_from_slice(&MAGIC);
        b[4..6].copy_from_slice(&VERSION.to_le_bytes());
        b[6..8].copy_from_slice(&(self.kind as u16).to_le_bytes());
        b[8..12].copy_from_slice(&self.rank.to_le_bytes());
        b[12..16].copy_from_slice(&self.world.to_le_bytes());
        b[16..24].copy_from_slice(&self.token.to_le_bytes());
        b
    }

    pub fn decode(b: &[u8; HANDSHAKE_LEN]) -> Result<Self, String> {
        if b[0..4] != MAGIC {
            return Err(format!("bad magic {:02x?}", &b[0..4]));
        }
        let version = u16::from_le_bytes([b[4], b[5]]);
        if version != VERSION {
            return Err(format!("protocol version {version}, expected {VERSION}"));
        }
        let kind = match u16::from_le_bytes([b[6], b[7]]) {
            0 => HandshakeKind::Hello,
            1 => HandshakeKind::Accept,
            2 => HandshakeKind::Reject,
            k => return Err(format!("unknown handshake kind {k}")),
        };
        Ok(Handshake {
            kind,
            rank: u32::from_le_bytes(b[8..12].try_into().unwrap()),
            world: u32::from_le_bytes(b[12..16].try_into().unwrap()),
            token: u64::from_le_bytes(b[16..24].try_into().unwrap()),
        })
    }
}

/// Header of one data frame; `count` elements follow.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FrameHeader {
    pub kind: u32,
    /// Counter of collective calls on this ring (wrapping).
    pub op: u32,
    /// Length of the whole buffer being reduced (world for scalars).
    pub len: u64,
    /// Offset of the first element in the buffer.
    pub offset: u64,
    pub count: u32,
    pub step: u32,
}

impl FrameHeader {
    pub fn encode(&self) -> [u8; FRAME_HEADER_LEN] {
        let mut b = [0u8; FRAME_HEADER_LEN];
        b[0..4].copy_from_slice(&self.kind.to_le_bytes());
        b[4..8].copy_from_slice(&self.op.to_le_bytes());
        b[8..16].copy_from_slice(&self.len.to_le_bytes());
        b[16..24].copy_from_slice(&self.offset.to_le_bytes());
        b[24..28].copy_from_slice(&self.count.to_le_bytes());
        b[28..32].copy_from_slice(&self.step.to_le_bytes());
        b
    }

    pub fn decode(b: &[u8; FRAME_HEADER_LEN]) -> Self {
        let u32_at = |i: usize| u32::from_le_bytes(b[i..i + 4].try_into().unwrap());
        let u64_at = |i: usize| u64::from_le_bytes(b[i..i + 8].try_into().unwrap());
        FrameHeader {
            kind: u32_at(0),
            op: u32_at(4),
            len: u64_at(8),
            offset: u64_at(16),
            count: u32_at(24),
            step: u32_at(28),
        }
    }
}

/// One connection and the peer it leads to, for error messages.
struct Link {
    stream: TcpStream,
    rank: usize,
    /// The peer's listening address from the rendezvous.
    addr: SocketAddr,
}

impl Link {
    fn name(&self) -> String {
        format!("rank {} ({})", self.rank, self.addr)
    }

    fn write(&self, bytes: &[u8]) -> Result<(), String> {
        (&self.stream)
            .write_all(bytes)
            .map_err(|e| format!("sending to {}: {}", self.name(), why(&e)))
    }

    fn read(&self, bytes: &mut [u8]) -> Result<(), String> {
        (&self.stream)
            .read_exact(bytes)
            .map_err(|e| format!("receiving from {}: {}", self.name(), why(&e)))
    }

    fn shutdown(&self) {
        let _ = self.stream.shutdown(Shutdown::Both);
    }
}

/// Names the common failures plainly.
fn why(e: &io::Error) -> String {
    match e.kind() {
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => "timed out".into(),
        io::ErrorKind::UnexpectedEof => "connection closed by peer".into(),
        _ => e.to_string(),
    }
}

/// Element range of chunk `c` of `len` elements split into `world` near-equal chunks.
fn chunk_range(len: usize, world: usize, c: usize) -> (usize, usize) {
    (c * len / world, (c + 1) * len / world)
}

/// Breaks a [`RingCollective`]'s connections from outside its thread (job cancelled).
pub struct RingAbort {
    streams: Vec<TcpStream>,
}

impl RingAbort {
    pub fn abort(&self) {
        for s in &self.streams {
            let _ = s.shutdown(Shutdown::Both);
        }
    }
}

/// The ring all-reduce between `world` ranks; see the module docs.
pub struct RingCollective {
    rank: usize,
    world: usize,
    /// `(to next rank, from previous rank)`; `None` when `world == 1`.
    links: Option<(Link, Link)>,
    /// Elements per piece.
    piece: usize,
    op: u32,
    /// Set by the first error; every later call fails with it.
    broken: Option<String>,
    /// Received values waiting to be added in (reduce-scatter).
    recv_scratch: Vec<f32>,
}

impl RingCollective {
    /// Joins the ring: connects to the next rank (retrying while it starts), accepts the
    /// previous one on `listener`, and checks both handshakes.
    pub fn connect(listener: TcpListener, cfg: RingConfig) -> Result<Self, WorkerError> {
        let world = cfg.peers.len();
        let (rank, io_timeout) = (cfg.rank, cfg.io_timeout);
        let err = |m: String| WorkerError::Collective(format!("rank {rank}: {m}"));
        if rank >= world || world > u32::MAX as usize {
            return Err(err(format!("rank {rank} is not in a world of {world}")));
        }
        if cfg.piece_bytes < 4
            || !cfg.piece_bytes.is_multiple_of(4)
            || cfg.piece_bytes > u32::MAX as usize
        {
            return Err(err(format!(
                "piece_bytes {} is not a positive multiple of 4",
                cfg.piece_bytes
            )));
        }
        if io_timeout.is_zero() {
            return Err(err("io_timeout must be positive".into()));
        }
        let piece = cfg.piece_bytes / 4;
        let mut ring = RingCollective {
            rank,
            world,
            links: None,
            piece,
            op: 0,
            broken: None,
            recv_scratch: Vec::new(),
        };
        if world == 1 {
            return Ok(ring);
        }
        let deadline = Instant::now() + cfg.connect_timeout;
        let (next, prev) = ((rank + 1) % world, (rank + world - 1) % world);
        let hello = Handshake {
            kind: HandshakeKind::Hello,
            rank: rank as u32,
            world: world as u32,
            token: cfg.token,
        };
        // Sending our hello before accepting cannot block (it fits the socket buffer), so
        // every rank reaches its accept and the ring cannot deadlock.
        let stream = connect_retry(cfg.peers[next], deadline).map_err(err)?;
        let to_next = Link { stream, rank: next, addr: cfg.peers[next] };
        setup_stream(&to_next.stream, io_timeout)
            .map_err(|e| err(format!("{}: {e}", to_next.name())))?;
        to_next.write(&hello.encode()).map_err(err)?;
        let from_prev = accept_prev(&listener, &cfg, prev, deadline).map_err(err)?;
        let from_prev = Link { stream: from_prev, rank: prev, addr: cfg.peers[prev] };
        // The next rank answers once it reaches its own accept, so wait up to the deadline.
        let wait = deadline.saturating_duration_since(Instant::now()).max(io_timeout);
        to_next.stream.set_read_timeout(Some(wait)).map_err(|e| err(e.to_string()))?;
        let mut b = [0u8; HANDSHAKE_LEN];
        to_next.read(&mut b).map_err(err)?;
        to_next.stream.set_read_timeout(Some(io_timeout)).map_err(|e| err(e.to_string()))?;
        let ack = Handshake::decode(&b)
            .map_err(|m| err(format!("{} answered the handshake with {m}", to_next.name())))?;
        if ack.kind != HandshakeKind::Accept
            || ack.rank as usize != next
            || ack.world != hello.world
        {
            return Err(err(format!(
                "{} refused the handshake or is not rank {next} of {world}: answered {:?} as rank \
                 {} of {}",
                to_next.name(),
                ack.kind,
                ack.rank,
                ack.world
            )));
        }
        ring.links = Some((to_next, from_prev));
        Ok(ring)
    }

    /// A handle that breaks the ring from another thread: blocked sends and receives on
    /// this rank fail at once (and so, through the closed sockets, do its neighbours').
    pub fn abort_handle(&self) -> Result<RingAbort, WorkerError> {
        let mut streams = Vec::new();
        if let Some((a, b)) = &self.links {
            for link in [a, b] {
                let s = link.stream.try_clone().map_err(|e| {
                    WorkerError::Collective(format!("rank {}: {}: {e}", self.rank, link.name()))
                })?;
                streams.push(s);
            }
        }
        Ok(RingAbort { streams })
    }

    fn check(&self) -> Result<(), WorkerError> {
        match &self.broken {
            Some(m) => {
                Err(WorkerError::Collective(format!("ring broken by an earlier error: {m}")))
            }
            None => Ok(()),
        }
    }

    /// Records the first error, shuts both connections down and returns the error.
    fn fail(&mut self, m: String) -> WorkerError {
        let m = format!("rank {}: {m}", self.rank);
        if let Some((a, b)) = &self.links {
            a.shutdown();
            b.shutdown();
        }
        self.broken = Some(m.clone());
        WorkerError::Collective(m)
    }

    fn reduce(&mut self, buf: &mut [f32]) -> Result<(), String> {
        let (r, w) = (self.rank, self.world);
        for step in 0..w - 1 {
            let send = (r + w - step) % w;
            let recv = (r + 2 * w - step - 1) % w;
            self.exchange(buf, KIND_REDUCE_SCATTER, step, send, recv)?;
        }
        let (lo, hi) = chunk_range(buf.len(), w, (r + 1) % w);
        let n = w as f32;
        buf[lo..hi].iter_mut().for_each(|v| *v /= n);
        for step in 0..w - 1 {
            let send = (r + 1 + w - step) % w;
            let recv = (r + w - step) % w;
            self.exchange(buf, KIND_ALL_GATHER, step, send, recv)?;
        }
        Ok(())
    }

    /// Sends chunk `send` to the next rank while receiving chunk `recv` from the previous one
    /// (added in for reduce-scatter, copied for all-gather).
    fn exchange(
        &mut self,
        buf: &mut [f32],
        kind: u32,
        step: usize,
        send: usize,
        recv: usize,
    ) -> Result<(), String> {
        let (len, w, piece) = (buf.len(), self.world, self.piece);
        let base = FrameHeader {
            kind,
            op: self.op,
            len: len as u64,
            offset: 0,
            count: 0,
            step: step as u32,
        };
        let (slo, shi) = chunk_range(len, w, send);
        let (rlo, rhi) = chunk_range(len, w, recv);
        // Chunks `send` and `recv` differ and ranges grow with the chunk index, so the lower
        // chunk ends where (or before) the higher one starts, even when one is empty.
        let (sdata, rdata) = if send < recv {
            let (a, b) = buf.split_at_mut(rlo);
            (&a[slo..shi], &mut b[..rhi - rlo])
        } else {
            let (a, b) = buf.split_at_mut(slo);
            (&b[..shi - slo], &mut a[rlo..rhi])
        };
        let (to_next, from_prev) = self.links.as_ref().expect("world > 1 has links");
        let rscr = &mut self.recv_scratch;
        let first: Mutex<Option<String>> = Mutex::new(None);
        // Whichever side fails first is the cause; it shuts both sockets so the other side
        // (blocked in a read or write) fails at once instead of waiting for its timeout.
        let record = |m: String| {
            let mut f = first.lock().unwrap_or_else(|p| p.into_inner());
            f.get_or_insert(m);
            to_next.shutdown();
            from_prev.shutdown();
        };
        std::thread::scope(|s| {
            let sender = s.spawn(|| {
                if let Err(m) = send_f32(to_next, base, sdata, slo, piece) {
                    record(m);
                }
            });
            if let Err(m) =
                recv_f32(from_prev, rscr, base, rdata, rlo, piece, kind == KIND_REDUCE_SCATTER)
            {
                record(m);
            }
            if sender.join().is_err() {
                record("sender thread panicked".into());
            }
        });
        match first.into_inner().unwrap_or_else(|p| p.into_inner()) {
            Some(m) => Err(m),
            None => Ok(()),
        }
    }

    fn gather_scalars(&mut self, x: f64) -> Result<Vec<f64>, String> {
        let (r, w) = (self.rank, self.world);
        let (to_next, from_prev) = self.links.as_ref().expect("world > 1 has links");
        let mut vals = vec![0.0f64; w];
        vals[r] = x;
        for step in 0..w - 1 {
            let (send, recv) = ((r + w - step) % w, (r + 2 * w - step - 1) % w);
            let h = |i: usize| FrameHeader {
                kind: KIND_SCALAR,
                op: self.op,
                len: w as u64,
                offset: i as u64,
                count: 1,
                step: step as u32,
            };
            // 40 bytes fit any socket buffer, so send-then-receive cannot deadlock.
            let mut frame = h(send).encode().to_vec();
            frame.extend_from_slice(&vals[send].to_le_bytes());
            to_next.write(&frame)?;
            let mut b = [0u8; FRAME_HEADER_LEN];
            from_prev.read(&mut b)?;
            expect_header(from_prev, &b, h(recv))?;
            let mut v = [0u8; 8];
            from_prev.read(&mut v)?;
            vals[recv] = f64::from_le_bytes(v);
        }
        Ok(vals)
    }
}

fn setup_stream(s: &TcpStream, timeout: Duration) -> io::Result<()> {
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))
}

/// Connects to `addr`, retrying refused connections until `deadline`.
fn connect_retry(addr: SocketAddr, deadline: Instant) -> Result<TcpStream, String> {
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match TcpStream::connect_timeout(
            &addr,
            left.clamp(Duration::from_millis(10), Duration::from_secs(1)),
        ) {
            Ok(s) => return Ok(s),
            Err(e) if Instant::now() >= deadline => {
                return Err(format!("could not connect to the next rank at {addr}: {e}"))
            }
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

/// Accepts connections until one carries a valid hello from rank `prev`; refuses others.
fn accept_prev(
    listener: &TcpListener,
    cfg: &RingConfig,
    prev: usize,
    deadline: Instant,
) -> Result<TcpStream, String> {
    let world = cfg.peers.len();
    let io = |e: io::Error| format!("listener: {e}");
    listener.set_nonblocking(true).map_err(io)?;
    let mut refused: Vec<String> = Vec::new();
    loop {
        match listener.accept() {
            Ok((s, from)) => {
                s.set_nonblocking(false).map_err(io)?;
                // A silent connection may hold us at most until the deadline (or io_timeout).
                let left = deadline.saturating_duration_since(Instant::now());
                let wait = left.max(Duration::from_millis(100)).min(cfg.io_timeout);
                setup_stream(&s, wait).map_err(io)?;
                let mut b = [0u8; HANDSHAKE_LEN];
                let got = (&s)
                    .read_exact(&mut b)
                    .map_err(|e| why(&e))
                    .and_then(|()| Handshake::decode(&b));
                let reason = match got {
                    Err(m) => Some(m),
                    Ok(h) if h.kind != HandshakeKind::Hello => {
                        Some(format!("sent {:?} instead of hello", h.kind))
                    }
                    Ok(h) if h.rank as usize != prev || h.world as usize != world => Some(format!(
                        "claims rank {} of world {}, expected rank {prev} of {world}",
                        h.rank, h.world
                    )),
                    Ok(h) if h.token != cfg.token => Some("job token does not match".to_string()),
                    Ok(_) => None,
                };
                let mut answer = Handshake {
                    kind: HandshakeKind::Accept,
                    rank: cfg.rank as u32,
                    world: world as u32,
                    token: cfg.token,
                };
                match reason {
                    None => {
                        setup_stream(&s, cfg.io_timeout).map_err(io)?;
                        (&s).write_all(&answer.encode())
                            .map_err(|e| format!("answering rank {prev} ({from}): {}", why(&e)))?;
                        return Ok(s);
                    }
                    Some(m) => {
                        answer.kind = HandshakeKind::Reject;
                        answer.token = 0;
                        let _ = (&s).write_all(&answer.encode());
                        refused.push(format!("{from} ({m})"));
                    }
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                if Instant::now() >= deadline {
                    let mut m = format!(
                        "no valid connection from rank {prev} ({}) within {:?}",
                        cfg.peers[prev], cfg.connect_timeout
                    );
                    if !refused.is_empty() {
                        m += &format!("; refused {}", refused.join(", "));
                    }
                    return Err(m);
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) => return Err(io(e)),
        }
    }
}

fn expect_header(link: &Link, b: &[u8; FRAME_HEADER_LEN], want: FrameHeader) -> Result<(), String> {
    let got = FrameHeader::decode(b);
    if got != want {
        return Err(format!("{} sent frame {got:?}, expected {want:?}", link.name()));
    }
    Ok(())
}

/// Sends `data` (elements `offset..` of the buffer) in frames of at most `piece` elements; an
/// empty chunk still sends one empty frame so both sides agree on the frame count.
fn send_f32(
    link: &Link,
    base: FrameHeader,
    data: &[f32],
    offset: usize,
    piece: usize,
) -> Result<(), String> {
    let n_pieces = data.len().div_ceil(piece).max(1);
    for p in 0..n_pieces {
        let (lo, hi) = (p * piece, ((p + 1) * piece).min(data.len()));
        let h = FrameHeader { offset: (offset + lo) as u64, count: (hi - lo) as u32, ..base };
        link.write(&h.encode())?;
        link.write(bytemuck::cast_slice(&data[lo..hi]))?;
    }
    Ok(())
}

/// Receives the frames [`send_f32`] sends for `out`, adding (`add`) or copying the values.
fn recv_f32(
    link: &Link,
    scratch: &mut Vec<f32>,
    base: FrameHeader,
    out: &mut [f32],
    offset: usize,
    piece: usize,
    add: bool,
) -> Result<(), String> {
    let n_pieces = out.len().div_ceil(piece).max(1);
    for p in 0..n_pieces {
        let (lo, hi) = (p * piece, ((p + 1) * piece).min(out.len()));
        let mut hb = [0u8; FRAME_HEADER_LEN];
        link.read(&mut hb)?;
        let want = FrameHeader { offset: (offset + lo) as u64, count: (hi - lo) as u32, ..base };
        expect_header(link, &hb, want)?;
        if add {
            scratch.resize(hi - lo, 0.0);
            link.read(bytemuck::cast_slice_mut(scratch))?;
            out[lo..hi].iter_mut().zip(scratch.iter()).for_each(|(o, v)| *o += v);
        } else {
            // The owner's bits land directly in the buffer.
            link.read(bytemuck::cast_slice_mut(&mut out[lo..hi]))?;
        }
    }
    Ok(())
}

impl Collective<CpuBackend> for RingCollective {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world(&self) -> usize {
        self.world
    }

    fn all_reduce_mean(
        &mut self,
        _be: &CpuBackend,
        buf: &mut Vec<f32>,
        len: usize,
    ) -> Result<(), WorkerError> {
        self.check()?;
        if len > buf.len() {
            return Err(WorkerError::Collective(format!(
                "all_reduce_mean of {len} elements on a buffer of {}",
                buf.len()
            )));
        }
        if self.world == 1 {
            return Ok(());
        }
        self.op = self.op.wrapping_add(1);
        self.reduce(&mut buf[..len]).map_err(|m| self.fail(m))
    }

    fn mean_scalar(&mut self, x: f64) -> Result<f64, WorkerError> {
        self.check()?;
        if self.world == 1 {
            return Ok(x);
        }
        self.op = self.op.wrapping_add(1);
        let vals = self.gather_scalars(x).map_err(|m| self.fail(m))?;
        // Summed in rank order on every rank, so every rank gets the same bits.
        Ok(vals.iter().sum::<f64>() / self.world as f64)
    }
}
