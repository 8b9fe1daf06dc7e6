"""Saliency evaluation metrics, matching the MIT saliency benchmark definitions.

Sources (definitions re-implemented from their text, not copied):

- Z. Bylinskii, T. Judd, A. Oliva, A. Torralba, F. Durand, "What do different evaluation
  metrics tell us about saliency models?", IEEE TPAMI 41(3), 2019.
- The MIT/Tuebingen saliency benchmark MATLAB code (github.com/cvzoya/saliency,
  ``code_forMetrics/``): ``CC.m``, ``KLdiv.m``, ``NSS.m``, ``similarity.m``, ``AUC_Judd.m``,
  ``AUC_Borji.m``, ``AUC_shuffled.m``, ``InfoGain.m``.
- M. Kümmerer, T. Wallis, M. Bethge, "Information-theoretic model comparison unifies saliency
  metrics", PNAS 112(52), 2015 (information gain).

Conventions shared by every numpy metric here:

- Maps are 2-D arrays of shape (H, W); any real dtype (uint8 maps are fine, every metric is
  invariant to the 1/255 of MATLAB's ``im2double``). Work is done in float64.
- ``pred`` is resized to the ground truth's (H, W) when the shapes differ, with Pillow's
  bilinear filter (see :func:`resize_bilinear`); ground-truth maps are never resized.
- A *fixation map* is a binary (H, W) map: every pixel > 0 is one fixation.
- Bad input raises ``ValueError`` with one sentence saying what is wrong: a ground-truth map
  that is all zeros, an empty fixation map, non-finite values, a map that is not 2-D.
- Where the MATLAB code returns NaN for a *constant prediction* (0/0 in a z-score or a
  min-max normalisation) we return the chance-level value instead, so that one flat map cannot
  turn a dataset mean into NaN: CC 0, NSS 0, AUC-Judd/Borji/shuffled 0.5, SIM 0 (a constant
  map minus its minimum is the zero map, which the benchmark scores 0), InfoGain treats it as
  the uniform distribution. KLD of a constant map is well defined (uniform) and computed.

Reading fixations (CSV, ``.mat``, binary maps) and building fixation maps on an image's grid
belong to the data, in ``train.data``; this module holds metrics (and the centre-prior baseline
map) only.

The ``*_torch`` functions are differentiable, batched versions of CC, KLD, NSS and SIM for
training losses; they agree with the numpy functions on same-size inputs.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

# MATLAB's ``eps`` (2^-52 = 2.2204e-16), used by KLdiv.m and InfoGain.m.
EPS: float = float(np.finfo(np.float64).eps)

# AUC_Judd.m adds rand/1e7 to every pixel to break ties before normalising.
JUDD_JITTER: float = 1e-7


# --------------------------------------------------------------------------------------------
# Input handling
# --------------------------------------------------------------------------------------------


def _as_map(a: np.ndarray, name: str) -> np.ndarray:
    """Return ``a`` as a finite float64 (H, W) array, or raise ValueError."""
    arr = np.asarray(a)
    if arr.ndim != 2:
        raise ValueError(f"{name} must be a 2-D (H, W) map, got shape {arr.shape}.")
    if arr.size == 0:
        raise ValueError(f"{name} is empty (shape {arr.shape}); pass a map with pixels.")
    arr = arr.astype(np.float64, copy=False)
    if not np.isfinite(arr).all():
        raise ValueError(f"{name} contains NaN or infinite values; clean the map first.")
    return arr


def _fixation_mask(fixation_map: np.ndarray, name: str = "fixation_map") -> np.ndarray:
    """Boolean (H, W) mask of fixated pixels (> 0); raises ValueError if there are none."""
    mask = _as_map(fixation_map, name) > 0
    if not mask.any():
        raise ValueError(
            f"{name} has no fixations (no pixel > 0); a metric needs at least one fixation."
        )
    return mask


def _density_gt(gt_map: np.ndarray) -> np.ndarray:
    """Validated float64 ground-truth density map (H, W); raises if it is all zeros."""
    gt = _as_map(gt_map, "gt_map")
    if not gt.any():
        raise ValueError("gt_map is all zeros; a ground-truth density map needs some mass.")
    return gt


def resize_bilinear(pred: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Resize a float map to ``shape`` = (H, W) bilinearly, as the benchmark's ``imresize``.

    Uses Pillow's BILINEAR filter on a float32 image. Why Pillow and not
    ``cv2.resize(INTER_LINEAR)``: both use pixel-centre alignment and give identical results
    when enlarging, but when shrinking MATLAB's ``imresize`` widens the triangle kernel
    (antialiasing) and so does Pillow, whereas OpenCV samples only the 2x2 nearest pixels and
    aliases. At the image border Pillow drops out-of-range taps and renormalises where MATLAB
    mirrors; that only matters when shrinking. float32 keeps about 7 significant digits, far
    inside the 1e-4 agreement we need. Returns the input (as float64) if already that shape.

    Args:
        pred: (h, w) real map.
        shape: target (H, W).

    Returns:
        (H, W) float64 map.
    """
    arr = np.asarray(pred, dtype=np.float64)
    h, w = int(shape[0]), int(shape[1])
    if arr.shape == (h, w):
        return arr
    img = Image.fromarray(np.ascontiguousarray(arr, dtype=np.float32))  # mode "F"
    return np.asarray(img.resize((w, h), Image.Resampling.BILINEAR), dtype=np.float64)


