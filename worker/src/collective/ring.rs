//! A CPU all-reduce over a ring of TCP connections: rank `r` sends to rank `r+1` and
//! receives from rank `r-1` (mod world).
//!
//! `all_reduce_mean` splits the buffer into `world` chunks and runs a reduce-scatter
//! (`world-1` steps; afterwards rank `r` owns the full sum of chunk `r+1`, which it divides
//! by `world`) and then an all-gather (`world-1` steps copying the owners' bits), so every
//! rank ends with bitwise identical values. The steps are pipelined piece by piece (pieces
//! of `piece_bytes`); see [`super::pipeline`].
//!
//! All traffic runs on one communication thread per rank that owns the sockets and serves
//! jobs in order. That lets the trainer hand over gradient buckets
//! ([`Collective::start_bucket`]) as backward completes them and keep computing while they
//! travel; [`Collective::finish_buckets`] waits for them and copies the means back.
//!
//! Wire format (all integers little-endian):
//! - Handshake, [`HANDSHAKE_LEN`] bytes: magic `FRNG`, version u16, kind u16
//!   (hello/accept/reject), rank u32, world u32, token u64, shm u64. The connecting
//!   rank sends hello; the accepting rank checks magic, version, the sender's rank (must be
//!   its predecessor), world and the job token, and answers accept or reject. Connections
//!   that fail the check are refused and the acceptor keeps listening until its deadline.
//!   A nonzero `shm` in the hello offers a shared-memory segment for the link's frames
//!   ([`super::shm`]); an accept that echoes it takes the offer, zero keeps the link on TCP
//!   (peers without the same-host path send and answer zero, so they interoperate).
//! - Data frames, a [`FrameHeader`] of [`FRAME_HEADER_LEN`] bytes (kind, op counter,
//!   buffer length, element offset, element count, step) followed by `count` f32 (or f64
//!   for scalars; f32 payloads are sent from and received into the buffer without
//!   conversion, hence the little-endian-only check below). The receiver knows exactly
//!   which header comes next and refuses any other before reading the payload, so a
//!   desynchronised or lying peer is an error.
//!
//! Every socket read and write has a timeout; an error shuts both connections down (so the
//! neighbours fail fast too) and leaves the collective broken.

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::ops::Range;
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use ferrite_kernels::CpuBackend;

use super::pipeline::{why, Link, RingLinks};
use super::shm::{self, Segment};
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
    /// Offer and accept the shared-memory path on links whose two ranks share `/dev/shm`.
    pub shared_memory: bool,
}

