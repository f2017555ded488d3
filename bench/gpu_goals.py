"""The open issues' GPU goals, read from the benchmark JSON files that bench/gpu_check.sh writes.

    python bench/gpu_goals.py OUT_DIR

- Exact filter (1920x1080, k = 9, float32): ours against kornia on CUDA, forward and forward +
  backward, by the minima of synchronised calls and by CUDA events of back-to-back calls
  (`event_ms`); goal >= 20x.
- curve_guide (4K, float32, forward): the fraction of a clone's bandwidth of the same bytes;
  goal >= 60 %.

Prints one line per measure ("n/a" where a bench did not run); never fails: gpu_check's own
steps say whether the benches passed.
"""

from __future__ import annotations

import json
import os
import sys


def _benches(path: str) -> list[dict]:
    try:
        with open(path) as f:
            return json.load(f).get("benchmarks", [])
    except (OSError, ValueError):
        return []


def filter_lines(benches: list[dict]) -> list[str]:
    rows = {}
    for b in benches:
        name = b.get("name", "")
        if not name.startswith("test_cuda_filter["):
            continue
        info = b.get("extra_info", {})
        rows[(info.get("impl"), info.get("op"))] = (b["stats"]["min"] * 1e3, info.get("event_ms"))
    out = []
    for mode in ("forward", "forward_backward"):
        ours, peer = rows.get(("ours", mode)), rows.get(("kornia", mode))
        if ours is None or peer is None:
            out.append(f"filter 1080p k9 {mode}: n/a (ours {ours}, kornia {peer})")
            continue
        line = f"filter 1080p k9 {mode}: ours {ours[0]:.3f} ms, kornia {peer[0]:.2f} ms (synchronised minima): {peer[0] / ours[0]:.1f}x"
        if ours[1] and peer[1]:
            line += f"; events {ours[1]:.3f} vs {peer[1]:.2f} ms: {peer[1] / ours[1]:.1f}x"
        out.append(line + " (goal >= 20x)")
    return out


def curve_lines(benches: list[dict]) -> list[str]:
    out = []
    for b in benches:
        info = b.get("extra_info", {})
        if info.get("op") == "curve_guide forward" and info.get("size") == "3840x2160" and info.get("dtype") == "float32":
            frac = info.get("fraction_of_clone_bandwidth")
            out.append(
                f"curve_guide 4K float32 forward: {info.get('ms')} ms, clone {info.get('clone_ms')} ms: "
                f"{100 * frac:.0f} % of a clone's bandwidth (goal >= 60 %)"
            )
    return out or ["curve_guide 4K float32 forward: n/a"]


def main() -> int:
    out_dir = sys.argv[1] if len(sys.argv) > 1 else "."
    for line in filter_lines(_benches(os.path.join(out_dir, "bench-gpu.json"))):
        print(line)
    for line in curve_lines(_benches(os.path.join(out_dir, "bench-curve-guide.json"))):
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