def resize_bilinear_torch(pred: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """Torch counterpart of :func:`resize_bilinear` for a batch, on the tensor's device.

    ``F.interpolate(mode="bilinear", align_corners=False, antialias=True)``: pixel-centre
    alignment, and when shrinking a triangle kernel widened by the scale factor with
    out-of-range taps dropped, as Pillow does (PyTorch's antialiased kernels follow Pillow's).
    Measured against :func:`resize_bilinear` at float32 rounding (tests/test_metrics.py).

    Args:
        pred: (B, h, w) or (B, 1, h, w) floating-point maps.
        shape: target (H, W).

    Returns:
        (B, H, W) maps in pred's dtype (pred itself, squeezed, if already that size).
    """
    x = pred if pred.dim() == 4 else pred[:, None]
    if x.dim() != 4 or x.shape[1] != 1:
        raise ValueError(f"pred must be (B, h, w) or (B, 1, h, w), got {tuple(pred.shape)}.")
    h, w = int(shape[0]), int(shape[1])
    if tuple(x.shape[-2:]) == (h, w):
        return x[:, 0]
    out = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False, antialias=True)
    # A constant map must stay exactly constant, so that the metrics' exact constancy test gives
    # it the chance value: the antialiased weights sum to 1 only up to float rounding, and a
    # shrunk constant map would otherwise come back with 1-ulp ripples that z-scoring blows up.
    flat = x.flatten(1)
    lo = flat.amin(dim=1)
    const = (lo == flat.amax(dim=1)).view(-1, 1, 1, 1)
    return torch.where(const, lo.view(-1, 1, 1, 1).to(out.dtype), out)[:, 0]


def _pred_for(pred: np.ndarray, shape: tuple[int, int], name: str = "pred") -> np.ndarray:
    """Validate ``pred`` and bring it to ``shape`` (H, W); float64."""
    return resize_bilinear(_as_map(pred, name), shape)


def _minmax(x: np.ndarray) -> np.ndarray | None:
    """Scale to [0, 1]; None for a constant map, where (x - min) / (max - min) is 0/0."""
    lo, hi = x.min(), x.max()
    if hi == lo:
        return None
    return (x - lo) / (hi - lo)


# --------------------------------------------------------------------------------------------
# Distribution-based metrics
# --------------------------------------------------------------------------------------------


def cc(pred: np.ndarray, gt_map: np.ndarray) -> float:
    """Pearson linear correlation coefficient (CC.m).

    Both maps are z-scored and correlated, which equals Pearson's r of the raw maps, so the
    std convention (ddof) does not matter here.

    Args:
        pred: (h, w) prediction, resized to gt's (H, W) if needed.
        gt_map: (H, W) ground-truth density map (any scale), not all zeros, not constant.

    Returns:
        CC in [-1, 1]; 0.0 for a constant ``pred`` (MATLAB gives NaN).
    """
    gt = _density_gt(gt_map)
    p = _pred_for(pred, gt.shape)
    if gt.max() == gt.min():
        raise ValueError("gt_map is constant; its correlation with any map is undefined.")
    # Test constancy exactly on the values: p - p.mean() of a constant map can be +-1 ulp,
    # which z-scoring would blow up into noise.
    if p.max() == p.min():
        return 0.0
    g = gt - gt.mean()
    q = p - p.mean()
    return float(np.sum(q * g) / np.sqrt(np.sum(q * q) * np.sum(g * g)))


