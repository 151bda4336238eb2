#!/usr/bin/env python3
"""PyTorch reference peer for Ferrite's benchmarks.

A GPT-2-architecture model in plain PyTorch, trained on the CPU, so that Ferrite's
Rust implementation can be compared against it in the same run.

Subcommands (each prints exactly one JSON line on stdout; progress goes to stderr):
  char    -- char-level Shakespeare training (nanoGPT's small CPU config)
  gpt2    -- time full training steps of the GPT-2-124M shape on random tokens
  ddp     -- the same step data-parallel over `--world` processes (DDP, gloo), one thread
             each, at a fixed global batch: the scaling peer of `ferrite bench step --world`
  matmul  -- f32 matrix-multiply throughput
"""

import argparse
import json
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_DATA = os.path.join(REPO_ROOT, "..", "shared", "data", "tinyshakespeare.txt")


def log(*args):
    print(*args, file=sys.stderr, flush=True)


def emit(obj):
    print(json.dumps(obj), flush=True)


# --------------------------------------------------------------------------- model


@dataclass
class GPTConfig:
    vocab_size: int  # already padded to a multiple of 64
    block_size: int
    n_layer: int
    n_head: int
    n_embd: int


def pad_vocab(v, multiple=64):
    return ((v + multiple - 1) // multiple) * multiple


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        assert cfg.n_embd % cfg.n_head == 0
        self.n_head = cfg.n_head
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=True)
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=True)
        self.c_proj.is_residual_proj = True

    def forward(self, x):
        B, T, C = x.shape
        hs = C // self.n_head
        q, k, v = self.c_attn(x).split(C, dim=2)
        # (B, T, C) -> (B, nh, T, hs)
        q = q.view(B, T, self.n_head, hs).transpose(1, 2)
        k = k.view(B, T, self.n_head, hs).transpose(1, 2)
        v = v.view(B, T, self.n_head, hs).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.c_proj(y)


class MLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd, bias=True)
        self.c_proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd, bias=True)
        self.c_proj.is_residual_proj = True

    def forward(self, x):
        return self.c_proj(F.gelu(self.c_fc(x), approximate="tanh"))


class Block(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd, bias=True)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.n_embd, bias=True)
        self.mlp = MLP(cfg)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        x = x + self.mlp(self.ln_2(x))
        return x