impl RingConfig {
    /// Defaults: 30 s I/O timeout, 10 s to connect, 1 MiB pieces, shared memory where the
    /// ranks share a host.
    pub fn new(rank: usize, peers: Vec<SocketAddr>, token: u64) -> Self {
        RingConfig {
            rank,
            peers,
            token,
            io_timeout: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(10),
            piece_bytes: 1 << 20,
            shared_memory: true,
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
    /// Nonce of the offered (hello) or taken (accept) shared-memory segment; 0 for none.
    pub shm: u64,
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
        b[24..32].copy_from_slice(&self.shm.to_le_bytes());
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
            shm: u64::from_le_bytes(b[24..32].try_into().unwrap()),
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

/// Work for the communication thread, answered in order.
enum Job {
    /// All-reduce (mean) of `buf[..len]`.
    Reduce { buf: Vec<f32>, len: usize },
    /// Gather of one number from every rank.
    Scalar(f64),
}

/// The answer to one [`Job`]: the buffer comes back even on error, so its memory is kept.
struct Reply {
    buf: Vec<f32>,
    scalars: Vec<f64>,
    error: Option<String>,
}

/// The thread that owns the sockets and runs the jobs in order.
struct CommThread {
    jobs: Option<mpsc::Sender<Job>>,
    replies: mpsc::Receiver<Reply>,
    thread: Option<JoinHandle<()>>,
    /// Clones of the sockets, to break them when the collective is dropped.
    abort: RingAbort,
}

impl Drop for CommThread {
    fn drop(&mut self) {
        // Closing both connections makes the neighbours fail fast, as a dead rank would.
        self.abort.abort();
        self.jobs.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The ring all-reduce between `world` ranks; see the module docs.
pub struct RingCollective {
    rank: usize,
    world: usize,
    /// `None` when `world == 1`.
    comm: Option<CommThread>,
    /// Set by the first error; every later call fails with it.
    broken: Option<String>,
    /// Buckets started and not yet finished, oldest first: where each goes back in `buf`.
    in_flight: VecDeque<Vec<Range<usize>>>,
    /// Bucket buffers to reuse, so the step loop allocates nothing once warm.
    spare: Vec<Vec<f32>>,
    /// How frames travel, for logs: see [`RingCollective::transport`].
    transport: &'static str,
}

impl RingCollective {
    /// Joins the ring: connects to the next rank (retrying while it starts), accepts the
    /// previous one on `listener`, checks both handshakes and starts the communication
    /// thread.
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
        let mut ring = RingCollective {
            rank,
            world,
            comm: None,
            broken: None,
            in_flight: VecDeque::new(),
            spare: Vec::new(),
            transport: "none",
        };
        if world == 1 {
            return Ok(ring);
        }
        let deadline = Instant::now() + cfg.connect_timeout;
        let (next, prev) = ((rank + 1) % world, (rank + world - 1) % world);
        // The segment this rank's frames to the next rank would travel through.
        let mut segment = None;
        if cfg.shared_memory {
            let nonce = shm::new_nonce();
            segment = match Segment::create(cfg.token, rank, nonce, io_timeout) {
                Ok(s) => Some((s, nonce)),
                Err(e) => {
                    tracing::debug!(error = %e, "no shared-memory segment: the link to the next rank stays on TCP");
                    None
                }
            };
        }
        let hello = Handshake {
            kind: HandshakeKind::Hello,
            rank: rank as u32,
            world: world as u32,
            token: cfg.token,
            shm: segment.as_ref().map_or(0, |s| s.1),
        };
        // Sending our hello before accepting cannot block (it fits the socket buffer), so
        // every rank reaches its accept and the ring cannot deadlock.
        let stream = connect_retry(cfg.peers[next], deadline).map_err(err)?;
        let mut to_next = Link { stream, rank: next, addr: cfg.peers[next], shm: None };
        setup_stream(&to_next.stream, io_timeout)
            .map_err(|e| err(format!("{}: {e}", to_next.name())))?;
        to_next.write(&hello.encode()).map_err(err)?;
        let (from_prev, shm_in) = accept_prev(&listener, &cfg, prev, deadline).map_err(err)?;
        let from_prev = Link { stream: from_prev, rank: prev, addr: cfg.peers[prev], shm: shm_in };
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
        if let Some((mut seg, nonce)) = segment {
            if ack.shm == nonce {
                seg.unlink();
                to_next.shm = Some(seg);
            }
        }
        ring.transport = match (to_next.shm.is_some(), from_prev.shm.is_some()) {
            (true, true) => "shared memory",
            (false, false) => "tcp",
            (true, false) => "shared memory to the next rank, tcp from the previous",
            (false, true) => "tcp to the next rank, shared memory from the previous",
        };
        let links = RingLinks {
            rank,
            world,
            to_next,
            from_prev,
            piece: cfg.piece_bytes / 4,
            scratch: Vec::new(),
        };
        ring.comm = Some(CommThread::start(links).map_err(err)?);
        Ok(ring)
    }

    /// How this rank's frames travel: "tcp", "shared memory" (both links on one host),
    /// a mix of the two, or "none" for a world of one.
    pub fn transport(&self) -> &'static str {
        self.transport
    }

    /// A handle that breaks the ring from another thread: blocked sends and receives on
    /// this rank fail at once (and so, through the closed sockets, do its neighbours').
    pub fn abort_handle(&self) -> Result<RingAbort, WorkerError> {
        let mut streams = Vec::new();
        for s in self.comm.iter().flat_map(|c| &c.abort.streams) {
            let s = s.try_clone().map_err(|e| {
                WorkerError::Collective(format!("rank {}: cloning a ring socket: {e}", self.rank))
            })?;
            streams.push(s);
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

    /// Hands `job` to the communication thread (world > 1).
    fn submit(&mut self, job: Job) -> Result<(), WorkerError> {
        self.check()?;
        let comm = self.comm.as_ref().expect("world > 1 has a communication thread");
        let sent = comm.jobs.as_ref().is_some_and(|j| j.send(job).is_ok());
        if !sent {
            return Err(self.broke("the communication thread has ended".into()));
        }
        Ok(())
    }

    /// The answer to the oldest job not yet answered.
    fn reply(&mut self) -> Result<Reply, WorkerError> {
        let comm = self.comm.as_ref().expect("world > 1 has a communication thread");
        match comm.replies.recv() {
            Ok(r) => Ok(r),
            Err(_) => Err(self.broke("the communication thread has ended".into())),
        }
    }

    /// Records the first error (the thread has already shut both connections down).
    fn broke(&mut self, m: String) -> WorkerError {
        self.broken.get_or_insert(m.clone());
        WorkerError::Collective(m)
    }

    /// Turns a reply's error into the collective's.
    fn raise(&mut self, error: Option<String>) -> Result<(), WorkerError> {
        error.map_or(Ok(()), |m| Err(self.broke(m)))
    }
}

impl CommThread {
    fn start(links: RingLinks) -> Result<Self, String> {
        let clone = |l: &Link| l.stream.try_clone().map_err(|e| format!("{}: {e}", l.name()));
        let abort = RingAbort { streams: vec![clone(&links.to_next)?, clone(&links.from_prev)?] };
        let (jobs, job_rx) = mpsc::channel();
        let (reply_tx, replies) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name(format!("ring-rank-{}", links.rank))
            .spawn(move || serve(links, job_rx, reply_tx))
            .map_err(|e| format!("starting the communication thread: {e}"))?;
        Ok(CommThread { jobs: Some(jobs), replies, thread: Some(thread), abort })
    }
}

/// The communication thread: runs jobs until the collective is dropped; after the first
/// error it shuts both connections down and answers every later job with that error.
fn serve(mut links: RingLinks, jobs: mpsc::Receiver<Job>, replies: mpsc::Sender<Reply>) {
    let mut broken: Option<String> = None;
    let mut op = 0u32;
    for job in jobs {
        op = op.wrapping_add(1);
        let (mut buf, mut scalars, mut error) = (Vec::new(), Vec::new(), broken.clone());
        match job {
            Job::Reduce { buf: b, len } => {
                buf = b;
                if error.is_none() {
                    error = links.all_reduce_mean(&mut buf[..len], op).err();
                }
            }
            Job::Scalar(x) if error.is_none() => match links.gather_scalars(x, op) {
                Ok(v) => scalars = v,
                Err(m) => error = Some(m),
            },
            Job::Scalar(_) => {}
        }
        if broken.is_none() {
            if let Some(m) = &error {
                let m = format!("rank {}: {m}", links.rank);
                links.to_next.shutdown();
                links.from_prev.shutdown();
                broken = Some(m.clone());
                error = Some(m);
            }
        }
        if replies.send(Reply { buf, scalars, error }).is_err() {
            return;
        }
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
) -> Result<(TcpStream, Option<Segment>), String> {
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
                let reason = match &got {
                    Err(m) => Some(m.clone()),
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
                    shm: 0,
                };
                match (reason, got) {
                    (None, Ok(h)) => {
                        setup_stream(&s, cfg.io_timeout).map_err(io)?;
                        // Take the offered segment if it can be mapped from here (it cannot
                        // from another host, or without a shared /dev/shm).
                        let mut seg = None;
                        if cfg.shared_memory && h.shm != 0 {
                            match Segment::open(cfg.token, prev, h.shm, cfg.io_timeout) {
                                Ok(s) => {
                                    seg = Some(s);
                                    answer.shm = h.shm;
                                }
                                Err(m) => tracing::debug!(
                                    offer = m,
                                    "cannot map rank {prev}'s segment: the link stays on TCP"
                                ),
                            }
                        }
                        (&s).write_all(&answer.encode())
                            .map_err(|e| format!("answering rank {prev} ({from}): {}", why(&e)))?;
                        return Ok((s, seg));
                    }
                    (m, _) => {
                        let m = m.unwrap_or_default();
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
        self.no_buckets_in_flight("all_reduce_mean")?;
        // The buffer moves to the communication thread and back: no copy.
        self.submit(Job::Reduce { buf: std::mem::take(buf), len })?;
        let reply = self.reply()?;
        *buf = reply.buf;
        self.raise(reply.error)
    }

    fn mean_scalar(&mut self, x: f64) -> Result<f64, WorkerError> {
        self.check()?;
        if self.world == 1 {
            return Ok(x);
        }
        self.no_buckets_in_flight("mean_scalar")?;
        self.submit(Job::Scalar(x))?;
        let reply = self.reply()?;
        self.raise(reply.error)?;
        // Summed in rank order on every rank, so every rank gets the same bits.
        Ok(reply.scalars.iter().sum::<f64>() / self.world as f64)
    }

    fn start_bucket(
        &mut self,
        _be: &CpuBackend,
        buf: &Vec<f32>,
        ranges: &[Range<usize>],
    ) -> Result<(), WorkerError> {
        self.check()?;
        if self.world == 1 {
            return Ok(());
        }
        // Copied out (one memcpy of the bucket) so backward can go on writing `buf`.
        let mut staged = self.spare.pop().unwrap_or_default();
        staged.clear();
        for r in ranges {
            staged.extend_from_slice(&buf[r.clone()]);
        }
        let len = staged.len();
        self.submit(Job::Reduce { buf: staged, len })?;
        self.in_flight.push_back(ranges.to_vec());
        Ok(())
    }

    fn finish_buckets(
        &mut self,
        _be: &CpuBackend,
        buf: &mut Vec<f32>,
        _len: usize,
    ) -> Result<(), WorkerError> {
        self.check()?;
        let mut first_err = None;
        while let Some(ranges) = self.in_flight.pop_front() {
            let reply = self.reply()?;
            if let Err(e) = self.raise(reply.error) {
                first_err.get_or_insert(e);
            }
            let staged = reply.buf;
            if first_err.is_none() {
                let mut at = 0;
                for r in ranges {
                    buf[r.clone()].copy_from_slice(&staged[at..at + r.len()]);
                    at += r.len();
                }
            }
            self.spare.push(staged);
        }
        first_err.map_or(Ok(()), Err)
    }
}

impl RingCollective {
    /// Jobs run in order, so a call between `start_bucket` and `finish_buckets` would be
    /// answered before the buckets' results are collected; refuse it instead.
    fn no_buckets_in_flight(&self, what: &str) -> Result<(), WorkerError> {
        if self.in_flight.is_empty() {
            return Ok(());
        }
        Err(WorkerError::Collective(format!(
            "rank {}: {what} while {} buckets are in flight (call finish_buckets first)",
            self.rank,
            self.in_flight.len()
        )))
    }
}
