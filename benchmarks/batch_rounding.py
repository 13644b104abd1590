"""How much does a sample depend on the rest of its batch? (the numbers behind `batch_invariant`)

Generates one report -> X-ray (+ CT) sample alone and as the last row of a batch of 2 and 3 with the bundled
medm2g-tiny, same generator per sample, and prints the largest difference in display values ([0, 1]), how
many 8-bit pixels differ, and the same with `batch_invariant=True` (expected: 0 and 0).

    python benchmarks/batch_rounding.py --steps 10
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch

from medm2g_diffusers import MedM2GPipeline

PROMPTS = [
    "FINDINGS: Large left pleural effusion. IMPRESSION: Effusion.",
    "FINDINGS: Normal chest. IMPRESSION: No acute disease.",
    "FINDINGS: Cardiomegaly. No effusion. IMPRESSION: Enlarged heart.",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    pipe = MedM2GPipeline.from_pretrained("medm2g-tiny")
    pipe.set_progress_bar_config(disable=True)

    def run(prompts, batch_invariant, targets=("xray", "ct")):
        generators = [torch.Generator().manual_seed(100 + PROMPTS.index(p)) for p in prompts]
        out = pipe(prompt=prompts, targets=list(targets), generator=generators, num_inference_steps=args.steps,
                   output_type="np", batch_invariant=batch_invariant)
        return {t: out.images[t][-1] for t in targets}

    results = {}
    for batch_invariant in (False, True):
        alone = run(PROMPTS[-1:], batch_invariant)
        for size in (2, 3):
            batched = run(PROMPTS[-size:], batch_invariant)
            for target in alone:
                a, b = alone[target], batched[target]
                key = f"{'batch_invariant' if batch_invariant else 'batched'}/size{size}/{target}"
                results[key] = {
                    "max_abs_diff": float(np.abs(a - b).max()),
                    "pixels_differing_8bit": int((np.rint(a * 255) != np.rint(b * 255)).sum()),
                    "pixels": int(a.size),
                }
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
