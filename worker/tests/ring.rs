//! The TCP ring all-reduce, with ranks as threads of this process on 127.0.0.1.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::thread;
use std::time::{Duration, Instant};

use ferrite_kernels::CpuBackend;
use ferrite_worker::collective::ring::{
    FrameHeader, Handshake, HandshakeKind, FRAME_HEADER_LEN, HANDSHAKE_LEN, KIND_REDUCE_SCATTER,
};
use ferrite_worker::collective::{Bucketer, RingCollective, RingConfig};
use ferrite_worker::Collective;

const TOKEN: u64 = 0x5eed_1234;

fn listeners(world: usize) -> (Vec<TcpListener>, Vec<SocketAddr>) {
    let ls: Vec<TcpListener> =
        (0..world).map(|_| TcpListener::bind("127.0.0.1:0").unwrap()).collect();
    let addrs = ls.iter().map(|l| l.local_addr().unwrap()).collect();
    (ls, addrs)
}

fn config(rank: usize, peers: &[SocketAddr], timeout: Duration) -> RingConfig {
    RingConfig {
        io_timeout: timeout,
        connect_timeout: timeout,
        ..RingConfig::new(rank, peers.to_vec(), TOKEN)
    }
}

/// Rank `r`'s input: positive values, so the mean has no cancellation.
fn input(rank: usize, len: usize) -> Vec<f32> {
    (0..len).map(|i| 1.0 + ((i * 31 + rank * 17) % 97) as f32 / 97.0 + rank as f32).collect()
}

/// Runs `world` real ranks on `len` elements, over the same-host shared-memory path or over
/// TCP only; returns every rank's result and its mean_scalar.
fn run_ring(world: usize, len: usize, piece_bytes: usize, shm: bool) -> Vec<(Vec<f32>, f64)> {
    let (ls, addrs) = listeners(world);
    let handles: Vec<_> = ls
        .into_iter()
        .enumerate()
        .map(|(rank, l)| {
            let cfg = RingConfig {
                piece_bytes,
                shared_memory: shm,
                ..config(rank, &addrs, Duration::from_secs(20))
            };
            thread::spawn(move || {
                let be = CpuBackend::new(1).unwrap();
                let mut ring = RingCollective::connect(l, cfg).unwrap();
                assert_eq!((ring.rank(), Collective::<CpuBackend>::world(&ring)), (rank, world));
                assert_eq!(ring.transport(), if shm { "shared memory" } else { "tcp" });
                let mut buf = input(rank, len);
                buf.extend_from_slice(&[-7.0; 3]); // past `len`: must stay untouched
                ring.all_reduce_mean(&be, &mut buf, len).unwrap();
                assert_eq!(&buf[len..], &[-7.0; 3]);
                buf.truncate(len);
                let s = Collective::<CpuBackend>::mean_scalar(&mut ring, 0.1 * rank as f64 + 1.0)
                    .unwrap();
                (buf, s)
            })
        })
        .collect();
    handles.into_iter().map(|h| h.join().unwrap()).collect()
}

/// Both paths: the mean on every rank, the same bits on every rank and on both paths.
fn assert_mean_and_bitwise_identical(world: usize, len: usize, piece_bytes: usize) {
    let out = run_ring(world, len, piece_bytes, true);
    let tcp = run_ring(world, len, piece_bytes, false);
    let same = tcp[0].0.iter().zip(&out[0].0).all(|(a, b)| a.to_bits() == b.to_bits());
    assert!(same, "tcp and shared memory differ (world {world}, len {len})");
    let inputs: Vec<Vec<f32>> = (0..world).map(|r| input(r, len)).collect();
    for i in 0..len {
        let want = inputs.iter().map(|x| x[i] as f64).sum::<f64>() / world as f64;
        let got = out[0].0[i] as f64;
        assert!(((got - want) / want).abs() <= 1e-6, "elem {i}: {got} vs {want}");
    }
    let want_s = (0..world).map(|r| 0.1 * r as f64 + 1.0).sum::<f64>() / world as f64;
    assert!((out[0].1 - want_s).abs() <= 1e-12);
    for (r, (buf, s)) in out.iter().enumerate() {
        let same = buf.iter().zip(&out[0].0).all(|(a, b)| a.to_bits() == b.to_bits());
        assert!(same, "rank {r} differs bitwise from rank 0 (world {world}, len {len})");
        assert_eq!(s.to_bits(), out[0].1.to_bits(), "rank {r} mean_scalar differs");
    }
}

