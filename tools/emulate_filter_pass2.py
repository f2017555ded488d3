"""A CPU emulation, in float64, of the CUDA backward of bilateral_filter as launched from saved
weight sums (csrc/cuda/bilateral_filter.cu): filter_centre_kernel's gp and a, then
filter_pass2_fast_kernel tile by tile and thread by thread (its staged window, the tap ranges,
e_pq + e_qp), then the fold, checked against the compiled CPU backward on every border, self-guided
and joint, and the pixel masks. It checks the kernel's indexing where no GPU is at hand; keep it
in step with the kernel.

    python tools/emulate_filter_pass2.py
"""

import math

import torch

import bilateral_ops  # noqa: F401  (registers the ops)

ops = torch.ops.bilateral_ops
kTW, kTH = 32, 8  # launch::kFilterTileW, kFilterTileH


def border_index(i, n, border):
    """csrc/include/bilateral_ops/bilateral_filter.h's border_index."""
    if 0 <= i < n:
        return i
    if border == "reflect":
        return -i if i < 0 else 2 * (n - 1) - i
    if border == "replicate":
        return 0 if i < 0 else n - 1
    if border == "circular":
        return i + n if i < 0 else i - n
    return -1


def dterm(d, dist):
    return abs(d) if dist == "l1" else d * d


def dfinish(acc, dist):
    return acc * acc if dist == "l1" else acc


def dslope(d, acc, dist):
    if dist == "l2":
        return 2 * d
    return math.copysign(2 * acc, d) if abs(d) > 0 else 0.0


