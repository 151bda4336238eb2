"""Hugging Face transformers decode throughput on the CPU, the peer of
`cargo run --release -p ferrite-inference --example bench_decode`.

GPT-2-124M shape (random init: the speed does not depend on the weights), a 16-token
prompt, 128 new tokens sampled with the KV cache (`generate(use_cache=True)`):
  - batch 1: tokens/s of the decode (time after the first token);
  - a static batch of N prompts generated together: aggregate tokens/s;
  - time to first token for prompts of 16, 64, 256, 512 tokens.
Prints one JSON line on stdout. Needs torch and transformers in the venv
(`bench/setup.sh`, then `.venv/bin/pip install transformers`).

  .venv/bin/python bench/hf_decode.py --threads 2 --batch 8
"""

import argparse
import json
import time

import torch
from transformers import GPT2Config, GPT2LMHeadModel


def timed_generate(model, ids, new_tokens):
    t0 = time.perf_counter()
    model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=True,
                   top_k=0, use_cache=True, pad_token_id=0)
    return time.perf_counter() - t0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=128)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config()).eval()
    prompt = lambda n, b=1: torch.randint(0, 50000, (b, n))
    with torch.inference_mode():
        timed_generate(model, prompt(16), 8)  # warm-up
        ttft = [{"prompt": n, "ms": timed_generate(model, prompt(n), 1) * 1e3}
                for n in (16, 64, 256, 512)]
        first = timed_generate(model, prompt(16), 1)
        whole = timed_generate(model, prompt(16), a.new_tokens)
        batch1 = (a.new_tokens - 1) / (whole - first)
        whole_b = timed_generate(model, prompt(16, a.batch), a.new_tokens)
        aggregate = a.batch * a.new_tokens / whole_b
    print(json.dumps({"threads": a.threads, "batch1_tokens_per_s": batch1, "batch": a.batch,
                      "aggregate_tokens_per_s": aggregate, "ttft": ttft}))


if __name__ == "__main__":
    main()
