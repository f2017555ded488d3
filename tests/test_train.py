"""The command-line jobs: bilateral_ops.train (data, checkpoints, resume, errors, DDP),
bilateral_ops.enhance and the demo."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

cv2 = pytest.importorskip("cv2")

from bilateral_ops import enhance, images, train  # noqa: E402
from bilateral_ops.models import HDRNet  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
SMALL_NET = ["--luma-bins", "4", "--spatial-bins", "8", "--net-input-size", "32", "--guide-pts", "4"]


def _write(path, rgb: np.ndarray) -> None:
    assert cv2.imwrite(str(path), np.ascontiguousarray(rgb[..., ::-1]))


def _photo(h: int, w: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[0:h, 0:w] / max(h, w)
    base = np.stack([np.sin(3 * xs + seed), np.cos(2 * ys - seed), np.sin(xs * ys * 5)], -1) * 0.4 + 0.5
    return np.clip((base + 0.05 * rng.standard_normal((h, w, 3))) * 255, 0, 255).astype(np.uint8)


@pytest.fixture
def pairs(tmp_path):
    """Five input/target pairs of different sizes; the target is a gamma curve of the input."""
    ind, tgt = tmp_path / "in", tmp_path / "target"
    ind.mkdir(), tgt.mkdir()
    for i, (h, w) in enumerate([(40, 52), (48, 40), (37, 61), (44, 44), (50, 35)]):
        x = _photo(h, w, i)
        y = (255 * (x / 255.0) ** 0.7).astype(np.uint8)
        _write(ind / f"img{i}.png", x)
        _write(tgt / f"img{i}.png", y)
    return str(ind), str(tgt)


def _train_args(pairs, ckpt, steps, *extra):
    return [
        "--pairs", *pairs, "--checkpoint", str(ckpt), "--steps", str(steps), "--crop", "32",
        "--batch-size", "2", "--eval-every", "2", "--checkpoint-every", "2", "--no-progress",
        "--threads", "1", *SMALL_NET, *extra,
    ]


def test_read_rgb_and_list_images(tmp_path, pairs):
    x = images.read_rgb(os.path.join(pairs[0], "img0.png"))
    assert x.shape == (3, 40, 52) and x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1
    # 16-bit PNGs keep their precision.
    arr16 = (np.random.default_rng(0).random((9, 11, 3)) * 65535).astype(np.uint16)
    cv2.imwrite(str(tmp_path / "deep.png"), arr16)
    x16 = images.read_rgb(str(tmp_path / "deep.png"))
    assert torch.allclose(x16, torch.from_numpy(arr16[..., ::-1] / 65535.0).permute(2, 0, 1).float())
    files = images.list_images([pairs[0], str(tmp_path / "deep.png")])
    assert [os.path.basename(f) for f in files] == [f"img{i}.png" for i in range(5)] + ["deep.png"]
    out = tmp_path / "o" / "w.png"
    images.write_png(str(out), x)
    assert torch.allclose(images.read_rgb(str(out)), x, atol=0.5 / 255 + 1e-6)
    assert [p for p in os.listdir(tmp_path / "o")] == ["w.png"]


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda d: None, "no such file"),
        (lambda d: open(d / "bad.png", "wb").write(b"not an image"), "not a readable image"),
        (lambda d: cv2.imwrite(str(d / "bad.png"), np.zeros((8, 8), np.uint8)), "grayscale"),
        (lambda d: cv2.imwrite(str(d / "bad.png"), np.zeros((8, 8, 4), np.uint8)), "RGBA"),
    ],
)
def test_read_rgb_errors_name_the_file(tmp_path, make, match):
    make(tmp_path)
    path = str(tmp_path / "bad.png")
    with pytest.raises(images.ImageError, match=match) as err:
        images.read_rgb(path)
    assert path in str(err.value)


def test_dataset_errors_name_the_file(tmp_path, pairs):
    ind, tgt = pairs
    _write(os.path.join(tgt, "img1.png"), _photo(10, 10, 1))  # wrong size
    with pytest.raises(images.ImageError, match="img1.png.*10x10.*40x48"):
        train.load_dataset(pairs=pairs)
    os.remove(os.path.join(tgt, "img1.png"))
    with pytest.raises(images.ImageError, match="img1.png: no target"):
        train.load_dataset(pairs=pairs)
    _write(os.path.join(tgt, "img1.png"), _photo(48, 40, 1))
    with pytest.raises(images.ImageError, match="'nope' not found"):
        train.load_dataset(pairs=pairs, holdout=["nope", "img0"])
    with pytest.raises(ValueError, match="at least two"):
        train.load_dataset(pairs=pairs, holdout=["img0"])
    with pytest.raises(images.ImageError, match="no such file or folder"):
        train.load_dataset(pairs=(str(tmp_path / "missing"), tgt))
    data = train.load_dataset(pairs=pairs)
    assert [n for n, _, _ in data.holdout] == ["img3", "img4"] and len(data.train) == 3


def test_train_writes_a_checkpoint_and_resumes(tmp_path, pairs, capsys):
    ckpt = tmp_path / "ck" / "m.pt"
    const = ("--schedule", "constant")
    assert train.main(_train_args(pairs, ckpt, 4, *const)) == 0
    out = capsys.readouterr().out
    assert "held-out PSNR" in out and "3 training images" in out
    state = train.load_checkpoint(str(ckpt))
    assert state["step"] == 4 and state["config"]["luma_bins"] == 4
    assert os.listdir(ckpt.parent) == ["m.pt"]  # no temporary file left behind
    # Resuming continues from step 4 to 6 exactly as one 6-step run does (same crops, same
    # optimiser state). The learning rate is constant: the cosine schedule spans --steps.
    assert train.main(_train_args(pairs, ckpt, 6, *const, "--resume")) == 0
    assert "resumed from" in capsys.readouterr().out
    straight = tmp_path / "straight.pt"
    assert train.main(_train_args(pairs, straight, 6, *const)) == 0
    a, b = train.load_checkpoint(str(ckpt)), train.load_checkpoint(str(straight))
    assert a["step"] == b["step"] == 6
    for k in a["model"]:
        assert torch.allclose(a["model"][k], b["model"][k], atol=1e-6), k
    # A network of another shape refuses to resume.
    assert train.main(_train_args(pairs, ckpt, 8, "--resume", "--luma-bins", "2")) == 2
    assert "trained with network" in capsys.readouterr().err


def test_mixed_precision_training(tmp_path, pairs, capsys):
    """--amp bf16 trains under autocast (our ops included) with float32 parameters and checkpoint,
    and learns: the held-out PSNR after training beats the untrained model's. fp16 is refused
    off CUDA."""
    ckpt = tmp_path / "amp.pt"
    assert train.main(_train_args(pairs, ckpt, 30, "--amp", "bf16", "--eval-every", "0", "--lr", "3e-3")) == 0
    state = train.load_checkpoint(str(ckpt))
    assert state["amp"] == "bf16" and state["scaler"] is None
    assert all(v.dtype == torch.float32 for v in state["model"].values() if v.is_floating_point())
    model = train.model_from_checkpoint(str(ckpt))
    data = train.load_dataset(pairs=pairs)
    fresh = HDRNet(**state["config"]).eval()
    trained = sum(train.evaluate(model, data, torch.device("cpu")))
    untrained = sum(train.evaluate(fresh, data, torch.device("cpu")))
    assert trained > untrained, (trained, untrained)
    with pytest.raises(SystemExit):
        train.parse_args(["--amp", "fp16", "--device", "cpu"])
    assert "needs a CUDA device" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert train.main(_train_args(pairs, tmp_path / "x.pt", 2, "--amp", "fp16")) == 2
        assert "needs a CUDA device" in capsys.readouterr().err
        return
    # On a GPU: float16 with the gradient scaler, its state checkpointed and resumed.
    ck16 = tmp_path / "fp16.pt"
    assert train.main(_train_args(pairs, ck16, 4, "--amp", "fp16", "--device", "cuda")) == 0
    st = train.load_checkpoint(str(ck16))
    assert st["amp"] == "fp16" and st["scaler"] is not None and st["scaler"]["scale"] > 0
    assert train.main(_train_args(pairs, ck16, 6, "--amp", "fp16", "--device", "cuda", "--resume")) == 0
    assert train.load_checkpoint(str(ck16))["step"] == 6


def test_cosine_schedule():
    args = train.parse_args(["--steps", "100", "--lr", "2e-3"])
    assert train.learning_rate(args, 0) == pytest.approx(2e-3)
    assert train.learning_rate(args, 50) == pytest.approx(2e-3 * (0.05 + 0.95 * 0.5))
    assert train.learning_rate(args, 100) == pytest.approx(1e-4)
    lrs = [train.learning_rate(args, s) for s in range(101)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))
    assert train.learning_rate(train.parse_args(["--schedule", "constant", "--lr", "3e-4"]), 77) == 3e-4


def test_a_bad_image_fails_before_anything_is_overwritten(tmp_path, pairs, capsys):
    ckpt = tmp_path / "m.pt"
    assert train.main(_train_args(pairs, ckpt, 2)) == 0
    before = ckpt.read_bytes()
    bad = os.path.join(pairs[0], "img2.png")
    cv2.imwrite(bad, np.zeros((37, 61), np.uint8))
    assert train.main(_train_args(pairs, ckpt, 4, "--resume")) == 2
    err = capsys.readouterr().err
    assert bad in err and "grayscale" in err
    assert ckpt.read_bytes() == before


def test_bad_checkpoint(tmp_path):
    path = tmp_path / "x.pt"
    torch.save({"weights": 1}, path)
    with pytest.raises(ValueError, match="not a bilateral_ops HDRNet checkpoint"):
        train.load_checkpoint(str(path))
    path.write_bytes(b"garbage")
    with pytest.raises(ValueError, match="not a readable checkpoint"):
        train.load_checkpoint(str(path))
    with pytest.raises(ValueError, match="no such checkpoint"):
        train.load_checkpoint(str(tmp_path / "none.pt"))


def test_operators_on_a_photo():
    x = torch.from_numpy(_photo(60, 70, 3)).permute(2, 0, 1).float() / 255
    for name, op in train.OPERATORS.items():
        y = op(x)
        assert y.shape == x.shape and y.dtype == torch.float32 and 0 <= y.min() and y.max() <= 1, name
        assert (y - x).abs().mean() > 1e-3, name
    # detail_enhance is OpenCV's, on the 8-bit BGR photo.
    bgr = np.ascontiguousarray(images.to_uint8(x)[..., ::-1])
    expected = torch.from_numpy(np.ascontiguousarray(cv2.detailEnhance(bgr)[..., ::-1])).permute(2, 0, 1) / 255.0
    assert torch.equal(train.detail_enhance(x), expected.float())


def test_enhance_cli(tmp_path, pairs, capsys):
    ckpt = tmp_path / "m.pt"
    assert train.main(_train_args(pairs, ckpt, 2)) == 0
    capsys.readouterr()
    out_dir = tmp_path / "out"
    single = os.path.join(pairs[1], "img0.png")
    assert enhance.main(["--checkpoint", str(ckpt), pairs[0], single, str(out_dir)]) == 0
    printed = capsys.readouterr().out
    assert "coeff ms" in printed and "slice ms" in printed and "wrote 6 image(s)" in printed
    assert sorted(os.listdir(out_dir)) == [f"img{i}.png" for i in range(5)]
    model = train.model_from_checkpoint(str(ckpt))
    x = images.read_rgb(os.path.join(pairs[0], "img2.png"))
    expected = images.to_uint8(enhance.enhance(model, x))
    got = cv2.imread(str(out_dir / "img2.png"))[..., ::-1]
    assert np.array_equal(got, expected)
    # The pure-torch twin gives the same pixels, up to rounding.
    assert enhance.main(["--checkpoint", str(ckpt), "--reference", single, str(tmp_path / "ref")]) == 0
    ref = cv2.imread(str(tmp_path / "ref" / "img0.png")).astype(int)
    ours = cv2.imread(str(out_dir / "img0.png")).astype(int)
    assert np.abs(ref - ours).max() <= 1
    assert enhance.main(["--checkpoint", str(ckpt), str(tmp_path / "none.png"), str(out_dir)]) == 2
    assert enhance.main(["--checkpoint", str(tmp_path / "none.pt"), single, str(out_dir)]) == 2


def test_timed_enhance_stages_compose_the_model():
    torch.manual_seed(0)
    model = HDRNet(luma_bins=4, spatial_bins=8, net_input_size=32, guide_pts=4).eval()
    x = torch.rand(3, 45, 67)
    out, t = enhance.timed_enhance(model, x, repeats=2)
    assert torch.equal(out, enhance.enhance(model, x))
    assert set(t) == {"coefficients", "guide", "slice_apply", "total"} and all(v > 0 for v in t.values())


def test_ddp_two_processes_keep_identical_replicas(tmp_path, pairs):
    out = tmp_path / "replicas"
    out.mkdir()
    ckpt = tmp_path / "ddp.pt"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
        os.path.join(HERE, "ddp_train_worker.py"), str(out), *_train_args(pairs, ckpt, 3, "--device", "cpu"),
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([HERE, os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "replicas identical across 2 processes" in proc.stdout
    a = torch.load(out / "rank0.pt", weights_only=True)
    b = torch.load(out / "rank1.pt", weights_only=True)
    torch.manual_seed(0)
    init = HDRNet(luma_bins=4, spatial_bins=8, net_input_size=32, guide_pts=4).state_dict()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert any(not torch.equal(a[k], init[k]) for k in a)  # it did train
    assert train.load_checkpoint(str(ckpt))["step"] == 3
    assert len(train.load_checkpoint(str(ckpt))["generators"]) == 2


@pytest.mark.slow
def test_demo_runs(tmp_path, capsys):
    pytest.importorskip("skimage")
    pytest.importorskip("matplotlib")
    from bilateral_ops import demo

    assert demo.main(["--out", str(tmp_path), "--steps", "2"]) == 0
    printed = capsys.readouterr().out
    assert "| chelsea |" in printed and "| coffee |" in printed
    for name in ("chelsea", "coffee"):
        for suffix in ("input", "ours", "target"):
            assert (tmp_path / f"{name}_{suffix}.png").is_file()
    assert (tmp_path / "comparison.png").is_file() and (tmp_path / "hdrnet.pt").is_file()