def kld(pred: np.ndarray, gt_map: np.ndarray) -> float:
    """KL divergence KL(gt || pred) in nats (KLdiv.m).

    Both maps are divided by their sums, then ``sum(G * log(EPS + G / (P + EPS)))`` with
    EPS = 2.2204e-16 (MATLAB ``eps``). Lower is better; 0 for identical maps.

    Args:
        pred: (h, w) non-negative prediction, resized to gt's (H, W) if needed. An all-zero
            prediction stays zero (as in KLdiv.m) and scores about -log(EPS) = 36.04 per unit
            of ground-truth mass.
        gt_map: (H, W) non-negative ground-truth density map, not all zeros.

    Returns:
        KLD >= 0 (up to EPS terms).
    """
    gt = _density_gt(gt_map)
    p = _pred_for(pred, gt.shape)
    if (p < 0).any() or (gt < 0).any():
        raise ValueError("kld needs non-negative maps (they are treated as distributions).")
    g = gt / gt.sum()
    if p.any():
        p = p / p.sum()
    return float(np.sum(g * np.log(EPS + g / (p + EPS))))


def sim(pred: np.ndarray, gt_map: np.ndarray) -> float:
    """Similarity, i.e. histogram intersection (similarity.m).

    Each map is min-max scaled to [0, 1], then divided by its sum, and
    ``sum(min(P, G))`` is returned. The min-max step keeps a model from gaining by adding a
    constant to every pixel.

    Args:
        pred: (h, w) prediction, resized to gt's (H, W) if needed.
        gt_map: (H, W) ground-truth density map, not all zeros, not constant.

    Returns:
        SIM in [0, 1]; 1 for identical maps. 0.0 for a constant (or all-zero) ``pred``:
        after removing its minimum it is the zero map, which similarity.m scores 0.
    """
    gt = _density_gt(gt_map)
    p = _pred_for(pred, gt.shape)
    g = _minmax(gt)
    if g is None:
        raise ValueError("gt_map is constant; SIM needs a ground-truth map with contrast.")
    g = g / g.sum()
    q = _minmax(p)
    if q is None:
        return 0.0
    q = q / q.sum()
    return float(np.sum(np.minimum(q, g)))


# --------------------------------------------------------------------------------------------
# Location-based metrics
# --------------------------------------------------------------------------------------------


def nss(pred: np.ndarray, fixation_map: np.ndarray) -> float:
    """Normalized Scanpath Saliency (NSS.m).

    The (resized) prediction is z-scored over all pixels with the sample standard deviation
    (ddof=1, MATLAB's ``std``), then averaged over the fixated pixels.

    Args:
        pred: (h, w) prediction, resized to the fixation map's (H, W) if needed.
        fixation_map: (H, W) binary map; every pixel > 0 is a fixation (at least one).

    Returns:
        NSS (unbounded; 0 is chance). 0.0 for a constant ``pred`` (MATLAB gives NaN).
    """
    mask = _fixation_mask(fixation_map)
    p = _pred_for(pred, mask.shape)
    # Exact test on the values (a 1-pixel map counts as constant): the std of a constant map
    # can come out as 1e-17 instead of 0, and z-scoring would then amplify rounding noise.
    if p.max() == p.min():
        return 0.0
    return float(np.mean((p[mask] - p.mean()) / np.std(p, ddof=1)))


