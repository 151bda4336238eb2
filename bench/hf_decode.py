"""Hugging Face transformers decode throughput on the CPU, the peer of
`ferrite bench decode` (inference/src/bench.rs), measured the same way:

GPT-2-124M shape (random init: the speed does not depend on the weights), a 16-token
prompt, 128 new tokens sampled at temperature 1 over the whole vocabulary (`do_sample=True,
top_k=0`) with the KV cache (`generate(use_cache=True)`):
  - batch 1: tokens/s of the decode (time after the first token);
  - a static batch of N prompts generated together: aggregate tokens/s, prefill included;
  - time to first token (one new token) for prompts of 16 ... 1024 tokens.
Each measurement runs `--reps` times; prints one JSON line (medians and every run).
Needs torch and transformers in the venv (`bench/setup.sh`).

  .venv/bin/python bench/hf_decode.py --threads 2 --batch 8 --reps 3
"""

import argparse
import json
import statistics
import time

import torch
from transformers import GPT2Config, GPT2LMHeadModel


def timed_generate(model, ids, new_tokens):
    t0 = time.perf_counter()
    model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                   min_new_tokens=new_tokens, do_sample=True, top_k=0, top_p=1.0,
                   temperature=1.0, use_cache=True, pad_token_id=0)
    return time.perf_counter() - t0


def median(xs):
    return statistics.median_high(xs)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--prompt", type=int, default=16)
    ap.add_argument("--ttft-prompts", default="16,64,256,512,1024")
    ap.add_argument("--reps", type=int, default=3)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config()).eval()
    prompt = lambda n, b=1: torch.randint(0, 50000, (b, n))
    lengths = [int(n) for n in a.ttft_prompts.split(",")]
    batch1, aggregate, ttft = [], [], {n: [] for n in lengths}
    with torch.inference_mode():
        timed_generate(model, prompt(a.prompt), 8)  # warm-up
        for _ in range(a.reps):
            first = timed_generate(model, prompt(a.prompt), 1)
            whole = timed_generate(model, prompt(a.prompt), a.new_tokens)
            batch1.append((a.new_tokens - 1) / (whole - first))
            whole_b = timed_generate(model, prompt(a.prompt, a.batch), a.new_tokens)
            aggregate.append(a.batch * a.new_tokens / whole_b)
            for n in lengths:
                ttft[n].append(timed_generate(model, prompt(n), 1) * 1e3)
    print(json.dumps({
        "peer": "transformers", "torch": torch.__version__, "threads": a.threads,
        "new_tokens": a.new_tokens,
        "batch1_tokens_per_s": median(batch1), "batch1_runs": batch1,
        "streams": a.batch, "aggregate_tokens_per_s": median(aggregate),
        "aggregate_runs": aggregate,
        "ttft": [{"prompt": n, "ms": median(ms), "runs": ms} for n, ms in ttft.items()],
    }))


if __name__ == "__main__":
    main()