#[test]
fn two_ranks_give_the_mean_bitwise_identical_on_every_rank() {
    assert_mean_and_bitwise_identical(2, 100_000, 1 << 16);
}

#[test]
fn three_ranks_give_the_mean_bitwise_identical_on_every_rank() {
    assert_mean_and_bitwise_identical(3, 100_000, 1 << 16);
}

#[test]
fn odd_lengths_including_fewer_elements_than_ranks_reduce_correctly() {
    for world in [2, 3] {
        for len in [1, 7, 1_000_003] {
            assert_mean_and_bitwise_identical(world, len, 1 << 20);
        }
    }
}

#[test]
fn pieces_of_one_element_still_reduce_correctly() {
    assert_mean_and_bitwise_identical(3, 11, 4);
}

#[test]
fn world_of_one_is_a_no_op() {
    let (mut ls, addrs) = listeners(1);
    let mut ring =
        RingCollective::connect(ls.remove(0), config(0, &addrs, Duration::from_secs(1))).unwrap();
    let be = CpuBackend::new(1).unwrap();
    let mut buf = input(0, 5);
    ring.all_reduce_mean(&be, &mut buf, 5).unwrap();
    assert_eq!(buf, input(0, 5));
    assert_eq!(Collective::<CpuBackend>::mean_scalar(&mut ring, 2.5).unwrap(), 2.5);
}

fn hello(rank: u32, world: u32, token: u64) -> [u8; HANDSHAKE_LEN] {
    Handshake { kind: HandshakeKind::Hello, rank, world, token, shm: 0 }.encode()
}

#[test]
fn garbage_handshake_is_refused_with_an_error_naming_the_sender() {
    let (mut ls, addrs) = listeners(2);
    let l0 = ls.remove(0); // rank 1's listener stays bound but nobody answers on it
    let t = thread::spawn({
        let addrs = addrs.clone();
        move || RingCollective::connect(l0, config(0, &addrs, Duration::from_secs(1)))
    });
    let mut bad = TcpStream::connect(addrs[0]).unwrap();
    let bad_addr = bad.local_addr().unwrap();
    bad.write_all(&[0xAB; HANDSHAKE_LEN]).unwrap();
    let err = t.join().unwrap().err().expect("garbage must be refused").to_string();
    assert!(err.contains(&bad_addr.to_string()), "{err}");
    assert!(err.contains("bad magic"), "{err}");
    assert!(err.contains(&format!("rank 1 ({})", addrs[1])), "{err}");
}

#[test]
fn wrong_token_is_rejected_and_the_real_ring_still_forms() {
    let (ls, addrs) = listeners(2);
    let mut ls = ls.into_iter();
    let (l0, l1) = (ls.next().unwrap(), ls.next().unwrap());
    let cfg0 = config(0, &addrs, Duration::from_secs(10));
    let r0 = thread::spawn(move || RingCollective::connect(l0, cfg0));
    // An impostor from another job claims to be rank 1.
    let mut bad = TcpStream::connect(addrs[0]).unwrap();
    bad.write_all(&hello(1, 2, TOKEN + 1)).unwrap();
    let mut b = [0u8; HANDSHAKE_LEN];
    bad.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    bad.read_exact(&mut b).unwrap();
    assert_eq!(Handshake::decode(&b).unwrap().kind, HandshakeKind::Reject);
    let cfg1 = config(1, &addrs, Duration::from_secs(10));
    let r1 = thread::spawn(move || RingCollective::connect(l1, cfg1));
    let mut rings = [r0.join().unwrap().unwrap(), r1.join().unwrap().unwrap()];
    let [a, b] = &mut rings;
    let (sa, sb) = thread::scope(|s| {
        let ha = s.spawn(|| Collective::<CpuBackend>::mean_scalar(a, 1.0).unwrap());
        let hb = s.spawn(|| Collective::<CpuBackend>::mean_scalar(b, 2.0).unwrap());
        (ha.join().unwrap(), hb.join().unwrap())
    });
    assert_eq!((sa, sb), (1.5, 1.5));
}

