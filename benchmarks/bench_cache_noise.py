"""How much of the KD gradient a sampled cache keeps: signal against sampling noise.

For the positions of a few training blocks, with the teacher's distribution p and a student's
q at temperature T, the dense KD gradient with respect to the student's scaled logits is
q - p; a sampled cache replaces p by the draws' frequencies. This prints, per T, the mean over
positions of the teacher's entropy, of the signal ||q - p||^2 and of the noise
E||w - p||^2 of S = 12 frequencies w, for independent draws and for the systematic draws
the cache uses (averaged over 40 repetitions).

    python benchmarks/bench_cache_noise.py --run /tmp/lmdistill-bench-cache/embedded/run-live@1 \
        --out benchmarks/results/cache_noise_embedded.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from lmdistill.config import Config, load_yaml
from lmdistill.data.sources import build_block_data
from lmdistill.models.loading import resolve_source
from lmdistill.teacher.cache import systematic_draws


def noise(p: torch.Tensor, samples: int, draw, repeats: int, g: torch.Generator) -> float:
    total = 0.0
    for _ in range(repeats):
        ids = draw(p, g)
        w = torch.zeros_like(p).scatter_add_(1, ids, torch.full(ids.shape, 1.0 / samples))
        total += ((w - p) ** 2).sum(-1).mean().item() / repeats
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, required=True, help="a finished run directory (its student and data)")
    parser.add_argument("--samples", type=int, default=12)
    parser.add_argument("--blocks", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=40)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    cfg = Config.from_dict(load_yaml(args.run / "config.yaml"))
    tokenizer = AutoTokenizer.from_pretrained(args.run / "tokenizer")
    data = build_block_data(cfg.data, tokenizer, progress=False)
    teacher = AutoModelForCausalLM.from_pretrained(resolve_source(cfg.model.teacher, "teacher")).eval()  # GGUF too
    student = AutoModelForCausalLM.from_pretrained(args.run / "student").eval()
    batch = data.train.batch(range(args.blocks))
    vocab, s = len(tokenizer), args.samples
    with torch.no_grad():
        zt = teacher(input_ids=batch.input_ids).logits[:, :-1, :vocab].float().flatten(0, 1)
        zs = student(input_ids=batch.input_ids).logits[:, :-1, :vocab].float().flatten(0, 1)
    out = {"run": str(args.run), "samples": s, "positions": len(zt), "vocab": vocab, "by_temperature": {}}
    for t in (1.0, 2.0):
        p, q = (zt / t).softmax(-1), (zs / t).softmax(-1)
        g = torch.Generator().manual_seed(0)
        out["by_temperature"][f"{t:g}"] = {
            "teacher_entropy": (-(p * p.clamp_min(1e-30).log()).sum(-1)).mean().item(),
            "signal": ((q - p) ** 2).sum(-1).mean().item(),
            "noise_independent": noise(p, s, lambda p, g: torch.multinomial(p, s, True, generator=g), args.repeats, g),
            "noise_systematic": noise(p, s, lambda p, g: systematic_draws(p, s, g), args.repeats, g),
        }
    print(json.dumps(out, indent=2))
    if args.out:
        args.out.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