def auc_judd(
    pred: np.ndarray,
    fixation_map: np.ndarray,
    jitter: bool = True,
    rng: np.random.Generator | int | None = None,
) -> float:
    """AUC-Judd (AUC_Judd.m): ROC area with thresholds at the fixated saliency values.

    Steps, as in the benchmark: resize; optionally add ``uniform[0, 1) * 1e-7`` per pixel to
    break ties; min-max scale to [0, 1]; sweep thresholds over the fixated values in
    descending order. At the i-th threshold t, TPR = i / n_fix and
    FPR = (#pixels >= t - i) / (n_pixels - n_fix); (0, 0) and (1, 1) close the curve, which is
    integrated with the trapezoid rule.

    Note the jitter is absolute, added *before* normalisation, exactly as AUC_Judd.m does: for
    predictions whose values are far below 1e-5 (e.g. a density summing to 1 over a large
    image) it reorders pixels. Pass maps scaled to about [0, 1] or [0, 255].

    Args:
        pred: (h, w) prediction, resized to the fixation map's (H, W) if needed.
        fixation_map: (H, W) binary map; pixels > 0 are fixations (at least one, and not all).
        jitter: add the benchmark's tie-breaking noise.
        rng: numpy Generator or seed for the jitter.

    Returns:
        AUC in [0, 1]; 0.5 for a constant ``pred`` without jitter (MATLAB gives NaN).
    """
    mask = _fixation_mask(fixation_map)
    s = _pred_for(pred, mask.shape)
    if jitter:
        s = s + np.random.default_rng(rng).random(s.shape) * JUDD_JITTER
    s = _minmax(s)
    if s is None:
        return 0.5
    n_pix = s.size
    pos = s[mask]
    n_fix = pos.size
    if n_fix == n_pix:
        raise ValueError("fixation_map marks every pixel; AUC needs some non-fixated pixels.")
    thresholds = np.sort(pos)[::-1]
    # Count of pixels >= each threshold, via one sort of the whole map instead of a pass per
    # fixation.
    above = n_pix - np.searchsorted(np.sort(s.ravel()), thresholds, side="left")
    i = np.arange(1, n_fix + 1)
    tp = np.concatenate(([0.0], i / n_fix, [1.0]))
    fp = np.concatenate(([0.0], (above - i) / (n_pix - n_fix), [1.0]))
    return float(np.trapezoid(tp, fp))


def _step_thresholds(top: float, step: float) -> np.ndarray:
    """MATLAB's ``fliplr(0:step:top)``: multiples of ``step`` from <= top down to 0."""
    # The small tolerance mirrors MATLAB's colon, which keeps the end point in 0:0.1:0.3
    # even though 0.3 / 0.1 = 2.9999999999999996 in floating point.
    n = int(np.floor(top / step + 1e-10)) + 1
    return (np.arange(n) * step)[::-1]


def _split_auc(pos: np.ndarray, neg: np.ndarray, step: float) -> float:
    """ROC area of fixated values ``pos`` (n,) against negatives ``neg`` (m,).

    Thresholds are ``0:step:max(pos, neg)`` as in AUC_Borji.m / AUC_shuffled.m; TPR and FPR
    are the fractions >= each threshold, closed with (0, 0) and (1, 1).
    """
    thr = _step_thresholds(float(max(pos.max(), neg.max())), step)
    tp = (pos[None, :] >= thr[:, None]).mean(axis=1)
    fp = (neg[None, :] >= thr[:, None]).mean(axis=1)
    tp = np.concatenate(([0.0], tp, [1.0]))
    fp = np.concatenate(([0.0], fp, [1.0]))
    return float(np.trapezoid(tp, fp))


def _check_splits(n_splits: int, step: float) -> None:
    if n_splits < 1:
        raise ValueError(f"n_splits must be at least 1, got {n_splits}.")
    if not step > 0:
        raise ValueError(f"step must be positive, got {step}.")