#[test]
fn next_rank_answering_the_handshake_with_garbage_is_an_error_naming_it() {
    let (ls, addrs) = listeners(2);
    let mut ls = ls.into_iter();
    let (l0, l1) = (ls.next().unwrap(), ls.next().unwrap());
    let cfg = config(0, &addrs, Duration::from_secs(10));
    let r0 = thread::spawn(move || RingCollective::connect(l0, cfg));
    // Rank 1's address is held by something that speaks a valid hello but answers garbage.
    let mut out = TcpStream::connect(addrs[0]).unwrap();
    out.write_all(&hello(1, 2, TOKEN)).unwrap();
    let (mut inc, _) = l1.accept().unwrap();
    let mut b = [0u8; HANDSHAKE_LEN];
    inc.read_exact(&mut b).unwrap();
    inc.write_all(&[0xEE; HANDSHAKE_LEN]).unwrap();
    let err = r0.join().unwrap().err().expect("garbage answer must be refused").to_string();
    assert!(err.contains(&format!("rank 1 ({})", addrs[1])), "{err}");
    assert!(err.contains("bad magic"), "{err}");
}

/// A hand-written rank 1 of a world of 2 that completes the handshake with the real rank 0
/// at `addrs[0]`; returns (to rank 0, from rank 0).
fn fake_rank1(l1: &TcpListener, addrs: &[SocketAddr]) -> (TcpStream, TcpStream) {
    let (out, inc, _) = fake_rank1_offering(l1, addrs, 0);
    (out, inc)
}

/// [`fake_rank1`] whose hello offers shared-memory segment `offer`; also returns rank 0's
/// answer to the hello.
fn fake_rank1_offering(
    l1: &TcpListener,
    addrs: &[SocketAddr],
    offer: u64,
) -> (TcpStream, TcpStream, Handshake) {
    let mut out = TcpStream::connect(addrs[0]).unwrap();
    let ours = Handshake { shm: offer, ..Handshake::decode(&hello(1, 2, TOKEN)).unwrap() };
    out.write_all(&ours.encode()).unwrap();
    let (mut inc, _) = l1.accept().unwrap();
    let mut b = [0u8; HANDSHAKE_LEN];
    inc.read_exact(&mut b).unwrap();
    // Rank 0 may offer a shared-memory segment; answering 0 keeps the link on TCP.
    let got = Handshake { shm: 0, ..Handshake::decode(&b).unwrap() };
    assert_eq!(got, Handshake::decode(&hello(0, 2, TOKEN)).unwrap());
    let accept = Handshake { kind: HandshakeKind::Accept, rank: 1, world: 2, token: TOKEN, shm: 0 };
    inc.write_all(&accept.encode()).unwrap();
    out.read_exact(&mut b).unwrap();
    let answer = Handshake::decode(&b).unwrap();
    assert_eq!(answer.kind, HandshakeKind::Accept);
    (out, inc, answer)
}

/// Rank 0 of a world of 2 against a fake rank 1 that runs `fake`; returns rank 0's error
/// message and how long its all-reduce took.
fn rank0_against_fake(
    timeout: Duration,
    fake: impl FnOnce(TcpStream, TcpStream) + Send + 'static,
) -> (String, Duration) {
    let (ls, addrs) = listeners(2);
    let mut ls = ls.into_iter();
    let (l0, l1) = (ls.next().unwrap(), ls.next().unwrap());
    let cfg = RingConfig { piece_bytes: 1024, ..config(0, &addrs, timeout) };
    let r0 = thread::spawn(move || {
        let mut ring = RingCollective::connect(l0, cfg).unwrap();
        let mut buf = input(0, 10_000);
        let t0 = Instant::now();
        let res = ring.all_reduce_mean(&CpuBackend::new(1).unwrap(), &mut buf, 10_000);
        (res.expect_err("must fail").to_string(), t0.elapsed())
    });
    let (out, inc) = fake_rank1(&l1, &addrs);
    let f = thread::spawn(move || fake(out, inc));
    let res = r0.join().unwrap();
    f.join().unwrap();
    assert!(res.0.contains(&format!("rank 1 ({})", addrs[1])), "{}", res.0);
    res
}

