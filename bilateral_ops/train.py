"""Train HDRNet to reproduce an image operator from input/output pairs.

    python -m bilateral_ops.train --checkpoint out/hdrnet.pt [--operator detail_enhance] [--steps 20000]
    python -m bilateral_ops.train --checkpoint C --pairs INPUT_DIR TARGET_DIR
    torchrun --nproc_per_node=2 -m bilateral_ops.train --checkpoint C ...   # data parallel

Training pairs are either a built-in operator applied to the colour photos bundled with
scikit-image (nothing is downloaded) or the user's own pairs, matched by file name. Built-in
operators:

* ``detail_enhance`` (default): OpenCV's ``cv2.detailEnhance`` with its default parameters, on
  the whole photo as 8-bit BGR, converted back to RGB float;
* ``local_tone``: a local tone curve built on the exact bilateral filter: the luminance is split
  into a base (``bilateral_filter``, 9 x 9, sigma_color 0.1, sigma_space 3) and detail; the base is
  lifted by a gamma of 0.6, the detail boosted 1.5 times, and the colour scaled by the new
  luminance over the old one.

Two or more photos are held out (``--holdout``; for the bundled photos chelsea and coffee, for
``--pairs`` the last two by name) and never trained on: every ``--eval-every`` steps the model
enhances them at full resolution and the mean PSNR is reported. Each step trains on random crops
(``--crop``, flipped at random) with Adam and an L2 loss; the learning rate decays along a cosine
from ``--lr`` to 5 % of it at ``--steps`` (``--schedule constant`` keeps it fixed). The
checkpoint is written every ``--checkpoint-every`` steps and at the end, atomically (a temporary
file, then a rename), so an interrupted run never leaves a broken checkpoint; ``--resume``
continues from it up to ``--steps`` (give the same ``--steps`` to finish an interrupted run exactly
as it would have run: the schedule is a function of the step and ``--steps``).

Under ``torchrun`` each process trains on its own crops and DDP averages the gradients (gloo on
CPU, NCCL on CUDA); ``--batch-size`` is per process. Process 0 evaluates and writes checkpoints.
At the end the processes compare their parameters and fail if any replica differs.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .images import BUNDLED_HOLDOUT, ImageError, bundled_photo_paths, list_images, read_rgb
from .models import HDRNet, ReferenceHDRNet

__all__ = ["OPERATORS", "Dataset", "load_dataset", "main", "parse_args", "psnr", "run"]

CHECKPOINT_FORMAT = "bilateral_ops.hdrnet.v1"


# ---------------------------------------------------------------------------------------------
# Built-in operators: (3, H, W) RGB float in [0, 1] -> same.


def detail_enhance(rgb: torch.Tensor) -> torch.Tensor:
    """``cv2.detailEnhance`` (default sigma_s = 10, sigma_r = 0.15) on 8-bit BGR, back to RGB float."""
    import cv2
    import numpy as np

    from .images import to_uint8

    bgr = np.ascontiguousarray(to_uint8(rgb)[:, :, ::-1])
    out = cv2.detailEnhance(bgr)
    return torch.from_numpy(np.ascontiguousarray(out[:, :, ::-1])).permute(2, 0, 1).float().div_(255)


def local_tone(rgb: torch.Tensor) -> torch.Tensor:
    """A local tone curve on the exact bilateral filter (module docstring), clipped to [0, 1]."""
    from .bilateral_filter import bilateral_filter

    x = rgb.unsqueeze(0).double()
    w = torch.tensor([0.2126, 0.7152, 0.0722], dtype=x.dtype).view(1, 3, 1, 1)
    luma = (x * w).sum(1, keepdim=True).clamp_min(1e-4)
    base = bilateral_filter(luma, 9, 0.1, 3.0).clamp(1e-4, 1)
    new = base.pow(0.6) + 1.5 * (luma - base)
    return (x * (new / luma)).clamp(0, 1)[0].float()


OPERATORS = {"detail_enhance": detail_enhance, "local_tone": local_tone}


# ---------------------------------------------------------------------------------------------
# Data


@dataclass
class Dataset:
    train: list[tuple[torch.Tensor, torch.Tensor]]  # (input, target) pairs, (3, H, W) each
    holdout: list[tuple[str, torch.Tensor, torch.Tensor]]  # (name, input, target)


def _stem(path: str) -> str:
    return os.path.splitext(os.path.basename(path))[0]


def load_dataset(operator: str = "detail_enhance", pairs: tuple[str, str] | None = None,
                 holdout: list[str] | None = None) -> Dataset:
    """Training and held-out pairs, all in memory.

    Raises:
        ImageError: a missing or unreadable file, an image that is not RGB, a target of another
            size than its input, an input without a target, or a held-out name that is not there.
    """
    if pairs is None:
        if operator not in OPERATORS:
            raise ValueError(f"unknown operator {operator!r}; choose one of {', '.join(OPERATORS)}")
        inputs = {_stem(p): read_rgb(p) for p in bundled_photo_paths()}
        targets = {name: OPERATORS[operator](img) for name, img in inputs.items()}
        default_holdout = list(BUNDLED_HOLDOUT)
    else:
        in_dir, tgt_dir = pairs
        in_files = list_images([in_dir])
        tgt_files = {_stem(p): p for p in list_images([tgt_dir])}
        inputs, targets = {}, {}
        for path in in_files:
            name = _stem(path)
            if name not in tgt_files:
                raise ImageError(f"{path}: no target of the same name in {tgt_dir}")
            x, y = read_rgb(path), read_rgb(tgt_files[name])
            if x.shape != y.shape:
                raise ImageError(
                    f"{tgt_files[name]}: target is {y.shape[2]}x{y.shape[1]} but its input {path} "
                    f"is {x.shape[2]}x{x.shape[1]}"
                )
            inputs[name], targets[name] = x, y
        default_holdout = sorted(inputs)[-2:]
    names = holdout if holdout else default_holdout
    for name in names:
        if name not in inputs:
            raise ImageError(f"held-out image {name!r} not found; the images are {', '.join(sorted(inputs))}")
    if len(names) < 2:
        raise ValueError(f"hold out at least two images, got {len(names)}")
    train = [(inputs[n], targets[n]) for n in sorted(inputs) if n not in names]
    if not train:
        raise ValueError("every image is held out: nothing left to train on")
    return Dataset(train, [(n, inputs[n], targets[n]) for n in names])


def sample_batch(data: Dataset, batch: int, crop: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``batch`` random crops (with random horizontal and vertical flips) of the training pairs."""
    xs, ys = [], []
    for _ in range(batch):
        x, y = data.train[int(torch.randint(len(data.train), (1,), generator=gen))]
        h, w = x.shape[1:]
        top = int(torch.randint(h - crop + 1, (1,), generator=gen))
        left = int(torch.randint(w - crop + 1, (1,), generator=gen))
        x, y = x[:, top : top + crop, left : left + crop], y[:, top : top + crop, left : left + crop]
        flips = torch.rand(2, generator=gen)
        dims = [d for d, f in zip((2, 1), flips) if f < 0.5]
        if dims:
            x, y = x.flip(dims), y.flip(dims)
        xs.append(x)
        ys.append(y)
    return torch.stack(xs), torch.stack(ys)


