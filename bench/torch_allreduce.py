"""PyTorch peer of `ferrite bench allreduce`: torch.distributed gloo all-reduce on loopback.

Spawns `--world` processes (MASTER_ADDR 127.0.0.1), all-reduces an f32 buffer of `--bytes`
bytes after one warm-up, and prints one JSON line with the median over `--reps` of the
slowest rank's time and the bus bandwidth 2*(w-1)/w * bytes / time.
"""

import argparse
import json
import os
import socket
import statistics
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_main(rank: int, args, port: int, queue) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(args.threads)
    dist.init_process_group("gloo", rank=rank, world_size=args.world)
    n = args.bytes // 4
    buf = torch.arange(n, dtype=torch.float32).remainder_(1000).mul_(1e-3).add_(rank)
    times = []
    for rep in range(args.reps + 1):
        dist.barrier()
        t0 = time.perf_counter()
        # gloo has no AVG: SUM then scale, as a mean all-reduce needs.
        dist.all_reduce(buf, op=dist.ReduceOp.SUM)
        buf.div_(args.world)
        if rep > 0:
            times.append(time.perf_counter() - t0)
    queue.put((rank, times))
    dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--bytes", type=int, default=124_000_000)
    p.add_argument("--world", type=int, default=2)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    args = p.parse_args()
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    port = free_port()
    procs = [
        ctx.Process(target=rank_main, args=(r, args, port, queue)) for r in range(args.world)
    ]
    for pr in procs:
        pr.start()
    results = dict(queue.get() for _ in procs)
    for pr in procs:
        pr.join()
        if pr.exitcode != 0:
            sys.exit(f"a rank exited with {pr.exitcode}")
    slowest = [max(results[r][i] for r in results) for i in range(args.reps)]
    t = statistics.median(slowest)
    w = args.world
    busbw = 2 * (w - 1) / w * args.bytes / t / 1e9 if w > 1 else 0.0
    print(json.dumps({"peer": "pytorch-gloo", "bench": "allreduce", "ms": t * 1e3,
                      "busbw_gbps": busbw, "bytes": args.bytes, "world": w,
                      "reps": args.reps, "torch": torch.__version__}))


if __name__ == "__main__":
    main()