fn header(offset: u64, count: u32) -> [u8; FRAME_HEADER_LEN] {
    let h = FrameHeader { kind: KIND_REDUCE_SCATTER, op: 1, len: 10_000, offset, count, step: 0 };
    h.encode()
}

#[test]
fn wrong_sized_piece_from_a_peer_is_an_error() {
    // Rank 1 sends chunk 1 (offset 5000) in 256-element pieces; claim 300 instead.
    let (err, _) = rank0_against_fake(Duration::from_secs(10), |mut out, inc| {
        out.write_all(&header(5000, 300)).unwrap();
        out.write_all(&[0u8; 1200]).unwrap();
        let _ = inc; // keep open until rank 0 has judged the frame
        thread::sleep(Duration::from_millis(200));
    });
    assert!(err.contains("count: 300"), "{err}");
}

#[test]
fn garbage_data_from_a_peer_is_an_error() {
    let (err, _) = rank0_against_fake(Duration::from_secs(10), |mut out, _inc| {
        out.write_all(&[0x5A; 4096]).unwrap();
        thread::sleep(Duration::from_millis(200));
    });
    assert!(err.contains("sent frame"), "{err}");
}

#[test]
fn peer_that_disappears_mid_piece_is_an_error_not_a_hang() {
    let (err, took) = rank0_against_fake(Duration::from_secs(10), |mut out, inc| {
        out.write_all(&header(5000, 256)).unwrap();
        out.write_all(&[0u8; 100]).unwrap(); // then the process "dies": both sockets close
        drop((out, inc));
    });
    assert!(took < Duration::from_secs(5), "took {took:?}: {err}");
    // A read sees the end of the stream, a write a reset or a broken pipe: all say the same.
    assert!(err.contains("receiving from") || err.contains("sending to"), "{err}");
    assert!(err.contains("connection closed by peer"), "{err}");
}

#[test]
fn stalled_peer_makes_the_reduce_fail_within_the_timeout() {
    let timeout = Duration::from_millis(700);
    let (err, took) = rank0_against_fake(timeout, |out, inc| {
        thread::sleep(Duration::from_secs(3)); // alive but silent
        drop((out, inc));
    });
    assert!(took < Duration::from_millis(2500), "took {took:?}: {err}");
    assert!(err.contains("timed out"), "{err}");
}

#[test]
fn rank_dropped_mid_reduce_makes_every_other_rank_fail_within_the_timeout() {
    let (ls, addrs) = listeners(3);
    let timeout = Duration::from_secs(3);
    let handles: Vec<_> = ls
        .into_iter()
        .enumerate()
        .map(|(rank, l)| {
            let cfg = config(rank, &addrs, timeout);
            thread::spawn(move || {
                let mut ring = RingCollective::connect(l, cfg).unwrap();
                if rank == 2 {
                    thread::sleep(Duration::from_millis(300)); // the others are mid-reduce
                    drop(ring);
                    return None;
                }
                let mut buf = input(rank, 4_000_000);
                let t0 = Instant::now();
                let res = ring.all_reduce_mean(&CpuBackend::new(1).unwrap(), &mut buf, 4_000_000);
                let again = Collective::<CpuBackend>::mean_scalar(&mut ring, 1.0);
                Some((res.err().map(|e| e.to_string()), t0.elapsed(), again.is_err()))
            })
        })
        .collect();
    for (rank, h) in handles.into_iter().enumerate().take(2) {
        let (err, took, again_err) = h.join().unwrap().unwrap();
        let err = err.unwrap_or_else(|| panic!("rank {rank} should have failed"));
        assert!(took < timeout + Duration::from_secs(1), "rank {rank} took {took:?}: {err}");
        assert!(err.contains(&format!("rank {rank}:")), "{err}");
        assert!(again_err, "rank {rank}: a broken ring must keep failing");
    }
}

