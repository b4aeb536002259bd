"""The pure-PyTorch mmcv.ops stand-ins (transfer/mmcv_compat.py) against their reference formulas, and the
install switch: active only without mmcv._ext, enough for `import mmseg.models`."""
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from transfer.mmcv_compat import point_sample, sigmoid_focal_loss

ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------------------------- point_sample
def bilinear_reference(img: torch.Tensor, x: float, y: float, align_corners: bool) -> torch.Tensor:
    """Direct bilinear formula on one (C, H, W) image at normalised (x, y) in [0, 1], zero outside.

    align_corners=False: pixel i covers [i, i+1) of the image width, its centre is at (i + 0.5) / W;
    align_corners=True: pixel centres at i / (W - 1)."""
    c, h, w = img.shape
    if align_corners:
        px, py = x * (w - 1), y * (h - 1)
    else:
        px, py = x * w - 0.5, y * h - 0.5
    x0, y0 = math.floor(px), math.floor(py)
    out = torch.zeros(c, dtype=img.dtype)
    for yy, wy in ((y0, 1 - (py - y0)), (y0 + 1, py - y0)):
        for xx, wx in ((x0, 1 - (px - x0)), (x0 + 1, px - x0)):
            if 0 <= yy < h and 0 <= xx < w:
                out += wy * wx * img[:, yy, xx]
    return out


@pytest.mark.parametrize("align_corners", [False, True])
def test_point_sample_matches_bilinear_formula(align_corners):
    g = torch.Generator().manual_seed(0)
    img = torch.randn(2, 3, 5, 7, generator=g, dtype=torch.float64)
    # inside, on pixel centres, on the borders and slightly outside (zero padding)
    pts = torch.rand(2, 40, 2, generator=g, dtype=torch.float64) * 1.2 - 0.1
    pts[:, 0] = torch.tensor([0.5 / 7, 0.5 / 5], dtype=torch.float64)  # centre of pixel (0, 0)
    pts[:, 1] = torch.tensor([0.0, 0.0], dtype=torch.float64)
    pts[:, 2] = torch.tensor([1.0, 1.0], dtype=torch.float64)
    out = point_sample(img, pts, align_corners=align_corners)
    assert out.shape == (2, 3, 40)
    for n in range(2):
        for p in range(40):
            ref = bilinear_reference(img[n], float(pts[n, p, 0]), float(pts[n, p, 1]), align_corners)
            torch.testing.assert_close(out[n, :, p], ref, rtol=1e-10, atol=1e-10)
    if not align_corners:
        torch.testing.assert_close(out[:, :, 0], img[:, :, 0, 0])


def test_point_sample_grid_input_and_gradient():
    g = torch.Generator().manual_seed(1)
    img = torch.randn(1, 2, 4, 4, generator=g, dtype=torch.float64, requires_grad=True)
    grid = torch.rand(1, 3, 5, 2, generator=g, dtype=torch.float64)
    out = point_sample(img, grid)
    assert out.shape == (1, 2, 3, 5)
    flat = point_sample(img, grid.reshape(1, 15, 2))
    torch.testing.assert_close(out.reshape(1, 2, 15), flat)
    assert torch.autograd.gradcheck(lambda im: point_sample(im, grid), (img,))


# ----------------------------------------------------------------------------------------------- focal loss
def focal_reference(logits, target, gamma, alpha, weight, reduction):
    """mmcv's sigmoid focal loss kernel, element by element in float64."""
    n, c = logits.shape
    out = torch.zeros(n, c, dtype=torch.float64)
    for i in range(n):
        t = int(target[i])
        for k in range(c):
            p = 1.0 / (1.0 + math.exp(-float(logits[i, k])))
            if t == k:
                v = -alpha * (1 - p) ** gamma * math.log(max(p, 1.17549435e-38))
            else:
                v = -(1 - alpha) * p ** gamma * math.log(max(1 - p, 1.17549435e-38))
            if weight is not None and t < c:
                v *= float(weight[t])
            out[i, k] = v
    return {"none": out, "sum": out.sum(), "mean": out.sum() / n}[reduction]


@pytest.mark.parametrize("gamma,alpha", [(2.0, 0.25), (0.0, 0.5), (1.5, 0.75)])
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("weighted", [False, True])
def test_sigmoid_focal_loss_matches_formula(gamma, alpha, reduction, weighted):
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(9, 4, generator=g, dtype=torch.float64) * 3
    target = torch.tensor([0, 1, 2, 3, 4, 4, 1, 0, 3])  # 4 = background (negative for every class)
    weight = torch.rand(4, generator=g, dtype=torch.float64) + 0.5 if weighted else None
    got = sigmoid_focal_loss(logits, target, gamma, alpha, weight, reduction)
    torch.testing.assert_close(got, focal_reference(logits, target, gamma, alpha, weight, reduction),
                               rtol=1e-9, atol=1e-12)


def test_sigmoid_focal_loss_gradient_and_extremes():
    g = torch.Generator().manual_seed(3)
    logits = (torch.randn(5, 3, generator=g, dtype=torch.float64) * 2).requires_grad_()
    target = torch.tensor([0, 2, 3, 1, 1])
    assert torch.autograd.gradcheck(lambda x: sigmoid_focal_loss(x, target, 2.0, 0.25, None, "mean"), (logits,))
    big = torch.tensor([[200.0, -200.0]])  # log(1-p) and log(p) hit the kernel's FLT_MIN clamp: finite
    loss = sigmoid_focal_loss(big, torch.tensor([1]), 0.0, 0.25, None, "none")
    assert torch.isfinite(loss).all()
    torch.testing.assert_close(loss, torch.tensor([[-0.75 * math.log(1.17549435e-38),
                                                    -0.25 * math.log(1.17549435e-38)]]))
    with pytest.raises(ValueError):
        sigmoid_focal_loss(logits, target, reduction="avg")


# ----------------------------------------------------------------------------------------------- install switch
def _python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})


def test_import_mmseg_models_with_compat_layer():
    proc = _python("""
import importlib.util
from transfer import mmcv_compat
assert importlib.util.find_spec('mmcv._ext') is None, 'this test is for mmcv-lite'
assert mmcv_compat.install() is True
import mmseg.models
from mmseg.models.decode_heads import UPerHead, FCNHead, cc_head, psa_head
import mmseg.models.losses.focal_loss as focal, mmseg.utils.mask_classification as mc
assert cc_head.CrissCrossAttention is None and psa_head.PSAMask is None   # guarded imports fell back
try:
    from mmcv.ops import DeformConv2d
except ModuleNotFoundError as e:
    assert 'mmcv._ext' in str(e)
else:
    raise AssertionError('DeformConv2d imported without compiled ops')
assert focal._sigmoid_focal_loss is mmcv_compat.sigmoid_focal_loss   # mmseg runs on the stand-ins
assert mc.point_sample is mmcv_compat.point_sample
print('ok')
""")
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]


def test_stays_out_of_the_way_with_compiled_ops():
    proc = _python("""
import importlib.machinery, sys, types
ext = types.ModuleType('mmcv._ext'); ext.__spec__ = importlib.machinery.ModuleSpec('mmcv._ext', None)
sys.modules['mmcv._ext'] = ext          # what full mmcv provides
from transfer import mmcv_compat
assert mmcv_compat.compiled_ops_available()
assert mmcv_compat.install() is False
assert 'mmcv.ops' not in sys.modules and not mmcv_compat.is_installed()
print('ok')
""")
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]