def auc_borji(
    pred: np.ndarray,
    fixation_map: np.ndarray,
    n_splits: int = 100,
    step: float = 0.1,
    rng: np.random.Generator | int | None = None,
) -> float:
    """AUC-Borji (AUC_Borji.m): fixations against uniformly random pixels.

    The prediction is min-max scaled to [0, 1]. For each of ``n_splits`` splits, as many
    pixels as there are fixations are drawn uniformly with replacement from the whole map
    (fixated pixels included) as negatives; thresholds sweep ``0:step:max`` and the split's
    ROC area is the trapezoid rule. Returns the mean over splits.

    Args:
        pred: (h, w) prediction, resized to the fixation map's (H, W) if needed.
        fixation_map: (H, W) binary map; pixels > 0 are fixations (at least one; MATLAB
            returns NaN for a single fixation, we compute it).
        n_splits: number of random negative sets.
        step: threshold step on the [0, 1] scale.
        rng: numpy Generator or seed for the negatives.

    Returns:
        AUC in [0, 1]; 0.5 for a constant ``pred`` (MATLAB gives NaN).
    """
    _check_splits(n_splits, step)
    mask = _fixation_mask(fixation_map)
    s = _minmax(_pred_for(pred, mask.shape))
    if s is None:
        return 0.5
    flat = s.ravel()
    pos = s[mask]
    gen = np.random.default_rng(rng)
    neg_idx = gen.integers(0, flat.size, size=(n_splits, pos.size))
    return float(np.mean([_split_auc(pos, flat[idx], step) for idx in neg_idx]))


def sauc(
    pred: np.ndarray,
    fixation_map: np.ndarray,
    other_fixation_map: np.ndarray,
    n_splits: int = 100,
    step: float = 0.1,
    rng: np.random.Generator | int | None = None,
) -> float:
    """Shuffled AUC (AUC_shuffled.m): fixations against other images' fixations.

    Like :func:`auc_borji`, but each split's negatives are
    ``min(n_fix, n_other)`` pixels drawn *without* replacement from the fixated pixels of
    ``other_fixation_map`` (the union of fixations on other images of the dataset, mapped to
    this image's grid; see ``train.data.other_fixation_map``). Because the negatives share the
    dataset's centre bias, a pure centre prior scores about 0.5.

    Args:
        pred: (h, w) prediction, resized to the fixation map's (H, W) if needed.
        fixation_map: (H, W) binary map of this image's fixations (pixels > 0).
        other_fixation_map: (H, W) binary map of other images' fixations (pixels > 0); must
            have the fixation map's shape (build it with ``train.data.other_fixation_map``).
        n_splits: number of random negative sets.
        step: threshold step on the [0, 1] scale.
        rng: numpy Generator or seed for the negatives.

    Returns:
        sAUC in [0, 1]; 0.5 for a constant ``pred`` (MATLAB gives NaN).
    """
    _check_splits(n_splits, step)
    mask = _fixation_mask(fixation_map)
    other = _fixation_mask(other_fixation_map, "other_fixation_map")
    if other.shape != mask.shape:
        raise ValueError(
            f"other_fixation_map has shape {other.shape} but fixation_map has {mask.shape}; "
            "build it for this image's size with other_fixation_map(..., shape)."
        )
    s = _minmax(_pred_for(pred, mask.shape))
    if s is None:
        return 0.5
    pos = s[mask]
    other_values = s[other]
    n_neg = min(pos.size, other_values.size)
    gen = np.random.default_rng(rng)
    aucs = [
        _split_auc(pos, other_values[gen.permutation(other_values.size)[:n_neg]], step)
        for _ in range(n_splits)
    ]
    return float(np.mean(aucs))


def info_gain(pred: np.ndarray, fixation_map: np.ndarray, baseline: np.ndarray) -> float:
    """Information gain over a baseline, in bits per fixation (InfoGain.m).

    Both maps are resized to the fixation map's size, min-max scaled to [0, 1] and divided
    by their sums; the score is ``mean(log2(EPS + P[fix]) - log2(EPS + B[fix]))``. Note the
    min-max step (kept from InfoGain.m) gives each map's minimum pixel probability 0, so a
    fixation there costs about log2(EPS) = -52 bits.

    Args:
        pred: (h, w) prediction.
        fixation_map: (H, W) binary map; pixels > 0 are fixations.
        baseline: (h', w') baseline map, e.g. :func:`center_prior` or other images' fixations.

    Returns:
        IG in bits per fixation (0 when pred equals baseline). A constant map is taken as
        the uniform distribution (InfoGain.m gives NaN).
    """
    mask = _fixation_mask(fixation_map)

    def as_distribution(m: np.ndarray, name: str) -> np.ndarray:
        scaled = _minmax(_pred_for(m, mask.shape, name))
        if scaled is None:
            return np.full(mask.shape, 1.0 / mask.size)
        return scaled / scaled.sum()

    p = as_distribution(pred, "pred")
    b = as_distribution(baseline, "baseline")
    return float(np.mean(np.log2(EPS + p[mask]) - np.log2(EPS + b[mask])))


