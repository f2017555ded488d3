"""Same quality as plain torch: HDRNet trained with the fused ops against the identical model
built from the pure-torch references (``ReferenceHDRNet``), at equal steps, over several seeds.

    python bench/hdrnet_quality.py [--steps 400] [--seeds 0,1,2] [--threads 2] [extra train args...]

Each (seed, model) pair runs ``bilateral_ops.train`` on the bundled photos (``detail_enhance``,
chelsea and coffee held out) with the same seed, hence the same initial weights and the same
crops; the two runs differ only in how the guide and the slice-apply are computed. Prints a
markdown table of the held-out PSNR of each run, the means and their difference, and the
wall time of each run.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--threads", type=int, default=None)
    args, extra = ap.parse_known_args()

    from bilateral_ops import train

    if args.threads:
        torch.set_num_threads(args.threads)
    data = train.load_dataset("detail_enhance")
    seeds = [int(s) for s in args.seeds.split(",")]
    rows, scores = [], {"ours": [], "torch": []}
    for seed in seeds:
        row = [seed]
        for impl in ("ours", "torch"):
            argv = ["--steps", str(args.steps), "--seed", str(seed), "--eval-every", "0", "--no-progress",
                    "--device", "cpu", *extra]
            if impl == "torch":
                argv.append("--reference")
            t0 = time.perf_counter()
            model = train.run(train.parse_args(argv), data)
            wall = time.perf_counter() - t0
            p = statistics.mean(train.evaluate(model, data, torch.device("cpu")))
            scores[impl].append(p)
            row += [p, wall]
        rows.append(row)
        print(f"seed {seed}: ours {row[1]:.3f} dB ({row[2]:.0f} s), pure torch {row[3]:.3f} dB ({row[4]:.0f} s)",
              file=sys.stderr, flush=True)
    print(f"| seed | ours: held-out PSNR (dB) | ours: wall (s) | pure torch: PSNR (dB) | pure torch: wall (s) | difference (dB) |")
    print("|---|---|---|---|---|---|")
    for seed, po, wo, pt, wt in rows:
        print(f"| {seed} | {po:.3f} | {wo:.0f} | {pt:.3f} | {wt:.0f} | {po - pt:+.3f} |")
    mo, mt = statistics.mean(scores["ours"]), statistics.mean(scores["torch"])
    print(f"| mean | {mo:.3f} | | {mt:.3f} | | {mo - mt:+.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
