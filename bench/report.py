"""Markdown tables of the bilateral_ops benchmarks, for bench/RESULTS.md.

    python bench/report.py                 # runs the CPU benches (pytest bench -k cpu), then prints
    python bench/report.py --cuda          # runs every bench, CUDA included
    python bench/report.py BENCH.json      # reads a pytest-benchmark --benchmark-json file

Speed-ups are ratios of times measured side by side in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_benches(path: str, cuda: bool) -> None:
    env = dict(os.environ, BILATERAL_OPS_REQUIRE_COMPILED="1")
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, "-m", "pytest", "-q", "bench", "--benchmark-only", f"--benchmark-json={path}"]
    if not cuda:
        cmd += ["-k", "cpu"]
    subprocess.run(cmd, check=True, cwd=ROOT, env=env, stdout=sys.stderr)


OP_NAMES = {"forward": "forward", "forward_backward": "forward + backward", "hdrnet": "fwd + bwd, no input grad"}


def cpu_table(benches: list[dict]) -> list[str]:
    rows = {}
    for b in benches:
        info = b.get("extra_info", {})
        if info.get("device") != "cpu" or info.get("suite") in ("grid", "hdrnet"):
            continue
        key = (info["size"], info.get("guide", "photo"), info["op"])
        rows.setdefault(key, {})[info["impl"]] = b
    if not rows:
        return []
    out = [
        "| size | guide | op | ours min / median (ms) | grid_sample min / median (ms) | speed-up min / median "
        "| interleaved speed-up | peak extra memory ours / grid_sample (MiB) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    order = {"512x512": 0, "1920x1080": 1}
    ops = list(OP_NAMES)
    for key in sorted(rows, key=lambda k: (order.get(k[0], 9), k[1], ops.index(k[2]) if k[2] in ops else 9)):
        size, guide, op = key
        r = rows[key]
        if "ours" not in r or "grid_sample" not in r:
            continue
        o, p = r["ours"]["stats"], r["grid_sample"]["stats"]
        mem_o = r["ours"]["extra_info"].get("peak_extra_MiB")
        mem_p = r["grid_sample"]["extra_info"].get("peak_extra_MiB")
        mem = f"{mem_o:.1f} / {mem_p:.1f}" if mem_o is not None and mem_p is not None else "-"
        out.append(
            f"| {size} | {guide} | {OP_NAMES.get(op, op)} "
            f"| {o['min'] * 1e3:.2f} / {o['median'] * 1e3:.2f} "
            f"| {p['min'] * 1e3:.1f} / {p['median'] * 1e3:.1f} "
            f"| {p['min'] / o['min']:.1f}x / {p['median'] / o['median']:.1f}x "
            f"| {r['ours']['extra_info'].get('interleaved_speedup', float('nan')):.1f}x "
            f"| {mem} |"
        )
    return out


def cuda_table(benches: list[dict]) -> list[str]:
    rows = [
        b
        for b in benches
        if b.get("extra_info", {}).get("device", "cpu") != "cpu"
        and b["extra_info"].get("suite") not in ("grid", "hdrnet")
        and all(k in b["extra_info"] for k in ("size", "dtype", "event_ms", "achieved_GBps", "clone_GBps", "pct_of_clone"))
    ]
    if not rows:
        return []
    out = [
        "| device | size | op | dtype | ours (ms) | GB/s | clone GB/s | % of clone | notes |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for b in sorted(rows, key=lambda b: (b["extra_info"]["op"] != "forward", b["extra_info"]["dtype"] != "float32")):
        i = b["extra_info"]
        notes = []
        if "grid_sample_event_ms" in i:
            notes.append(f"grid_sample fwd {i['grid_sample_event_ms']:.3f} ms")
        if "ours_peak_extra_MiB" in i:
            notes.append(f"peak extra {i['ours_peak_extra_MiB']} / {i['grid_sample_peak_extra_MiB']} MiB")
        if "hdrnet_mask_event_ms" in i:
            notes.append(f"no grad_input {i['hdrnet_mask_event_ms']:.3f} ms")
        if "noise_guide_event_ms" in i:
            notes.append(f"noise guide {i['noise_guide_event_ms']:.3f} ms")
        if "deterministic_event_ms" in i:
            notes.append(f"deterministic {i['deterministic_event_ms']:.3f} ms")
        if "ours_forward_backward_event_ms" in i:
            notes.append(
                f"fwd+bwd {i['ours_forward_backward_event_ms']:.3f} ms vs grid_sample "
                f"{i['grid_sample_forward_backward_event_ms']:.3f} ms"
            )
        out.append(
            f"| {i['device']} | {i['size']} | {i['op']} | {i['dtype']} | {i['event_ms']:.3f} "
            f"| {i['achieved_GBps']:.0f} | {i['clone_GBps']:.0f} | {i['pct_of_clone']:.0f}% | {'; '.join(notes)} |"
        )
    return out


GRID_PEERS = ("torch", "numba", "opencv")


def grid_cpu_table(benches: list[dict]) -> list[str]:
    """bench/test_bench_grid_filter.py on the CPU: one row per (op, size), min times of every
    implementation and the interleaved speed-ups of ours over each peer."""
    rows = {}
    for b in benches:
        info = b.get("extra_info", {})
        if info.get("suite") == "grid" and info.get("device") == "cpu":
            rows.setdefault((info["op"], info["size"]), {})[info["impl"]] = b
    if not rows:
        return []
    out = [
        "| op | size | ours (ms) | torch (ms) | numba (ms) | opencv (ms) | speed-up vs torch / numba / opencv "
        "(min times) | interleaved speed-up vs torch / numba / opencv |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for (op, size), r in sorted(rows.items(), key=lambda kv: (kv[0][0], kv[0][1] != "512x512")):
        if "ours" not in r:
            continue
        ours = r["ours"]["stats"]["min"]
        times = [f"{r[p]['stats']['min'] * 1e3:.1f}" if p in r else "-" for p in GRID_PEERS]
        ratios = [f"{r[p]['stats']['min'] / ours:.1f}x" if p in r else "-" for p in GRID_PEERS]
        inter = r["ours"]["extra_info"].get("interleaved_speedup", {})
        inter_s = [f"{inter[p]:.1f}x" if p in inter else "-" for p in GRID_PEERS]
        out.append(
            f"| {op} | {size} | {ours * 1e3:.2f} | {' | '.join(times)} | {' / '.join(ratios)} | {' / '.join(inter_s)} |"
        )
    return out


def grid_cuda_table(benches: list[dict]) -> list[str]:
    rows = [
        b["extra_info"]
        for b in benches
        if b.get("extra_info", {}).get("suite") == "grid" and b["extra_info"].get("device") != "cpu"
    ]
    if not rows:
        return []
    out = ["| device | op | ours (ms) | measures |", "|---|---|---|---|"]
    skip = {"suite", "device", "op", "impl", "dtype", "event_ms"}
    for i in rows:
        notes = "; ".join(f"{k} {v}" for k, v in i.items() if k not in skip)
        out.append(f"| {i['device']} | {i['op']} | {i.get('event_ms', float('nan')):.3f} | {notes} |")
    return out


def hdrnet_table(benches: list[dict]) -> list[str]:
    """bench/test_bench_hdrnet.py: one row per (device, op, size, dtype), ours against the
    pure-torch model, with the split of ours per stage."""
    rows = {}
    for b in benches:
        info = b.get("extra_info", {})
        if info.get("suite") != "hdrnet":
            continue
        if info.get("device") == "cpu":
            rows.setdefault(("cpu", info["op"], info["size"], "float32"), {})[info["impl"]] = b
        else:
            rows[(info["device"], info["op"], info["size"], info["dtype"])] = {"cuda": b}
    if not rows:
        return []
    out = [
        "| device | op | size | dtype | ours | pure torch | speed-up | split of ours (ms) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for (device, op, size, dtype), r in sorted(rows.items()):
        if "cuda" in r:
            info = r["cuda"]["extra_info"]
            rate = info["images_per_s"]
            split = info.get("split_ms", {})
            out.append(
                f"| {device} | {op} | {size} | {dtype} | {rate['ours']:.0f} img/s | {rate['torch']:.0f} img/s "
                f"| {info['speedup_vs_torch']:.1f}x | {', '.join(f'{k} {v}' for k, v in split.items())} |"
            )
            continue
        if "ours" not in r or "torch" not in r:
            continue
        o, t = r["ours"]["stats"]["min"] * 1e3, r["torch"]["stats"]["min"] * 1e3
        info = r["ours"]["extra_info"]
        split = info.get("split_ms", {})
        peer_split = r["torch"]["extra_info"].get("split_ms", {})
        pieces = ", ".join(f"{k} {v} ({peer_split.get(k, '-')})" for k, v in split.items())
        inter = f" (interleaved {info['speedup_vs_torch']:.1f}x)" if "speedup_vs_torch" in info else ""
        out.append(f"| cpu | {op} | {size} | float32 | {o:.1f} ms | {t:.1f} ms | {t / o:.1f}x{inter} | {pieces} |")
    if len(out) > 2:
        out.append("")
        out.append("Split: ours (pure torch) per piece, forward + backward for the training step.")
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("json", nargs="?", help="pytest-benchmark JSON; omitted: run the benches now")
    ap.add_argument("--cuda", action="store_true", help="when running, include the CUDA benches")
    args = ap.parse_args()
    if args.json:
        path = args.json
    else:
        path = os.path.join(tempfile.mkdtemp(prefix="bo-bench-"), "bench.json")
        run_benches(path, args.cuda)
    with open(path) as f:
        data = json.load(f)
    benches = data["benchmarks"]
    mi = data.get("machine_info", {})
    print(
        f"machine: {mi.get('cpu', {}).get('brand_raw', '?')}, {mi.get('cpu', {}).get('count', '?')} cores; "
        f"python {mi.get('python_version', '?')}; run {data.get('datetime', '?')}"
    )
    print()
    for table in (
        cpu_table(benches), cuda_table(benches), grid_cpu_table(benches), grid_cuda_table(benches), hdrnet_table(benches)
    ):
        if table:
            print("\n".join(table))
            print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
