"""Read ptxas's resource report (nvcc -Xptxas -v) from a build log and check every CUDA kernel.

Usage: python tools/ptxas_report.py BUILD_LOG [--lib BUILD_LIB_DIR] [--require-all]

For every kernel and architecture: registers, spill stores / loads, stack frame, static shared
memory, and the largest dynamic shared memory request the launch plans make
(csrc/cuda/launch_config.h, read through bilateral_ops._C.kernel_info). Fails where

* static + largest dynamic shared memory exceeds 48 KiB (no kernel opts in to more), or the
  static shared memory exceeds what launch_config.h budgets for the kernel;
* a float32 / float16 / bfloat16 instance spills (float64 spills are reported only);
* registers exceed what the kernel's __launch_bounds__ allow (a block could not launch);
* a kernel is unknown to launch_config.h (so its launches are not checked by the tests), or,
  with --require-all, a kernel listed there is missing from the log.

--lib loads _C from a build directory (make cuda-check: build/cuda-lib, built against the CUDA
torch of the interpreter running this script); without it, the installed bilateral_ops._C.
"""

from __future__ import annotations

import argparse
import glob
import importlib.util
import os
import re
import shutil
import subprocess
import sys

SMEM_NO_OPT_IN = 48 * 1024
REGISTERS_PER_BLOCK = 64 * 1024

ENTRY = re.compile(r"Compiling entry function '(?P<name>[^']+)' for '(?P<arch>sm_\d+a?)'")
PROPS = re.compile(r"(?P<stack>\d+) bytes stack frame, (?P<st>\d+) bytes spill stores, (?P<ld>\d+) bytes spill loads")
USED = re.compile(r"Used (?P<regs>\d+) registers")
SMEM = re.compile(r"(?P<smem>\d+) bytes smem")
SIGNATURE = re.compile(r"(?:void\s+)?(?P<qual>[\w:]+)[<(]")


def parse(log: str) -> list[dict]:
    """One dict per (kernel, arch) compiled, in log order."""
    entries: list[dict] = []
    current = None
    for line in log.splitlines():
        m = ENTRY.search(line)
        if m:
            current = {"mangled": m.group("name"), "arch": m.group("arch"), "regs": None,
                       "stack": 0, "spill_st": 0, "spill_ld": 0, "smem": 0}
            entries.append(current)
            continue
        if current is None:
            continue
        m = PROPS.search(line)
        if m:
            current["stack"] = int(m.group("stack"))
            current["spill_st"] = int(m.group("st"))
            current["spill_ld"] = int(m.group("ld"))
            continue
        m = USED.search(line)
        if m:
            current["regs"] = int(m.group("regs"))
            s = SMEM.search(line)
            current["smem"] = int(s.group("smem")) if s else 0
            current = None  # the Used line closes the entry
    return entries


def demangle(names: list[str]) -> list[str]:
    tool = shutil.which("c++filt")
    if tool is None or not names:
        return names
    out = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True, check=True).stdout
    lines = out.split("\n")
    return lines[: len(names)] if len(lines) >= len(names) else names


def describe(demangled: str) -> tuple[str, str]:
    """(kernel name, template arguments) of a demangled kernel signature. The arguments are found
    by matching angle brackets, since they may hold parentheses themselves (an enumerator
    argument demangles as ``(ns::Enum)1``)."""
    s = demangled.replace("(anonymous namespace)::", "")
    m = SIGNATURE.match(s)
    if not m:
        return s, ""
    name = m.group("qual").split("::")[-1]
    if s[m.end("qual") : m.end("qual") + 1] != "<":
        return name, ""
    depth, start = 0, m.end("qual") + 1
    for i in range(start - 1, len(s)):
        depth += {"<": 1, ">": -1}.get(s[i], 0)
        if depth == 0:
            return name, s[start:i].strip()
    return name, ""


def acc_size(args: str) -> int:
    first = args.split(",")[0].strip() if args else ""
    return 8 if first == "double" else 4