def psnr(output: torch.Tensor, target: torch.Tensor) -> float:
    """PSNR in dB of ``output`` clipped to [0, 1] against ``target`` (peak 1)."""
    mse = (output.clamp(0, 1) - target).double().square().mean().item()
    return float("inf") if mse == 0 else -10 * math.log10(mse)


@torch.no_grad()
def evaluate(model: torch.nn.Module, data: Dataset, device: torch.device) -> list[float]:
    """PSNR of each held-out image, enhanced at full resolution."""
    was_training = model.training
    model.eval()
    out = [psnr(model(x[None].to(device))[0].cpu(), y) for _, x, y in data.holdout]
    model.train(was_training)
    return out


# ---------------------------------------------------------------------------------------------
# Checkpoints


def save_checkpoint(path: str, state: dict) -> None:
    """``torch.save`` to a temporary file beside ``path``, then rename: readers never see a
    partial file, and the previous checkpoint survives a crash mid-write."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{os.path.basename(path)}.tmp{os.getpid()}")
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def load_checkpoint(path: str, map_location="cpu") -> dict:
    """A checkpoint written by ``bilateral_ops.train``.

    Raises:
        ValueError: ``path`` is missing or is not such a checkpoint.
    """
    if not os.path.isfile(path):
        raise ValueError(f"{path}: no such checkpoint")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:
        raise ValueError(f"{path}: not a readable checkpoint ({exc})") from exc
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path}: not a bilateral_ops HDRNet checkpoint")
    return state


def model_from_checkpoint(path: str, device="cpu", reference: bool = False) -> HDRNet:
    """The trained HDRNet of a checkpoint, in eval mode on ``device``."""
    state = load_checkpoint(path, map_location=device)
    cls = ReferenceHDRNet if reference else HDRNet
    model = cls(**state["config"]).to(device)
    model.load_state_dict(state["model"])
    return model.eval()


# ---------------------------------------------------------------------------------------------
# The job


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="python -m bilateral_ops.train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--checkpoint", help="where to write the checkpoint (and read it with --resume)")
    ap.add_argument("--resume", action="store_true", help="continue from --checkpoint if it exists")
    data = ap.add_argument_group("data")
    data.add_argument("--operator", default="detail_enhance", choices=sorted(OPERATORS), help="built-in target operator")
    data.add_argument("--pairs", nargs=2, metavar=("INPUT_DIR", "TARGET_DIR"), help="train on your own pairs instead")
    data.add_argument("--holdout", type=lambda s: [n for n in s.split(",") if n], help="comma-separated names (file stems) to hold out")
    data.add_argument("--crop", type=int, default=384, help="training crop size (default 384)")
    opt = ap.add_argument_group("optimisation")
    opt.add_argument("--steps", type=int, default=20000, help="total training steps (default 20000)")
    opt.add_argument("--batch-size", type=int, default=4, help="crops per step and process (default 4)")
    opt.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (default 1e-3)")
    opt.add_argument("--schedule", default="cosine", choices=["cosine", "constant"],
                     help="learning rate over the run: cosine decay to 5%% of --lr at --steps (default), or constant")
    opt.add_argument("--seed", type=int, default=0, help="seed of the initialisation and of the crops")
    opt.add_argument("--eval-every", type=int, default=500, help="held-out PSNR every N steps (0: only at the end)")
    opt.add_argument("--checkpoint-every", type=int, default=1000, help="checkpoint every N steps (and at the end)")
    net = ap.add_argument_group("network (HDRNet)")
    net.add_argument("--luma-bins", type=int, default=8)
    net.add_argument("--spatial-bins", type=int, default=16)
    net.add_argument("--channel-multiplier", type=int, default=1)
    net.add_argument("--guide-pts", type=int, default=16)
    net.add_argument("--net-input-size", type=int, default=256)
    net.add_argument("--batch-norm", action="store_true")
    net.add_argument("--reference", action="store_true", help="train the pure-torch twin (ReferenceHDRNet) instead")
    run_ = ap.add_argument_group("run")
    run_.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    run_.add_argument("--threads", type=int, default=None, help="CPU threads (torch.set_num_threads)")
    run_.add_argument("--no-progress", action="store_true", help="no progress bar")
    run_.add_argument(
        "--amp", default="off", choices=["off", "bf16", "fp16"],
        help="mixed precision: the forward under torch.autocast in bfloat16 or float16 (fp16: "
        "CUDA only, with a gradient scaler); parameters, optimiser and checkpoints stay float32",
    )
    args = ap.parse_args(argv)
    for name in ("crop", "steps", "batch_size"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.lr <= 0:
        ap.error("--lr must be positive")
    if args.resume and not args.checkpoint:
        ap.error("--resume needs --checkpoint")
    if args.amp == "fp16" and args.device is not None and not args.device.startswith("cuda"):
        ap.error("--amp fp16 needs a CUDA device (use --amp bf16 on CPU)")
    return args


def _model_config(args: argparse.Namespace) -> dict:
    return {
        "luma_bins": args.luma_bins,
        "spatial_bins": args.spatial_bins,
        "channel_multiplier": args.channel_multiplier,
        "guide_pts": args.guide_pts,
        "net_input_size": args.net_input_size,
        "batch_norm": args.batch_norm,
    }


def learning_rate(args: argparse.Namespace, step: int) -> float:
    """The learning rate of step ``step`` (0-based): a function of the step alone, so that a
    resumed run follows the same schedule."""
    if args.schedule == "constant":
        return args.lr
    return args.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * step / args.steps)))


def _log(msg: str, rank: int) -> None:
    if rank == 0:
        print(msg, flush=True)


def _check_replicas(model: torch.nn.Module, world: int) -> None:
    """All processes compare their parameters bit for bit; any difference raises."""
    import torch.distributed as dist

    flat = torch.cat([p.detach().reshape(-1).double() for p in model.parameters()])
    gathered = [torch.empty_like(flat) for _ in range(world)]
    dist.all_gather(gathered, flat)
    worst = max((g - gathered[0]).abs().max().item() for g in gathered)
    if worst != 0:
        raise RuntimeError(f"DDP replicas diverged: max parameter difference {worst:.3e}")


def run(args: argparse.Namespace, data: Dataset | None = None) -> torch.nn.Module:
    """Train as ``args`` say; returns the trained (unwrapped) model. ``data``: the pairs
    ``load_dataset`` gives for ``args``, when the caller already has them (computing a built-in
    operator's targets takes seconds)."""
    from tqdm.auto import tqdm

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank if world > 1 else (device.index or 0))
        torch.cuda.set_device(device)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.amp == "fp16" and device.type != "cuda":
        raise ValueError("--amp fp16 needs a CUDA device (use --amp bf16 on CPU)")
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.amp)
    distributed = world > 1
    if distributed:
        import torch.distributed as dist

        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")

    try:
        if data is None:
            data = load_dataset(args.operator, tuple(args.pairs) if args.pairs else None, args.holdout)
        crop = min([args.crop] + [min(x.shape[1:]) for x, _ in data.train])
        if crop < args.crop:
            _log(f"crop {args.crop} is larger than the smallest training image: using {crop}", rank)

        torch.manual_seed(args.seed)
        config = _model_config(args)
        model = (ReferenceHDRNet if args.reference else HDRNet)(**config).to(device)
        opt = torch.optim.Adam(model.parameters(), lr=args.lr)
        # float16 gradients underflow without loss scaling; bfloat16 has float32's range.
        scaler = torch.amp.GradScaler(device.type, enabled=args.amp == "fp16")
        gen = torch.Generator().manual_seed(args.seed * 1000003 + rank)
        start = 0
        if args.resume and os.path.exists(args.checkpoint):
            state = load_checkpoint(args.checkpoint, map_location=device)
            if state["config"] != config:
                raise ValueError(
                    f"{args.checkpoint}: trained with network {state['config']}, not {config}"
                )
            model.load_state_dict(state["model"])
            opt.load_state_dict(state["optimizer"])
            if state.get("scaler"):
                scaler.load_state_dict(state["scaler"])
            start = int(state["step"])
            gen.set_state(state["generators"][rank] if rank < len(state["generators"]) else gen.get_state())
            _log(f"resumed from {args.checkpoint} at step {start}", rank)
        elif args.resume:
            _log(f"no checkpoint at {args.checkpoint} yet: starting from scratch", rank)
        net = model
        if distributed:
            from torch.nn.parallel import DistributedDataParallel as DDP

            net = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)

        if rank == 0:
            base = [psnr(x, y) for _, x, y in data.holdout]
            names = ", ".join(n for n, _, _ in data.holdout)
            print(
                f"{len(data.train)} training images, held out: {names} (input vs target "
                f"{sum(base) / len(base):.2f} dB); {args.steps} steps of {args.batch_size}x{crop}^2 "
                f"crops x {world} process(es) on {device}",
                flush=True,
            )

        def checkpoint(step: int, holdout_psnr: float | None) -> None:
            if not args.checkpoint:
                return
            gens = [gen.get_state()]
            if distributed:
                gens = [None] * world
                dist.all_gather_object(gens, gen.get_state())
            if rank == 0:
                save_checkpoint(
                    args.checkpoint,
                    {
                        "format": CHECKPOINT_FORMAT,
                        "config": config,
                        "model": model.state_dict(),
                        "optimizer": opt.state_dict(),
                        "scaler": scaler.state_dict() if scaler.is_enabled() else None,
                        "amp": args.amp,
                        "step": step,
                        "generators": gens,
                        "operator": None if args.pairs else args.operator,
                        "holdout_psnr": holdout_psnr,
                    },
                )

        last_psnr = None
        bar = tqdm(total=args.steps, initial=start, disable=rank != 0 or args.no_progress, unit="step", dynamic_ncols=True)
        loss_avg, t_last, seen = None, time.perf_counter(), 0
        model.train()
        for step in range(start, args.steps):
            for group in opt.param_groups:
                group["lr"] = learning_rate(args, step)
            x, y = sample_batch(data, args.batch_size, crop, gen)
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else contextlib.nullcontext():
                out = net(x)
            loss = F.mse_loss(out.float(), y)
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            done = step + 1
            seen += args.batch_size * world
            value = loss.item()
            loss_avg = value if loss_avg is None else 0.95 * loss_avg + 0.05 * value
            if rank == 0 and (done % 10 == 0 or done == args.steps):
                now = time.perf_counter()
                bar.set_postfix(loss=f"{loss_avg:.2e}", img_s=f"{seen / (now - t_last):.1f}", refresh=False)
                t_last, seen = now, 0
            bar.update(1)
            if (args.eval_every and done % args.eval_every == 0) or done == args.steps:
                if rank == 0:
                    scores = evaluate(model, data, device)
                    last_psnr = sum(scores) / len(scores)
                    bar.write(f"step {done}: held-out PSNR {last_psnr:.2f} dB ({', '.join(f'{s:.2f}' for s in scores)})")
            if done % args.checkpoint_every == 0 or done == args.steps:
                checkpoint(done, last_psnr)
        bar.close()
        if distributed:
            _check_replicas(model, world)
            _log(f"replicas identical across {world} processes", rank)
        if args.checkpoint:
            _log(f"checkpoint: {args.checkpoint}", rank)
        return model
    finally:
        if distributed:
            dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        run(args)
    except (ImageError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
