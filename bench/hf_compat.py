"""Checks that ferrite's checkpoints and Hugging Face `transformers` GPT-2 interoperate.

A manual check, not run by CI (it needs torch and transformers, a venv of about 5 GB);
`scripts/hf-compat.sh` builds ferrite, trains a tiny model and runs this script.

  (a) our checkpoint -> transformers: GPT2LMHeadModel.from_pretrained(checkpoint) greedily
      generates the same token ids as `ferrite generate --temperature 0`, with the same
      per-token log-probabilities (log-softmax of the logits) within --tol; the checkpoint's
      tokenizer.json also loads in transformers and encodes the prompt to the same ids.
  (b) transformers -> ferrite: a tiny random GPT2LMHeadModel saved with save_pretrained
      (safetensors) plus ferrite's gpt2 tokenizer.json gives the same greedy tokens and
      log-probabilities under `ferrite generate` as in transformers.

Prints one PASS/FAIL line per check and exits 1 if any failed.
"""

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

failures = 0


def report(ok, name, detail=""):
    global failures
    failures += 0 if ok else 1
    print(f"{'PASS' if ok else 'FAIL'} {name}" + (f": {detail}" if detail else ""), flush=True)


def ferrite_generate(ferrite, checkpoint, prompt, n):
    out = subprocess.run(
        [str(ferrite), "generate", "--checkpoint", str(checkpoint), "--prompt", prompt,
         "--max-tokens", str(n), "--temperature", "0", "--json"],
        check=True, capture_output=True, text=True)
    return json.loads(out.stdout)


@torch.no_grad()
def hf_greedy(model, prompt_ids, n, eos):
    """Greedy ids from transformers' own generate, and per-token log-probs by a forward pass
    over prompt + generated (teacher forcing), with the top-2 logit gap at each step."""
    inp = torch.tensor([prompt_ids])
    seq = model.generate(inp, max_new_tokens=n, do_sample=False, eos_token_id=eos,
                         pad_token_id=eos)[0].tolist()
    ids = seq[len(prompt_ids):]
    logits = model(torch.tensor([seq])).logits[0].double()
    steps = logits[len(prompt_ids) - 1: len(seq) - 1]  # the logits that chose each id
    logprobs = torch.log_softmax(steps, dim=-1)[torch.arange(len(ids)), ids].tolist()
    top2 = steps.topk(2, dim=-1).values
    gaps = (top2[:, 0] - top2[:, 1]).tolist()
    return ids, logprobs, gaps


def compare(name, model, checkpoint, ferrite, prompt, prompt_ids, n, tol):
    ours = ferrite_generate(ferrite, checkpoint, prompt, n)
    report(ours["prompt_tokens"] == prompt_ids, f"{name}: prompt token ids",
           f"ferrite {ours['prompt_tokens']} vs transformers {prompt_ids}")
    eos = model.config.eos_token_id
    ids, logprobs, gaps = hf_greedy(model, prompt_ids, n, eos)
    same = ours["tokens"] == ids
    detail = f"{len(ids)} tokens {ids}"
    if not same:
        at = next((i for i, (a, b) in enumerate(zip(ours["tokens"], ids)) if a != b),
                  min(len(ids), len(ours["tokens"])))
        detail = (f"ferrite {ours['tokens']} vs transformers {ids}; first difference at "
                  f"{at}, top-2 logit gap there {gaps[at] if at < len(gaps) else 'n/a'}")
    report(same, f"{name}: greedy token ids", detail)
    k = min(len(ids), len(ours["logprobs"]))
    diff = max((abs(a - b) for a, b in zip(ours["logprobs"][:k], logprobs[:k])), default=0.0)
    report(k > 0 and diff <= tol, f"{name}: log-probs within {tol}",
           f"max |diff| {diff:.2e} over {k} tokens (min top-2 gap {min(gaps):.2e})")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ferrite", required=True, type=Path, help="the ferrite binary")
    ap.add_argument("--checkpoint", required=True, type=Path, help="a ferrite checkpoint")
    ap.add_argument("--prompt", default="First Citizen: Before we proceed")
    ap.add_argument("--tokens", type=int, default=20)
    ap.add_argument("--tol", type=float, default=1e-3)
    args = ap.parse_args()
    torch.manual_seed(0)

    # (a) Our checkpoint in transformers.
    tok = PreTrainedTokenizerFast(tokenizer_file=str(args.checkpoint / "tokenizer.json"))
    prompt_ids = tok(args.prompt)["input_ids"]
    ours, info = GPT2LMHeadModel.from_pretrained(args.checkpoint, attn_implementation="eager",
                                                 output_loading_info=True)
    ours.eval()
    bad = {k: v for k, v in info.items() if v and k in ("missing_keys", "unexpected_keys",
                                                          "mismatched_keys")}
    report(not bad, "a: transformers loads our checkpoint",
           f"n_layer {ours.config.n_layer}, n_embd {ours.config.n_embd}, "
           f"vocab {ours.config.vocab_size}" + (f"; {bad}" if bad else ""))
    compare("a", ours, args.checkpoint, args.ferrite, args.prompt, prompt_ids, args.tokens,
            args.tol)

    # (b) A transformers model in ferrite.
    cfg = GPT2Config(n_layer=2, n_head=2, n_embd=64, n_positions=32, vocab_size=50257,
                     bos_token_id=50256, eos_token_id=50256)
    theirs = GPT2LMHeadModel(cfg).eval()
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        theirs.save_pretrained(d, safe_serialization=True)
        shutil.copy(args.checkpoint / "tokenizer.json", d / "tokenizer.json")
        report((d / "model.safetensors").exists(), "b: save_pretrained wrote model.safetensors",
               ", ".join(sorted(p.name for p in d.iterdir())))
        compare("b", theirs, d, args.ferrite, args.prompt, prompt_ids, args.tokens, args.tol)

    print("hf-compat:", "PASS" if failures == 0 else f"FAIL ({failures} checks failed)")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