def load_c(lib_dir: str | None):
    import torch  # noqa: F401  (loads libtorch / libc10, which _C links against)

    if lib_dir is None:
        sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        from bilateral_ops import _C

        return _C
    libs = glob.glob(os.path.join(lib_dir, "bilateral_ops", "_C*.so"))
    if len(libs) != 1:
        raise SystemExit(f"expected one bilateral_ops/_C*.so under {lib_dir}, found {libs}")
    spec = importlib.util.spec_from_file_location("_C", libs[0])
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def max_registers(max_threads: int, min_blocks: int) -> int:
    return min(255, REGISTERS_PER_BLOCK // (max_threads * max(min_blocks, 1)))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("log")
    ap.add_argument("--lib", default=None)
    ap.add_argument("--require-all", action="store_true")
    opts = ap.parse_args(argv)

    with open(opts.log, errors="replace") as f:
        entries = parse(f.read())
    if not entries:
        print(f"ptxas-report: no ptxas resource report in {opts.log} (built without -Xptxas -v?)")
        return 1
    c = load_c(opts.lib)
    info = {acc: {k["kernel"]: k for k in c.kernel_info(acc)} for acc in (4, 8)}

    for e, d in zip(entries, demangle([e["mangled"] for e in entries])):
        e["kernel"], e["args"] = describe(d)

    rows, failures, notes, seen = [], [], [], set()
    for e in entries:
        key = (e["kernel"], e["args"], e["arch"], e["regs"], e["spill_st"], e["spill_ld"], e["smem"])
        if key in seen:  # the same instance compiled in both ops' translation units
            continue
        seen.add(key)
        acc = acc_size(e["args"])
        k = info[acc].get(e["kernel"])
        label = f"{e['kernel']}<{e['args']}>"
        problems = []
        if k is None:
            problems.append("not in launch_config.h kernel_info: its launches are unchecked")
            bound, dyn, budget = "?", 0, 0
        else:
            bound = max_registers(k["max_threads"], k["min_blocks"])
            dyn, budget = k["max_dynamic_smem"], k["static_smem_budget"]
            if e["regs"] is not None and e["regs"] > bound:
                problems.append(f"{e['regs']} registers > {bound} allowed by __launch_bounds__"
                                f"({k['max_threads']}, {k['min_blocks']})")
            if e["smem"] > budget:
                problems.append(f"{e['smem']} bytes of static shared memory, {budget} budgeted in launch_config.h")
        total = e["smem"] + dyn
        if total > SMEM_NO_OPT_IN:
            problems.append(f"static {e['smem']} + dynamic {dyn} = {total} bytes of shared memory > 48 KiB")
        spills = e["spill_st"] + e["spill_ld"]
        if spills and acc == 4:
            problems.append(f"spills ({e['spill_st']} bytes stored, {e['spill_ld']} loaded) in a float instance")
        elif spills:
            notes.append(f"{label} {e['arch']}: float64 instance spills {e['spill_st']}/{e['spill_ld']} bytes")
        status = "FAIL" if problems else "ok"
        failures += [f"{label} {e['arch']}: {p}" for p in problems]
        rows.append((label, e["arch"], e["regs"], bound, f"{e['spill_st']}/{e['spill_ld']}", e["stack"],
                     e["smem"], dyn, total, status))

    header = ("kernel", "arch", "regs", "max", "spill st/ld", "stack", "static", "max dyn", "smem total", "")
    widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(len(header))]
    rows.sort(key=lambda r: (r[0].split("<")[0], r[1], r[0]))
    print("ptxas resource usage (bytes; max = registers allowed by __launch_bounds__):")
    for r in [header] + rows:
        print("  " + "  ".join(str(v).ljust(w) if i == 0 else str(v).rjust(w) for i, (v, w) in enumerate(zip(r, widths))))
    if opts.require_all:
        compiled = {e["kernel"] for e in entries}
        for acc in (4, 8):
            for name in info[acc]:
                if name not in compiled:
                    failures.append(f"{name}: listed in launch_config.h kernel_info but not compiled")
    for n in notes:
        print("note: " + n)
    archs = sorted({e["arch"] for e in entries})
    if failures:
        print(f"ptxas-report: FAILED ({len(failures)} problem(s)):")
        for f in sorted(set(failures)):
            print("  " + f)
        return 1
    print(f"ptxas-report: {len(rows)} kernel instances on {', '.join(archs)}: no spills in float instances, "
          "shared memory within 48 KiB, registers within __launch_bounds__")
    return 0


if __name__ == "__main__":
    sys.exit(main())
