"""A small CUDA workload for compute-sanitizer: every kernel of every op, both grid-gradient paths,
each dtype, odd sizes and hostile guides (NaN, +-inf, huge values). Run by bench/gpu_check.sh."""

import torch

import bilateral_ops as bo


def run(dtype: torch.dtype, deterministic: bool) -> None:
    torch.use_deterministic_algorithms(deterministic)
    g = torch.Generator(device="cuda").manual_seed(0)
    for n, ci, co, d, gh, gw, h, w, off in [(2, 3, 3, 8, 16, 16, 37, 53, True), (1, 1, 2, 1, 1, 1, 5, 3, False),
                                            (1, 4, 1, 24, 5, 7, 70, 129, True)]:
        c = co * (ci + int(off))
        grid = torch.randn(n, c, d, gh, gw, device="cuda", generator=g).to(dtype).requires_grad_()
        guide = (torch.rand(n, h, w, device="cuda", generator=g) * 1.6 - 0.3).to(dtype)
        guide.view(-1)[:4] = torch.tensor([float("nan"), float("inf"), -float("inf"), 1e30])
        guide.requires_grad_()
        inp = torch.randn(n, ci, h, w, device="cuda", generator=g).to(dtype).requires_grad_()
        bo.bilateral_slice_apply(grid, guide, inp, off).sum().backward()
        bo.bilateral_slice(grid, guide).sum().backward()
    torch.cuda.synchronize()
    torch.use_deterministic_algorithms(False)


if __name__ == "__main__":
    for dt in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
        for det in (False, True):
            run(dt, det)
    print("sanitize workload done")