# --------------------------------------------------------------------------------------------
# Baselines
# --------------------------------------------------------------------------------------------


def center_prior(shape: tuple[int, int], sigma_frac: float = 0.2) -> np.ndarray:
    """Gaussian centre-bias baseline map, stretched to the image's aspect ratio.

    The MIT benchmark's "centre" baseline is a single Gaussian blob scaled to the image's
    aspect ratio, i.e. isotropic in normalised image coordinates. We use a standard deviation
    of ``sigma_frac`` times the height (vertically) and the width (horizontally). Why 0.2: it
    is the measured spread of free-viewing fixations; on nus_scene (43,894 fixations, 500
    images) the standard deviation of fixation positions is 0.21 of the width and 0.16 of the
    height, and on 20 of its images 0.2 scored better CC, KLD, NSS and SIM than 0.25 or 0.3,
    with the same AUC-Borji. The ranking of pixels, hence AUC-Judd, does not depend on it.

    Args:
        shape: (H, W) of the map.
        sigma_frac: standard deviation as a fraction of each side.

    Returns:
        (H, W) float64 map, 1.0 at the centre, exp(-r^2 / 2) falloff.
    """
    h, w = int(shape[0]), int(shape[1])
    if h < 1 or w < 1:
        raise ValueError(f"center_prior needs a positive (H, W) shape, got {shape}.")
    if not sigma_frac > 0:
        raise ValueError(f"sigma_frac must be positive, got {sigma_frac}.")
    # Pixel centres, measured from the image centre in units of the side length.
    y = (np.arange(h) - (h - 1) / 2.0) / (sigma_frac * h)
    x = (np.arange(w) - (w - 1) / 2.0) / (sigma_frac * w)
    return np.exp(-0.5 * (y[:, None] ** 2 + x[None, :] ** 2))


# --------------------------------------------------------------------------------------------
# Differentiable torch versions (training losses)
# --------------------------------------------------------------------------------------------
#
# Inputs are (B, H, W) or (B, 1, H, W) tensors of the same shape; no resizing (interpolate
# before calling). Each returns a (B,) tensor. Computation stays in the prediction's dtype:
# float64 agrees with the numpy functions to ~1e-12, float32 to ~1e-5 relative (no upcast, so
# a float32 loss stays cheap on a GPU). EPS (2.2204e-16) is a normal float32 number (the
# smallest is 1.2e-38) and is kept as is: in either precision it only changes ``P + EPS``
# where P is (nearly) zero, and EPS / EPS-scale ratios such as G / EPS (< 1e16) stay far below
# float32's 3.4e38, so float32 differs from float64 only by ordinary rounding. Degenerate
# samples take the numpy functions' values through ``torch.where`` with safe denominators, so
# their gradients are zero, never NaN. Data errors the numpy functions reject (all-zero or
# constant ground truth, empty fixation maps, negative maps in KLD) raise ValueError here too;
# the check costs one device synchronisation per call.