class GPT(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd)
        self.blocks = nn.ModuleList([Block(cfg) for _ in range(cfg.n_layer)])
        self.ln_f = nn.LayerNorm(cfg.n_embd, bias=True)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # weight tying
        self._init_weights()

    def _init_weights(self):
        # GPT-2 init: N(0, 0.02) for linear and embedding weights, zero biases,
        # residual output projections scaled by 1/sqrt(2 * n_layer).
        resid_std = 0.02 / math.sqrt(2 * self.cfg.n_layer)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                std = resid_std if getattr(m, "is_residual_proj", False) else 0.02
                nn.init.normal_(m.weight, mean=0.0, std=std)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Embedding):
                nn.init.normal_(m.weight, mean=0.0, std=0.02)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def num_params(self, non_embedding=True):
        """Unique parameters (the tied LM head counts once). With non_embedding,
        the position embeddings are left out (nanoGPT's convention)."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.wpe.weight.numel()
        return n

    def forward(self, idx, targets=None):
        B, T = idx.shape
        assert T <= self.cfg.block_size
        pos = torch.arange(T, device=idx.device)
        x = self.wte(idx) + self.wpe(pos)
        for block in self.blocks:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))
        return logits, loss


def make_optimizer(model, lr, weight_decay, betas=(0.9, 0.99)):
    # Weight decay only on 2-D parameters (matmul weights and embeddings).
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=False)


def lr_at(it, lr, min_lr, warmup, decay_steps):
    """Linear warmup, then cosine decay to min_lr (same shape as nanoGPT)."""
    if it < warmup:
        return lr * (it + 1) / (warmup + 1)
    if it > decay_steps:
        return min_lr
    ratio = (it - warmup) / (decay_steps - warmup)
    coeff = 0.5 * (1.0 + math.cos(math.pi * ratio))
    return min_lr + coeff * (lr - min_lr)


def train_step(model, opt, x, y, grad_clip, autocast=False):
    # bf16 autocast: the linear layers' operands in bf16 (oneDNN, AMX where present), the
    # master weights, gradients and optimizer in f32; Ferrite's `matmul_precision = "bf16"`.
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        _, loss = model(x, y)
    loss.backward()
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.item()


# --------------------------------------------------------------------------- char


def cmd_char(args):
    with open(args.data, "r", encoding="utf-8") as f:
        text = f.read()
    chars = sorted(set(text))
    stoi = {c: i for i, c in enumerate(chars)}
    data = torch.tensor([stoi[c] for c in text], dtype=torch.long)
    n = int(0.9 * len(data))
    train_data, val_data = data[:n], data[n:]

    B, T = args.batch_size, args.block_size
    cfg = GPTConfig(
        vocab_size=pad_vocab(len(chars)),
        block_size=T,
        n_layer=args.n_layer,
        n_head=args.n_head,
        n_embd=args.n_embd,
    )
    torch.manual_seed(args.seed)
    model = GPT(cfg)
    opt = make_optimizer(model, args.lr, args.weight_decay)
    log(f"char: vocab {len(chars)} (padded {cfg.vocab_size}), {len(train_data)} train / "
        f"{len(val_data)} val tokens, {model.num_params() / 1e6:.3f}M params")

    def get_batch(split):
        d = train_data if split == "train" else val_data
        ix = torch.randint(len(d) - T, (B,))
        x = torch.stack([d[i:i + T] for i in ix])
        y = torch.stack([d[i + 1:i + 1 + T] for i in ix])
        return x, y

    @torch.no_grad()
    def estimate_loss():
        model.eval()
        out = {}
        for split in ("train", "val"):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.autocast == "bf16"):
                losses = [model(*get_batch(split))[1].item() for _ in range(args.eval_steps)]
            out[split] = sum(losses) / len(losses)
        model.train()
        return out

    times = []
    losses = None
    for it in range(args.steps):
        if it % args.eval_interval == 0:
            losses = estimate_loss()
            log(f"step {it}: train {losses['train']:.4f} val {losses['val']:.4f}")
        lr = lr_at(it, args.lr, args.min_lr, args.warmup, args.lr_decay_steps)
        for g in opt.param_groups:
            g["lr"] = lr
        x, y = get_batch("train")
        t0 = time.perf_counter()
        loss = train_step(model, opt, x, y, args.grad_clip, args.autocast == "bf16")
        times.append(time.perf_counter() - t0)
        if it % args.log_interval == 0:
            log(f"iter {it}: loss {loss:.4f}, {times[-1] * 1e3:.1f} ms, lr {lr:.2e}")
    losses = estimate_loss()  # loss after the last step
    log(f"step {args.steps}: train {losses['train']:.4f} val {losses['val']:.4f}")

    timed = times[10:] if len(times) > 10 else times
    ms = 1e3 * sum(timed) / len(timed)
    emit({
        "peer": "pytorch",
        "bench": "char",
        "ms_per_iter": round(ms, 4),
        "tokens_per_s": round(B * T / (ms / 1e3), 1),
        "val_loss": round(losses["val"], 4),
        "train_loss": round(losses["train"], 4),
        "steps": args.steps,
        "threads": torch.get_num_threads(),
        "autocast": args.autocast,
        "torch": torch.__version__,
    })


# --------------------------------------------------------------------------- gpt2


def cmd_gpt2(args):
    cfg = GPTConfig(
        vocab_size=pad_vocab(args.vocab_size),
        block_size=args.block_size,
        n_layer=args.n_layer,
        n_head=args.n_head,
        n_embd=args.n_embd,
    )
    B, T = args.batch_size, args.seq_len
    torch.manual_seed(args.seed)
    model = GPT(cfg)
    opt = make_optimizer(model, args.lr, args.weight_decay)
    n_params = model.num_params(non_embedding=True)
    log(f"gpt2: {model.num_params(False) / 1e6:.2f}M params "
        f"({n_params / 1e6:.2f}M without position embeddings), B={B} T={T}")
    x = torch.randint(cfg.vocab_size, (B, T))
    y = torch.randint(cfg.vocab_size, (B, T))

    times = []
    for it in range(args.steps):
        t0 = time.perf_counter()
        loss = train_step(model, opt, x, y, args.grad_clip, args.autocast == "bf16")
        times.append(time.perf_counter() - t0)
        log(f"step {it}: loss {loss:.4f}, {times[-1] * 1e3:.1f} ms")

    timed = times[1:] if len(times) > 1 else times  # drop the warm-up step
    ms = 1e3 * statistics.median(timed)
    tokens = B * T
    # Model FLOPs per training step (forward + backward), nanoGPT/PaLM convention:
    #   6 * N * tokens                 (N = parameters without position embeddings;
    #                                   the tied LM head counts once, as a matmul)
    # + 12 * L * T * C * tokens        (attention scores and weighted sum, fwd + bwd,
    #                                   without discounting the causal mask)
    # where L = n_layer, T = sequence length, C = n_embd, tokens = B * T.
    flops = 6 * n_params * tokens + 12 * cfg.n_layer * T * cfg.n_embd * tokens
    emit({
        "peer": "pytorch",
        "bench": "gpt2_step",
        "ms_per_step": round(ms, 3),
        "gflops": round(flops / (ms / 1e3) / 1e9, 3),
        "flops_per_step": flops,
        "n_params": n_params,
        "batch": B,
        "seq_len": T,
        "steps": args.steps,
        "threads": torch.get_num_threads(),
        "autocast": args.autocast,
        "torch": torch.__version__,
    })


# --------------------------------------------------------------------------- ddp


def ddp_rank(rank, args, port, queue):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(args.threads)
    dist.init_process_group("gloo", rank=rank, world_size=args.world)
    cfg = GPTConfig(
        vocab_size=pad_vocab(args.vocab_size),
        block_size=args.block_size,
        n_layer=args.n_layer,
        n_head=args.n_head,
        n_embd=args.n_embd,
    )
    torch.manual_seed(args.seed)
    model = DistributedDataParallel(GPT(cfg))
    opt = make_optimizer(model.module, args.lr, args.weight_decay)
    B, T = args.global_batch // args.world, args.seq_len
    g = torch.Generator().manual_seed(args.seed + rank)
    x = torch.randint(cfg.vocab_size, (B, T), generator=g)
    y = torch.randint(cfg.vocab_size, (B, T), generator=g)
    times = []
    for it in range(args.steps):
        dist.barrier()
        t0 = time.perf_counter()
        loss = train_step(model, opt, x, y, args.grad_clip)
        times.append(time.perf_counter() - t0)
        if rank == 0:
            log(f"ddp world {args.world} step {it}: loss {loss:.4f}, {times[-1] * 1e3:.1f} ms")
    queue.put((rank, times))
    dist.barrier()
    dist.destroy_process_group()


def cmd_ddp(args):
    if args.autocast != "none":
        sys.exit("ddp: --autocast is not supported")
    import socket

    import torch.multiprocessing as mp

    if args.global_batch % args.world:
        sys.exit("--global-batch must be a multiple of --world")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    procs = [ctx.Process(target=ddp_rank, args=(r, args, port, queue)) for r in range(args.world)]
    for pr in procs:
        pr.start()
    per_rank = dict(queue.get() for _ in procs)
    for pr in procs:
        pr.join()
    # A step ends when its slowest rank does; drop the warm-up step.
    slowest = [max(per_rank[r][i] for r in per_rank) for i in range(args.steps)]
    ms = 1e3 * statistics.median(slowest[1:] if len(slowest) > 1 else slowest)
    emit({
        "peer": "pytorch",
        "bench": "ddp_step",
        "world": args.world,
        "global_batch": args.global_batch,
        "seq_len": args.seq_len,
        "ms_per_step": round(ms, 3),
        "threads_per_rank": args.threads,
        "autocast": args.autocast,
        "torch": torch.__version__,
    })


# --------------------------------------------------------------------------- matmul


def cmd_matmul(args):
    m, k, n = args.m, args.k, args.n
    torch.manual_seed(args.seed)
    a = torch.randn(m, k, dtype=torch.float32)
    b = torch.randn(k, n, dtype=torch.float32)
    c = torch.empty(m, n, dtype=torch.float32)
    bf16 = args.autocast == "bf16"

    def mm():
        if bf16:
            # As under autocast: both f32 operands rounded to bf16 on every call.
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return torch.mm(a, b)
        return torch.mm(a, b, out=c)

    for _ in range(args.warmup):
        mm()
    times = []
    for _ in range(args.reps):
        t0 = time.perf_counter()
        mm()
        times.append(time.perf_counter() - t0)
    t = statistics.median(times)
    gflops = 2.0 * m * k * n / t / 1e9
    log(f"matmul {m}x{k} @ {k}x{n}: median {t * 1e3:.3f} ms, {gflops:.2f} GFLOP/s")
    emit({
        "peer": "pytorch",
        "bench": "matmul",
        "gflops": round(gflops, 3),
        "ms": round(t * 1e3, 4),
        "m": m, "k": k, "n": n,
        "reps": args.reps,
        "threads": torch.get_num_threads(),
        "autocast": args.autocast,
        "torch": torch.__version__,
    })


# --------------------------------------------------------------------------- main


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    sub = p.add_subparsers(dest="cmd", required=True)

    def common(sp):
        # Also accept --threads after the subcommand.
        sp.add_argument("--threads", type=int, default=argparse.SUPPRESS)
        sp.add_argument("--seed", type=int, default=1337)
        sp.add_argument("--autocast", choices=["none", "bf16"], default="none",
                        help="bf16: run the model (or the product) under torch.autocast to bf16")

    c = sub.add_parser("char", help="char-level Shakespeare training")
    common(c)
    c.add_argument("--data", default=DEFAULT_DATA)
    c.add_argument("--steps", type=int, default=2000)
    c.add_argument("--eval-interval", type=int, default=250)
    c.add_argument("--eval-steps", type=int, default=20)
    c.add_argument("--log-interval", type=int, default=50)
    c.add_argument("--n-layer", type=int, default=4)
    c.add_argument("--n-head", type=int, default=4)
    c.add_argument("--n-embd", type=int, default=128)
    c.add_argument("--block-size", type=int, default=64)
    c.add_argument("--batch-size", type=int, default=12)
    c.add_argument("--lr", type=float, default=1e-3)
    c.add_argument("--min-lr", type=float, default=1e-4)
    c.add_argument("--warmup", type=int, default=100)
    c.add_argument("--lr-decay-steps", type=int, default=2000)
    c.add_argument("--weight-decay", type=float, default=0.1)
    c.add_argument("--grad-clip", type=float, default=1.0)

    def gpt2_shape(sp, steps):
        # The GPT-2-124M step's model and optimizer, shared by `gpt2` and `ddp`.
        common(sp)
        sp.add_argument("--steps", type=int, default=steps)
        sp.add_argument("--n-layer", type=int, default=12)
        sp.add_argument("--n-head", type=int, default=12)
        sp.add_argument("--n-embd", type=int, default=768)
        sp.add_argument("--vocab-size", type=int, default=50304)
        sp.add_argument("--block-size", type=int, default=1024, help="position-embedding table size")
        sp.add_argument("--seq-len", type=int, default=256)
        sp.add_argument("--lr", type=float, default=6e-4)
        sp.add_argument("--weight-decay", type=float, default=0.1)
        sp.add_argument("--grad-clip", type=float, default=1.0)

    g = sub.add_parser("gpt2", help="GPT-2-124M training-step timing on random tokens")
    gpt2_shape(g, steps=5)
    g.add_argument("--batch-size", type=int, default=4)

    d = sub.add_parser("ddp", help="data-parallel GPT-2-124M step over gloo")
    gpt2_shape(d, steps=3)
    d.add_argument("--world", type=int, default=2)
    d.add_argument("--global-batch", type=int, default=8)

    mm = sub.add_parser("matmul", help="f32 matmul GFLOP/s")
    common(mm)
    mm.add_argument("--m", type=int, default=1024)
    mm.add_argument("--k", type=int, default=3072)
    mm.add_argument("--n", type=int, default=768)
    mm.add_argument("--reps", type=int, default=20)
    mm.add_argument("--warmup", type=int, default=3)

    args = p.parse_args()
    torch.set_num_threads(args.threads)
    {"char": cmd_char, "gpt2": cmd_gpt2, "ddp": cmd_ddp, "matmul": cmd_matmul}[args.cmd](args)


if __name__ == "__main__":
    main()