def emulate(x, gd, ks, sc, ss, border, dist, go, mask):
    N, C, H, W = x.shape
    self_ = gd is None
    g = x if self_ else gd
    Cg = g.shape[1]
    ky, kx = ks
    py, px = ky // 2, kx // 2
    Hp, Wp = H + ky - 1, W + kx - 1
    out, norm = ops._bilateral_filter_forward(x, gd, list(ks), sc, ss, border, dist)
    gp = go / norm[:, None]
    a = (gp * out).sum(1)
    need_value = mask[0]
    need_range = (self_ and mask[0]) or mask[1]
    gin = torch.zeros(N, C, Hp, Wp, dtype=torch.float64)
    ggd = torch.zeros(N, Cg, Hp, Wp, dtype=torch.float64)
    X, G, GP, A = x.tolist(), g.tolist(), gp.tolist(), a.tolist()
    for n in range(N):
        rc = 0.5 / sc[n].item() ** 2
        ay, ax = 0.5 / ss[n, 0].item() ** 2, 0.5 / ss[n, 1].item() ** 2
        for by in range(-(-Hp // kTH)):
            for bx in range(-(-Wp // kTW)):
                sw, shh = kTW + kx - 1, kTH + ky - 1
                oy, ox = by * kTH - (ky - 1), bx * kTW - (kx - 1)
                # The block's staged window: guide and input through the border maps, gp and a.
                sg, sgp, sa, sin = {}, {}, {}, {}
                for r in range(shh):
                    yy = oy + r
                    my = border_index(yy, H, border) if (-py <= yy < H + py) else -1
                    for c in range(sw):
                        xx = ox + c
                        mx = border_index(xx, W, border) if (-px <= xx < W + px) else -1
                        reads = my >= 0 and mx >= 0
                        inside = 0 <= yy < H and 0 <= xx < W
                        sg[r, c] = [G[n][ch][my][mx] if reads else 0.0 for ch in range(Cg)]
                        sin[r, c] = [X[n][ch][my][mx] if reads else 0.0 for ch in range(C)]
                        sgp[r, c] = [GP[n][ch][yy][xx] if inside else 0.0 for ch in range(C)]
                        sa[r, c] = A[n][yy][xx] if inside else 0.0
                for ty_ in range(kTH):
                    for tx_ in range(kTW):
                        qy, qx = by * kTH + ty_, bx * kTW + tx_
                        if qy >= Hp or qx >= Wp: continue
                        iy = border_index(qy - py, H, border)
                        ix = border_index(qx - px, W, border)
                        val = [0.0] * C
                        rng = [0.0] * Cg
                        if iy >= 0 and ix >= 0:
                            gq = [G[n][c][iy][ix] for c in range(Cg)]
                            iq = [X[n][c][iy][ix] for c in range(C)]
                            qc = need_range and py <= qy < py + H and px <= qx < px + W
                            own = (ty_ + ky - 1 - py, tx_ + kx - 1 - px)
                            gpq = sgp[own]
                            aq = sa[own]
                            tyl = 0 if qc else max(0, qy - H + 1)
                            tyh = ky - 1 if qc else min(ky - 1, qy)
                            txl = 0 if qc else max(0, qx - W + 1)
                            txh = kx - 1 if qc else min(kx - 1, qx)
                            for t_y in range(tyl, tyh + 1):
                                for t_x in range(txl, txh + 1):
                                    cpk = (ty_ + ky - 1 - t_y, tx_ + kx - 1 - t_x)
                                    delta = [gq[c] - sg[cpk][c] for c in range(Cg)]
                                    acc = sum(dterm(d, dist) for d in delta)
                                    sp = ((t_y - py) ** 2) * ay + ((t_x - px) ** 2) * ax
                                    wt = math.exp(-(dfinish(acc, dist) * rc + sp))
                                    if need_value:
                                        for c in range(C): val[c] += wt * sgp[cpk][c]
                                    if need_range:
                                        e = -(sa[cpk] + aq)
                                        for c in range(C):
                                            e += sgp[cpk][c] * iq[c]
                                            e += gpq[c] * (sg[cpk][c] if self_ else sin[cpk][c])
                                        h = -rc * e * wt
                                        for c in range(Cg): rng[c] += h * dslope(delta[c], acc, dist)
                        for c in range(C): gin[n, c, qy, qx] = val[c] + (rng[c] if self_ else 0.0)
                        for c in range(Cg): ggd[n, c, qy, qx] = rng[c]
    # fold
    gi = torch.zeros(N, C, H, W, dtype=torch.float64)
    gg = torch.zeros(N, Cg, H, W, dtype=torch.float64)
    for qy in range(Hp):
        iy = border_index(qy - py, H, border)
        for qx in range(Wp):
            ix = border_index(qx - px, W, border)
            if iy < 0 or ix < 0: continue
            gi[:, :, iy, ix] += gin[:, :, qy, qx]
            gg[:, :, iy, ix] += ggd[:, :, qy, qx]
    return gi, gg


def main() -> None:
    torch.manual_seed(0)
    worst = 0.0
    for (C, Cg, H, W, ky, kx) in [(3, None, 11, 37, 5, 3), (1, None, 1, 1, 3, 3), (3, 1, 9, 35, 5, 5), (1, 3, 10, 12, 3, 5), (3, 3, 5, 4, 5, 5)]:
        for border, dist in [("reflect", "l1"), ("replicate", "l2"), ("constant", "l1"), ("circular", "l2")]:
            if border == "reflect" and (ky // 2 >= H or kx // 2 >= W):
                continue
            if border == "circular" and (ky // 2 > H or kx // 2 > W):
                continue
            N = 2
            x = torch.rand(N, C, H, W, dtype=torch.float64)
            gd = None if Cg is None else torch.rand(N, Cg, H, W, dtype=torch.float64)
            sc = 0.1 + torch.rand(N, dtype=torch.float64)
            ss = 0.5 + 2 * torch.rand(N, 2, dtype=torch.float64)
            go = torch.rand(N, C, H, W, dtype=torch.float64) - 0.5
            for mask in ([True, False, False, False], [True, gd is not None, False, False], [False, gd is not None, False, False]):
                if not any(mask):
                    continue
                gi, gg = emulate(x, gd, (ky, kx), sc, ss, border, dist, go, mask)
                ref = ops._bilateral_filter_backward(go, x, gd, [ky, kx], sc, ss, border, dist, mask)
                if mask[0]:
                    e = (gi - ref[0]).abs().max().item()
                    worst = max(worst, e)
                    assert e < 1e-10, (C, Cg, H, W, border, dist, mask, "input", e)
                if mask[1]:
                    e = (gg - ref[1]).abs().max().item()
                    worst = max(worst, e)
                    assert e < 1e-10, (C, Cg, H, W, border, dist, mask, "guidance", e)
    print("emulated fast pass 2 matches the CPU backward; worst abs err", worst)


if __name__ == "__main__":
    main()