def _flat_pair(
    pred: torch.Tensor, other: torch.Tensor, name: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Flatten (B, H, W) / (B, 1, H, W) tensors to (B, H*W); ``other`` in pred's dtype."""
    if pred.dim() == 4 and pred.shape[1] == 1:
        pred = pred[:, 0]
    if other.dim() == 4 and other.shape[1] == 1:
        other = other[:, 0]
    if pred.dim() != 3:
        raise ValueError(f"pred must be (B, H, W) or (B, 1, H, W), got {tuple(pred.shape)}.")
    if other.shape != pred.shape:
        raise ValueError(
            f"{name} has shape {tuple(other.shape)} but pred has {tuple(pred.shape)}; "
            "resize pred to the ground truth first."
        )
    if not pred.is_floating_point():
        raise ValueError(f"pred must be a floating-point tensor, got {pred.dtype}.")
    b = pred.shape[0]
    return pred.reshape(b, -1), other.reshape(b, -1).to(pred.dtype)


def _raise_if(cond: torch.Tensor, message: str) -> None:
    if bool(cond.any()):
        raise ValueError(message)


def _safe_div(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """num / den where den != 0, else num unchanged (the benchmark's 'zero map stays zero')."""
    ok = den != 0
    return num / torch.where(ok, den, torch.ones_like(den))


def cc_torch(pred: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    """Differentiable :func:`cc`: (B, H, W) or (B, 1, H, W) pred and gt -> (B,) CC.

    A constant prediction scores 0 with zero gradient.
    """
    p, g = _flat_pair(pred, gt, "gt")
    _raise_if(
        g.amax(dim=1) == g.amin(dim=1),
        "a gt map in the batch is constant or all zeros; CC is undefined.",
    )
    # Constancy is tested on the values, not on the variance, which rounding can leave at
    # 1e-17 for a constant map (see nss).
    ok = p.amax(dim=1) > p.amin(dim=1)
    p = p - p.mean(dim=1, keepdim=True)
    g = g - g.mean(dim=1, keepdim=True)
    den2 = (p * p).sum(dim=1) * (g * g).sum(dim=1)
    # sqrt of a safe value: sqrt'(0) is infinite and would poison the masked branch.
    score = (p * g).sum(dim=1) / torch.sqrt(torch.where(ok, den2, torch.ones_like(den2)))
    return torch.where(ok, score, torch.zeros_like(score))


def kld_torch(pred: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    """Differentiable :func:`kld`: KL(gt || pred) in nats per sample, shape (B,).

    pred and gt are (B, H, W) or (B, 1, H, W), non-negative; each is divided by its sum
    (an all-zero pred stays zero, as in KLdiv.m).
    """
    p, g = _flat_pair(pred, gt, "gt")
    gs = g.sum(dim=1, keepdim=True)
    _raise_if(
        (gs == 0).any() | (g < 0).any() | (p < 0).any(),
        "kld_torch needs non-negative maps and no all-zero gt map in the batch.",
    )
    p = _safe_div(p, p.sum(dim=1, keepdim=True))
    g = g / gs
    return (g * torch.log(EPS + g / (p + EPS))).sum(dim=1)


def nss_torch(pred: torch.Tensor, fixations: torch.Tensor) -> torch.Tensor:
    """Differentiable :func:`nss`: (B, H, W) or (B, 1, H, W) pred and binary fixations -> (B,).

    z-score with the sample std (ddof=1, like NSS.m), mean over pixels where fixations > 0.
    A constant prediction scores 0 with zero gradient.
    """
    p, f = _flat_pair(pred, fixations, "fixations")
    f = (f > 0).to(p.dtype)
    n_fix = f.sum(dim=1)
    _raise_if(n_fix == 0, "a fixation map in the batch has no fixations (no pixel > 0).")
    n = p.shape[1]
    ok = p.amax(dim=1) > p.amin(dim=1)  # exact constancy test, as in nss
    c = p - p.mean(dim=1, keepdim=True)
    var = (c * c).sum(dim=1) / max(n - 1, 1)
    sd = torch.sqrt(torch.where(ok, var, torch.ones_like(var)))
    score = (c * f).sum(dim=1) / (sd * n_fix)
    return torch.where(ok, score, torch.zeros_like(score))


def _minmax_sum_torch(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Min-max scale then sum-normalise rows of (B, N); constant rows become zero rows.

    Returns the normalised (B, N) tensor and a (B,) bool of rows that were constant.
    """
    lo = x.amin(dim=1, keepdim=True)
    span = x.amax(dim=1, keepdim=True) - lo
    x = _safe_div(x - lo, span)  # constant row: x - lo is 0, stays 0
    return _safe_div(x, x.sum(dim=1, keepdim=True)), (span == 0).squeeze(1)


def sim_torch(pred: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    """Differentiable :func:`sim`: (B, H, W) or (B, 1, H, W) pred and gt -> (B,) SIM.

    A constant prediction is the zero map after min-max scaling and scores 0.
    """
    p, g = _flat_pair(pred, gt, "gt")
    g, g_const = _minmax_sum_torch(g)
    _raise_if(g_const, "a gt map in the batch is constant or all zeros; SIM is undefined.")
    p, _ = _minmax_sum_torch(p)
    return torch.minimum(p, g).sum(dim=1)