/// Every rank announces `ranges` (covering `0..len` in a scrambled order) to a bucketer of
/// `cap` elements, starts each bucket, scribbles over the buffer where backward would still
/// be writing, and finishes; returns every rank's result.
fn run_buckets(world: usize, len: usize, cap: usize) -> Vec<Vec<f32>> {
    let ranges = [len / 2..len, 0..len / 3, len / 3..len / 2];
    let (ls, addrs) = listeners(world);
    let handles: Vec<_> = ls
        .into_iter()
        .enumerate()
        .map(|(rank, l)| {
            let cfg =
                RingConfig { piece_bytes: 4096, ..config(rank, &addrs, Duration::from_secs(20)) };
            let ranges = ranges.clone();
            thread::spawn(move || {
                let be = CpuBackend::new(1).unwrap();
                let mut ring = RingCollective::connect(l, cfg).unwrap();
                for round in 0..2 {
                    let mut buf = input(rank, len);
                    let mut buckets = Bucketer::new(cap);
                    let mut start =
                        |b: &[std::ops::Range<usize>]| ring.start_bucket(&be, &buf, b).unwrap();
                    for r in &ranges {
                        buckets.push(r.clone(), &mut start);
                    }
                    buckets.flush(&mut start);
                    let err = Collective::<CpuBackend>::mean_scalar(&mut ring, 1.0);
                    assert!(err.unwrap_err().to_string().contains("in flight"));
                    // The buckets were copied when started: later writes must not leak in.
                    buf.iter_mut().for_each(|x| *x = f32::NAN);
                    ring.finish_buckets(&be, &mut buf, len).unwrap();
                    if round == 1 {
                        return buf;
                    }
                }
                unreachable!()
            })
        })
        .collect();
    handles.into_iter().map(|h| h.join().unwrap()).collect()
}

fn assert_buckets_average(world: usize, len: usize, cap: usize) {
    let out = run_buckets(world, len, cap);
    let inputs: Vec<Vec<f32>> = (0..world).map(|r| input(r, len)).collect();
    for (i, &got) in out[0].iter().enumerate() {
        let want = inputs.iter().map(|x| x[i] as f64).sum::<f64>() / world as f64;
        let got = got as f64;
        assert!(((got - want) / want).abs() <= 1e-6, "elem {i}: {got} vs {want}");
    }
    for (r, buf) in out.iter().enumerate() {
        let same = buf.iter().zip(&out[0]).all(|(a, b)| a.to_bits() == b.to_bits());
        assert!(same, "rank {r} differs bitwise from rank 0 (world {world}, cap {cap})");
    }
}

#[test]
fn buckets_that_split_ranges_with_a_smaller_tail_average_on_two_ranks() {
    // 10_007 elements in buckets of 1_000: every bucket boundary cuts a range.
    assert_buckets_average(2, 10_007, 1_000);
    // For two ranks each element is (own + other) / 2 either way: bucketing changes no bit.
    let whole = run_ring(2, 10_007, 4096, true);
    assert!(run_buckets(2, 10_007, 1_000)[0].iter().zip(&whole[0].0).all(|(a, b)| a == b));
}

#[test]
fn buckets_average_on_three_ranks() {
    assert_buckets_average(3, 10_007, 999);
    assert_buckets_average(3, 5, 2); // buckets smaller than the world
}

#[test]
fn buckets_on_a_world_of_one_are_left_as_they_are() {
    let (mut ls, addrs) = listeners(1);
    let mut ring =
        RingCollective::connect(ls.remove(0), config(0, &addrs, Duration::from_secs(1))).unwrap();
    let be = CpuBackend::new(1).unwrap();
    let mut buf = input(0, 50);
    ring.start_bucket(&be, &buf, &[10..50, 0..10]).unwrap();
    ring.finish_buckets(&be, &mut buf, 50).unwrap();
    assert_eq!(buf, input(0, 50));
}

/// Two ranks with their own configs; returns both rings once connected.
fn pair(cfg0: RingConfig, cfg1: RingConfig, ls: Vec<TcpListener>) -> [RingCollective; 2] {
    let mut ls = ls.into_iter();
    let (l0, l1) = (ls.next().unwrap(), ls.next().unwrap());
    let r0 = thread::spawn(move || RingCollective::connect(l0, cfg0).unwrap());
    let r1 = RingCollective::connect(l1, cfg1).unwrap();
    [r0.join().unwrap(), r1]
}

#[test]
fn a_rank_without_shared_memory_keeps_both_links_on_tcp() {
    let (ls, addrs) = listeners(2);
    let t = Duration::from_secs(20);
    let cfg0 = RingConfig { shared_memory: false, ..config(0, &addrs, t) };
    let [mut a, mut b] = pair(cfg0, config(1, &addrs, t), ls);
    assert_eq!((a.transport(), b.transport()), ("tcp", "tcp"));
    let be = CpuBackend::new(1).unwrap();
    let (mut x, mut y) = (input(0, 5000), input(1, 5000));
    thread::scope(|s| {
        s.spawn(|| a.all_reduce_mean(&be, &mut x, 5000).unwrap());
        b.all_reduce_mean(&be, &mut y, 5000).unwrap();
    });
    assert_eq!(x, y);
    assert_eq!(x[0], (input(0, 1)[0] + input(1, 1)[0]) / 2.0);
}

#[test]
fn an_offer_that_cannot_be_mapped_is_answered_with_tcp() {
    let (mut ls, addrs) = listeners(2);
    let l0 = ls.remove(0);
    let cfg = config(0, &addrs, Duration::from_secs(10));
    let r0 = thread::spawn(move || RingCollective::connect(l0, cfg));
    // A rank 1 that offers a segment nobody created.
    let (_out, _inc, answer) = fake_rank1_offering(&ls[0], &addrs, 77);
    assert_eq!((answer.kind, answer.shm), (HandshakeKind::Accept, 0));
    assert_eq!(r0.join().unwrap().unwrap().transport(), "tcp");
}

#[test]
fn shared_memory_segments_leave_no_file_behind() {
    let (ls, addrs) = listeners(2);
    let t = Duration::from_secs(20);
    let token = 0x5eed_0f11e5;
    let cfg = |rank| RingConfig { token, ..config(rank, &addrs, t) };
    let rings = pair(cfg(0), cfg(1), ls);
    assert_eq!(rings[0].transport(), "shared memory");
    let prefix = format!("ferrite-ring-{token:016x}-");
    let left: Vec<_> = std::fs::read_dir("/dev/shm")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.starts_with(&prefix))
        .collect();
    assert!(left.is_empty(), "left in /dev/shm: {left:?}");
}

#[test]
fn abort_wakes_a_rank_waiting_on_shared_memory() {
    let (ls, addrs) = listeners(2);
    let t = Duration::from_secs(20);
    let [mut a, b] = pair(config(0, &addrs, t), config(1, &addrs, t), ls);
    assert_eq!(a.transport(), "shared memory");
    let abort = a.abort_handle().unwrap();
    let t0 = Instant::now();
    let err = thread::scope(|s| {
        // Rank 1 never joins the reduce: rank 0 sleeps waiting for its frames.
        let h = s.spawn(|| {
            a.all_reduce_mean(&CpuBackend::new(1).unwrap(), &mut input(0, 1 << 20), 1 << 20)
        });
        thread::sleep(Duration::from_millis(300));
        abort.abort();
        h.join().unwrap().expect_err("an aborted reduce must fail").to_string()
    });
    assert!(t0.elapsed() < Duration::from_secs(5), "took {:?}: {err}", t0.elapsed());
    assert!(err.contains("rank 1"), "{err}");
    drop(b);
}
