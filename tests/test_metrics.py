"""Tests for train/metrics.py: analytic cases, hand-worked examples, resizing, torch parity,
error messages, and a check on real eye-tracking data (skipped when it is absent). The fixation
helpers the metrics are fed with (CSV reading, fixation maps) live in train/data.py and are
tested here beside them."""

from __future__ import annotations

import math
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from train import data as D
from train import metrics as M

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "nus_scene"


def smooth_map(shape: tuple[int, int], seed: int) -> np.ndarray:
    """A positive, smooth-ish random map of the given (H, W): a few Gaussian blobs."""
    rng = np.random.default_rng(seed)
    h, w = shape
    yy, xx = np.mgrid[0:h, 0:w]
    out = np.full(shape, 0.01)
    for _ in range(4):
        cy, cx = rng.uniform(0, h), rng.uniform(0, w)
        s = rng.uniform(0.08, 0.2) * max(h, w)
        out += rng.uniform(0.5, 1.0) * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * s * s))
    return out


def random_fixations(shape: tuple[int, int], n: int, seed: int) -> np.ndarray:
    """Binary (H, W) uint8 map with n distinct fixated pixels (0/255, like the data set)."""
    rng = np.random.default_rng(seed)
    idx = rng.choice(shape[0] * shape[1], n, replace=False)
    out = np.zeros(shape[0] * shape[1], dtype=np.uint8)
    out[idx] = 255
    return out.reshape(shape)


# ---------------------------------------------------------------------------------------------
# Analytic cases
# ---------------------------------------------------------------------------------------------


def test_identical_maps_score_perfectly():
    gt = smooth_map((40, 30), seed=1)
    assert M.cc(gt, gt) == pytest.approx(1.0, abs=1e-12)
    assert M.kld(gt, gt) == pytest.approx(0.0, abs=1e-10)
    assert M.sim(gt, gt) == pytest.approx(1.0, abs=1e-12)
    # Scale does not matter: an 8-bit version of the same map is the same distribution.
    assert M.cc(gt * 1000.0, gt) == pytest.approx(1.0, abs=1e-12)


def test_constant_prediction_scores_chance():
    gt = smooth_map((20, 24), seed=2)
    fix = random_fixations((20, 24), 15, seed=3)
    flat = np.full((20, 24), 0.7)
    assert M.nss(flat, fix) == 0.0
    assert M.cc(flat, gt) == 0.0
    assert M.sim(flat, gt) == 0.0
    assert M.auc_judd(flat, fix, jitter=False) == 0.5
    assert M.auc_borji(flat, fix, rng=0) == 0.5
    assert M.sauc(flat, fix, fix, rng=0) == 0.5
    # A constant map is the uniform distribution for KLD and information gain.
    uniform = np.full(gt.shape, 1.0 / gt.size)
    g = gt / gt.sum()
    assert M.kld(flat, gt) == pytest.approx(float(np.sum(g * np.log(g / uniform))), rel=1e-9)
    assert M.info_gain(flat, fix, np.ones((5, 5))) == pytest.approx(0.0, abs=1e-12)


def test_constant_prediction_under_jitter_is_near_chance():
    fix = random_fixations((60, 60), 200, seed=4)
    assert M.auc_judd(np.zeros((60, 60)), fix, rng=0) == pytest.approx(0.5, abs=0.06)


def test_perfect_and_reversed_ranking():
    fix = random_fixations((50, 60), 40, seed=5)
    perfect = (fix > 0).astype(float)
    reversed_ = 1.0 - perfect
    assert M.auc_judd(perfect, fix, rng=0) == pytest.approx(1.0, abs=1e-9)
    # Judd's curve for a fully reversed ranking is (0,0) -> (1, 1/n) -> (1, 1): area 1/(2n).
    assert M.auc_judd(reversed_, fix, rng=0) == pytest.approx(1 / 80, abs=1e-9)
    # Borji's uniform negatives hit a fixated pixel with probability 40/3000.
    assert M.auc_borji(perfect, fix, rng=0) > 0.98
    assert M.auc_borji(reversed_, fix, rng=0) < 0.02
    assert M.nss(perfect, fix) > 5


def test_sauc_with_own_fixations_as_negatives_is_chance():
    gt = smooth_map((30, 30), seed=6)
    fix = random_fixations((30, 30), 25, seed=7)
    # Negatives are the same values as the positives (permuted): TPR = FPR at every threshold.
    assert M.sauc(gt, fix, fix, rng=0) == pytest.approx(0.5, abs=1e-12)


def test_metrics_stay_in_range_on_random_maps():
    for seed in range(5):
        pred, gt = smooth_map((25, 35), seed), smooth_map((25, 35), seed + 100)
        fix = random_fixations((25, 35), 30, seed + 200)
        assert 0.0 <= M.sim(pred, gt) <= 1.0
        assert -1.0 <= M.cc(pred, gt) <= 1.0
        assert M.kld(pred, gt) >= 0.0
        for auc in (M.auc_judd(pred, fix, rng=0), M.auc_borji(pred, fix, rng=0)):
            assert 0.0 <= auc <= 1.0


def test_random_draws_are_reproducible_with_a_seed():
    pred, fix = smooth_map((30, 30), 8), random_fixations((30, 30), 20, 9)
    other = random_fixations((30, 30), 50, 10)
    assert M.auc_borji(pred, fix, rng=3) == M.auc_borji(pred, fix, rng=3)
    assert M.sauc(pred, fix, other, rng=3) == M.sauc(pred, fix, other, rng=3)
    assert M.auc_judd(pred, fix, rng=3) == M.auc_judd(pred, fix, rng=3)


# ---------------------------------------------------------------------------------------------
# Hand-worked examples
# ---------------------------------------------------------------------------------------------

RAMP = np.array([[1.0, 2.0], [3.0, 4.0]])


def test_cc_by_hand():
    # pred - mean = [-1.5, -0.5, 0.5, 1.5]; gt [[0, 1], [0, 3]] - mean = [-1, 0, -1, 2].
    # sum(a*b) = 1.5 + 0 - 0.5 + 3 = 4; |a|^2 = 5; |b|^2 = 6  ->  CC = 4 / sqrt(30).
    assert M.cc(RAMP, np.array([[0.0, 1.0], [0.0, 3.0]])) == pytest.approx(4 / math.sqrt(30))


def test_kld_by_hand():
    # P uniform (1/4 each), G = [1/2, 0, 0, 1/2]: KLD = 2 * 1/2 * log(eps + (1/2)/(1/4)) = log 2.
    gt = np.array([[1.0, 0.0], [0.0, 1.0]])
    assert M.kld(np.ones((2, 2)), gt) == pytest.approx(math.log(2), rel=1e-12)
    # All of G's mass where P is 0: 1 * log(eps + 1/eps) = -log(eps) = 36.04 nats.
    assert M.kld(np.array([[0.0, 1.0], [1.0, 1.0]]), np.array([[1.0, 0.0], [0.0, 0.0]])) == (
        pytest.approx(-math.log(M.EPS), rel=1e-12)
    )
    # An all-zero prediction stays zero (KLdiv.m): sum(G * log(G / eps)) = log(1/2) - log(eps).
    assert M.kld(np.zeros((2, 2)), gt) == pytest.approx(math.log(0.5 / M.EPS), rel=1e-12)


def test_nss_by_hand_uses_sample_std():
    # mean 2.5, std with ddof=1 = sqrt(5/3) = 1.29099.
    sd = math.sqrt(5 / 3)
    assert M.nss(RAMP, np.array([[0, 0], [0, 1]])) == pytest.approx(1.5 / sd)
    # Fixations on 3 and 4: mean z = (0.5 + 1.5) / 2 / sd = 0.7746; 255 counts as fixated.
    assert M.nss(RAMP, np.array([[0, 0], [255, 255]])) == pytest.approx(1.0 / sd)
    assert M.nss(RAMP, np.array([[0, 0], [255, 255]])) != pytest.approx(1.0 / np.std(RAMP))


def test_sim_by_hand():
    # pred min-max [0, 1/3, 2/3, 1] / 2 = [0, 1/6, 1/3, 1/2];
    # gt [[0, 1], [0, 3]] min-max [0, 1/3, 0, 1] / (4/3) = [0, 1/4, 0, 3/4];
    # min = [0, 1/6, 0, 1/2], sum = 2/3.
    assert M.sim(RAMP, np.array([[0.0, 1.0], [0.0, 3.0]])) == pytest.approx(2 / 3)
    # Adding a constant to the prediction changes nothing (min-max step).
    assert M.sim(RAMP + 10, np.array([[0.0, 1.0], [0.0, 3.0]])) == pytest.approx(2 / 3)


def test_auc_judd_by_hand():
    # 3x3 map 1..9, fixations on 9 and 5; 9 pixels, 2 fixated, 7 not.
    # Threshold 9: 1 pixel >= it -> TP 1/2, FP (1-1)/7 = 0.
    # Threshold 5: 5 pixels >= it -> TP 1,   FP (5-2)/7 = 3/7.
    # Curve (0,0) (0,1/2) (3/7,1) (1,1): area 3/7 * 3/4 + 4/7 * 1 = 25/28.
    pred = np.arange(1.0, 10.0).reshape(3, 3)
    fix = np.zeros((3, 3))
    fix[2, 2] = fix[1, 1] = 1
    assert M.auc_judd(pred, fix, jitter=False) == pytest.approx(25 / 28, abs=1e-12)
    # The 1e-7 jitter does not reorder values 1 apart.
    assert M.auc_judd(pred, fix, rng=0) == pytest.approx(25 / 28, abs=1e-6)


def test_sauc_by_hand():
    # pred (already in [0, 1]) [[0, 0.25], [0.65, 1]]; fixations on 1 and 0.65; the other map
    # has exactly 2 pixels (0 and 0.65), so every split uses both: the score is deterministic.
    # Thresholds 1.0 .. 0.7: TP 1/2, FP 0. Thresholds 0.6 .. 0.1: TP 1, FP 1/2. 0: TP 1, FP 1.
    # Curve (0,0) (0,1/2) (1/2,1) (1,1): area 1/2 * 3/4 + 1/2 = 0.875.
    pred = np.array([[0.0, 0.25], [0.65, 1.0]])
    fix = np.array([[0, 0], [1, 1]])
    other = np.array([[1, 0], [1, 0]])
    assert M.sauc(pred, fix, other, rng=0) == pytest.approx(0.875, abs=1e-12)
    # Fewer other fixations than own ones: use all of them each split.
    assert M.sauc(pred, fix, np.array([[1, 0], [0, 0]]), rng=0) == pytest.approx(1.0)


def test_auc_borji_by_hand():
    # 1x2 map [0, 1], fixation on 1. The one negative per split is pixel 0 (AUC 1) or the
    # fixated pixel itself (TPR = FPR everywhere, AUC 0.5), each with probability 1/2:
    # expectation 0.75, standard error of the mean over 4000 splits 0.004.
    assert M.auc_borji(np.array([[0.0, 1.0]]), np.array([[0, 1]]), n_splits=4000, rng=0) == (
        pytest.approx(0.75, abs=0.02)
    )


def test_auc_borji_thresholds_are_coarse():
    # Fixation 0.64 against 97 pixels at 0.615 (plus one at 0 and one at 1): no multiple of
    # the 0.1 step lies between 0.615 and 0.64, so Borji cannot separate them and scores
    # chance, while Judd, thresholding at the fixated value itself, scores almost 1:
    # curve (0,0) (1/99,1) (1,1), area 1 - 1/198.
    pred = np.full((10, 10), 0.615)
    pred[0, 0], pred[0, 1] = 0.0, 1.0
    pred[5, 5] = 0.64
    fix = np.zeros((10, 10))
    fix[5, 5] = 1
    assert M.auc_judd(pred, fix, jitter=False) == pytest.approx(1.0 - 1 / 99 / 2, abs=1e-9)
    assert M.auc_borji(pred, fix, n_splits=500, rng=0) == pytest.approx(0.5, abs=0.03)


def test_info_gain_by_hand():
    # pred [[1,2],[3,4]] -> [0, 1/6, 1/3, 1/2]; baseline [[1,3],[2,4]] -> [0, 1/3, 1/6, 1/2].
    # Fixation at (1,1): log2(1/2) - log2(1/2) = 0; at (1,0): log2(1/3) - log2(1/6) = 1.
    fix = np.array([[0, 0], [1, 1]])
    assert M.info_gain(RAMP, fix, np.array([[1.0, 3.0], [2.0, 4.0]])) == pytest.approx(0.5)
    assert M.info_gain(RAMP, fix, RAMP) == pytest.approx(0.0, abs=1e-12)


# ---------------------------------------------------------------------------------------------
# Resizing
# ---------------------------------------------------------------------------------------------


def test_enlarging_matches_opencv_bilinear():
    # Enlarging, MATLAB's imresize, OpenCV INTER_LINEAR and Pillow agree (pixel-centre
    # alignment, two taps, clamped border).
    small = np.random.default_rng(0).random((7, 9))
    ours = M.resize_bilinear(small, (21, 30))
    ref = cv2.resize(small.astype(np.float32), (30, 21), interpolation=cv2.INTER_LINEAR)
    np.testing.assert_allclose(ours, ref, atol=1e-6)


def test_shrinking_is_antialiased_like_imresize():
    # Vertical stripes 1, 0, 0 shrunk 3x: an antialiased resize keeps the mean 1/3 in the
    # interior; point sampling (OpenCV INTER_LINEAR) hits only the zero columns.
    stripes = np.tile(np.array([1.0, 0.0, 0.0]), (30, 20))
    ours = M.resize_bilinear(stripes, (10, 20))
    np.testing.assert_allclose(ours[2:-2, 2:-2], 1 / 3, atol=1e-6)
    sampled = cv2.resize(stripes.astype(np.float32), (20, 10), interpolation=cv2.INTER_LINEAR)
    assert np.allclose(sampled[2:-2, 2:-2], 0.0)


def test_prediction_is_resized_to_the_ground_truth():
    gt = smooth_map((48, 64), seed=11)
    fix = random_fixations((48, 64), 30, seed=12)
    small = M.resize_bilinear(gt, (24, 32))
    up = M.resize_bilinear(small, (48, 64))
    for f, target in ((M.cc, gt), (M.kld, gt), (M.sim, gt), (M.nss, fix)):
        assert f(small, target) == pytest.approx(f(up, target), rel=1e-12)
    assert M.auc_judd(small, fix, jitter=False) == M.auc_judd(up, fix, jitter=False)
    # A smooth map predicted at half resolution is nearly the full-resolution one.
    assert M.cc(small, gt) > 0.999
    # Larger predictions are shrunk; the ground truth keeps its shape.
    assert M.cc(M.resize_bilinear(gt, (96, 128)), gt) > 0.999


# ---------------------------------------------------------------------------------------------
# Fixation helpers and the centre prior
# ---------------------------------------------------------------------------------------------


def test_fixation_map_from_points_rounds_and_clamps():
    pts = np.array([[0.49, 0.0], [0.5, 1.2], [-3.0, 9.0], [2.6, 1.5]])  # (x, y)
    got = D.fixation_map_from_points(pts, (3, 4))
    want = np.zeros((3, 4), dtype=bool)
    want[0, 0] = True  # x 0.49 rounds to column 0
    want[1, 1] = True  # x 0.5 rounds half up (MATLAB round), y 1.2 -> row 1
    want[2, 0] = True  # out-of-range point is clamped into the grid, not dropped
    want[2, 3] = True  # y 1.5 -> row 2, x 2.6 -> column 3
    np.testing.assert_array_equal(got, want)


def test_other_fixation_map_moves_points_without_loss_or_smear():
    src = np.zeros((4, 4), dtype=np.uint8)
    src[0, 0] = src[3, 3] = src[1, 2] = 255
    up = D.other_fixation_map([src], (8, 8))
    # Pixel centre (r + 0.5) / 4 lands on row floor((r + 0.5) * 2) = 2r + 1.
    assert sorted(map(tuple, np.argwhere(up))) == [(1, 1), (3, 5), (7, 7)]
    # Shrinking keeps every point (merging only when they share a target pixel).
    full = np.ones((6, 9), dtype=bool)
    assert D.other_fixation_map([full], (3, 3)).all()
    # Points and maps of different sizes mix; points are (x, y) in their own image.
    pts = (np.array([[99.0, 0.0]]), (50, 100))  # right edge, top row of a 50x100 image
    both = D.other_fixation_map([src, pts], (4, 4))
    assert both[0, 3] and both[0, 0] and both.sum() == 4


def test_other_fixation_map_max_images_picks_a_subset():
    maps = []
    for i in range(6):
        m = np.zeros((6, 6), dtype=np.uint8)
        m[i, i] = 1
        maps.append(m)
    sub = D.other_fixation_map(maps, (6, 6), rng=0, max_images=3)
    assert sub.sum() == 3
    np.testing.assert_array_equal(sub, D.other_fixation_map(maps, (6, 6), rng=0, max_images=3))
    assert D.other_fixation_map(maps, (6, 6), max_images=10).sum() == 6


def test_fixations_from_csv(tmp_path):
    path = tmp_path / "fixations.csv"
    path.write_text("id,subject,x,y,duration_ms\n007,0,1.0,1.0,100\n007,1,10.5,3.25,90\n"
                    "012,0,5,6,80\n")
    fx = D.fixations_from_csv(path)
    assert sorted(fx) == ["007", "012"]  # ids stay strings with leading zeros
    np.testing.assert_allclose(fx["007"], [[0.0, 0.0], [9.5, 2.25]])  # 1-based -> 0-based
    np.testing.assert_allclose(fx["012"], [[4.0, 5.0]])


def test_fixations_from_csv_errors(tmp_path):
    path = tmp_path / "bad.csv"
    path.write_text("id,subject,col,row\n1,0,2,3\n")
    with pytest.raises(ValueError, match=r"lacks the column\(s\) \['x', 'y'\]"):
        D.fixations_from_csv(path)
    path.write_text("id,subject,x,y\n1,0,2,abc\n")
    with pytest.raises(ValueError, match="line 2"):
        D.fixations_from_csv(path)


def test_center_prior_is_centred_and_aspect_scaled():
    cp = M.center_prior((40, 80))
    assert cp.shape == (40, 80)
    np.testing.assert_allclose(cp, cp[::-1, :])
    np.testing.assert_allclose(cp, cp[:, ::-1])
    assert cp.max() == pytest.approx(np.exp(-0.5 * (0.5 / 8) ** 2 - 0.5 * (0.5 / 16) ** 2))
    # Stretched to the aspect ratio: on an 11x33 map (centre (5, 16)) 4 rows up is the same
    # normalised distance as 12 columns right, so the values are equal.
    cp2 = M.center_prior((11, 33))
    assert cp2[1, 16] == pytest.approx(cp2[5, 28], rel=1e-12)
    assert cp2[5, 16] == 1.0


# ---------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------


def test_errors_are_clear():
    gt = smooth_map((10, 10), 0)
    fix = random_fixations((10, 10), 5, 1)
    with pytest.raises(ValueError, match="no fixations"):
        M.nss(gt, np.zeros((10, 10)))
    with pytest.raises(ValueError, match="no fixations"):
        M.auc_judd(gt, np.zeros((10, 10)))
    with pytest.raises(ValueError, match="other_fixation_map has no fixations"):
        M.sauc(gt, fix, np.zeros((10, 10)))
    with pytest.raises(ValueError, match="other_fixation_map has shape"):
        M.sauc(gt, fix, np.ones((5, 5)))
    for f in (M.cc, M.kld, M.sim):
        with pytest.raises(ValueError, match="gt_map is all zeros"):
            f(gt, np.zeros((10, 10)))
    with pytest.raises(ValueError, match="gt_map is constant"):
        M.cc(gt, np.ones((10, 10)))
    with pytest.raises(ValueError, match="2-D"):
        M.cc(np.ones((10, 10, 3)), gt)
    with pytest.raises(ValueError, match="NaN"):
        M.nss(np.full((10, 10), np.nan), fix)
    with pytest.raises(ValueError, match="non-negative"):
        M.kld(gt - 1.0, gt)
    with pytest.raises(ValueError, match="every pixel"):
        M.auc_judd(gt, np.ones((10, 10)))
    with pytest.raises(ValueError, match="n_splits"):
        M.auc_borji(gt, fix, n_splits=0)
    with pytest.raises(ValueError, match="others is empty"):
        D.other_fixation_map([], (4, 4))


# ---------------------------------------------------------------------------------------------
# Torch versions
# ---------------------------------------------------------------------------------------------

TORCH_PAIRS = [
    (M.cc_torch, M.cc, "gt"),
    (M.kld_torch, M.kld, "gt"),
    (M.sim_torch, M.sim, "gt"),
    (M.nss_torch, M.nss, "fix"),
]


def torch_batch(dtype: torch.dtype, shape=(3, 24, 20)):
    b, h, w = shape
    pred = np.stack([smooth_map((h, w), 20 + i) for i in range(b)])
    gt = np.stack([smooth_map((h, w), 40 + i) for i in range(b)])
    fix = np.stack([random_fixations((h, w), 12, 60 + i) for i in range(b)])
    return pred, gt, fix


@pytest.mark.parametrize("tfn,nfn,target", TORCH_PAIRS)
@pytest.mark.parametrize("dtype,rtol", [(torch.float64, 1e-10), (torch.float32, 1e-4)])
def test_torch_matches_numpy(tfn, nfn, target, dtype, rtol):
    pred, gt, fix = torch_batch(dtype)
    tgt = gt if target == "gt" else fix
    want = np.array([nfn(p, t) for p, t in zip(pred, tgt)])
    got = tfn(torch.tensor(pred, dtype=dtype), torch.tensor(tgt))
    assert got.shape == (3,) and got.dtype == dtype
    np.testing.assert_allclose(got.numpy(), want, rtol=rtol)
    # (B, 1, H, W) gives the same.
    got4 = tfn(torch.tensor(pred, dtype=dtype)[:, None], torch.tensor(tgt)[:, None])
    np.testing.assert_allclose(got4.numpy(), got.numpy(), rtol=1e-12)


@pytest.mark.parametrize("tfn,nfn,target", TORCH_PAIRS)
def test_torch_gradients(tfn, nfn, target):
    rng = np.random.default_rng(0)
    pred, gt = rng.random((2, 2, 6, 5)) + 0.1
    fix = np.stack([random_fixations((6, 5), 4, i) for i in range(2)])
    # SIM has a kink where min-max scaled pred and gt tie; their minima (both scaled to 0)
    # must sit on different pixels for a finite-difference check to hold.
    assert (pred.reshape(2, -1).argmin(1) != gt.reshape(2, -1).argmin(1)).all()
    tgt = torch.tensor(gt if target == "gt" else fix)
    x = torch.tensor(pred, requires_grad=True)
    assert torch.autograd.gradcheck(lambda p: tfn(p, tgt), (x,))
    # A float32 backward pass through the batch mean gives finite, non-zero gradients.
    x32 = torch.tensor(pred, dtype=torch.float32, requires_grad=True)
    tfn(x32, tgt).mean().backward()
    assert torch.isfinite(x32.grad).all() and x32.grad.abs().sum() > 0


@pytest.mark.parametrize("tfn,nfn,target", TORCH_PAIRS)
def test_torch_constant_prediction_has_no_nan(tfn, nfn, target):
    _, gt, fix = torch_batch(torch.float64, shape=(2, 8, 8))
    tgt = gt if target == "gt" else fix
    flat = torch.full((2, 8, 8), 0.3, dtype=torch.float64, requires_grad=True)
    out = tfn(flat, torch.tensor(tgt))
    np.testing.assert_allclose(
        out.detach().numpy(), [nfn(np.full((8, 8), 0.3), t) for t in tgt], rtol=1e-10
    )
    out.sum().backward()
    assert torch.isfinite(flat.grad).all()


def test_torch_kld_of_zero_prediction_is_finite():
    gt = torch.rand(2, 6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    zero = torch.zeros(2, 6, 6, dtype=torch.float64, requires_grad=True)
    out = M.kld_torch(zero, gt)
    want = [M.kld(np.zeros((6, 6)), g) for g in gt.numpy()]  # about -log(eps) = 36 nats
    np.testing.assert_allclose(out.detach().numpy(), want, rtol=1e-12)
    assert (out > 30).all()
    out.sum().backward()
    assert torch.isfinite(zero.grad).all()


def test_torch_errors():
    p = torch.rand(2, 5, 5)
    with pytest.raises(ValueError, match="resize pred"):
        M.cc_torch(p, torch.rand(2, 6, 6))
    with pytest.raises(ValueError, match="no fixations"):
        M.nss_torch(p, torch.zeros(2, 5, 5))
    with pytest.raises(ValueError, match="all-zero gt"):
        M.kld_torch(p, torch.zeros(2, 5, 5))
    with pytest.raises(ValueError, match="constant or all zeros"):
        M.sim_torch(p, torch.ones(2, 5, 5))
    with pytest.raises(ValueError, match=r"\(B, H, W\)"):
        M.cc_torch(torch.rand(5, 5), torch.rand(5, 5))


# Validation's device path: a model-size map resized on the device to the image's original size
# must score as the numpy metrics score the same model-size map (which resize it with Pillow).
RESIZES = [((36, 48), (61, 83)), ((36, 48), (480, 640)), ((288, 384), (256, 256)), ((37, 51), (23, 30)),
           ((48, 64), (48, 64)), ((40, 30), (53, 41))]


@pytest.mark.parametrize("src,dst", RESIZES)
def test_resize_bilinear_torch_matches_pillow(src, dst):
    pred = smooth_map(src, 5) + np.random.default_rng(1).random(src) * 0.3  # smooth plus pixel noise
    want = M.resize_bilinear(pred, dst)
    got = M.resize_bilinear_torch(torch.tensor(pred, dtype=torch.float32)[None, None], dst)
    assert got.shape == (1, *dst)
    np.testing.assert_allclose(got[0].numpy(), want, atol=1e-4 * pred.max())


@pytest.mark.parametrize("src,dst", RESIZES)
def test_batched_torch_metrics_at_original_resolution_match_numpy(src, dst):
    """Random and analytic cases, float32 on the device path vs float64 numpy, within 1e-4."""
    rng = np.random.default_rng(sum(src + dst))
    preds = np.stack([smooth_map(src, 70 + i) + rng.random(src) * 0.2 for i in range(3)]).astype(np.float32)
    gts = [smooth_map(dst, 80 + i) for i in range(3)]
    fixes = [random_fixations(dst, min(15, dst[0] * dst[1] // 4), 90 + i) for i in range(3)]
    # Analytic: a flat prediction scores chance (CC, NSS, SIM 0).
    preds[2] = 0.5
    resized = M.resize_bilinear_torch(torch.from_numpy(preds), dst)
    gt_t, fix_t = torch.tensor(np.stack(gts), dtype=torch.float32), torch.tensor(np.stack(fixes) > 0)
    for tfn, nfn, target in TORCH_PAIRS:
        got = tfn(resized, gt_t if target == "gt" else fix_t).numpy()
        want = [nfn(p, t) for p, t in zip(preds, gts if target == "gt" else fixes)]
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4, err_msg=nfn.__name__)
    assert M.cc_torch(resized, gt_t)[2] == 0 and M.nss_torch(resized, fix_t)[2] == 0 and M.sim_torch(resized, gt_t)[2] == 0
    # Analytic: the ground truth itself (already at the original size) scores CC 1, KLD 0, SIM 1.
    same = M.resize_bilinear_torch(gt_t, dst)
    np.testing.assert_allclose(M.cc_torch(same, gt_t).numpy(), 1.0, atol=1e-5)
    np.testing.assert_allclose(M.kld_torch(same, gt_t).numpy(), 0.0, atol=1e-5)
    np.testing.assert_allclose(M.sim_torch(same, gt_t).numpy(), 1.0, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Real eye-tracking data
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def nus():
    if not (DATA / "fixations.csv").is_file():
        pytest.skip(f"real eye-tracking data not found at {DATA}")
    fx = D.fixations_from_csv(DATA / "fixations.csv")
    sizes = D.image_sizes(DATA / "maps", sorted(fx))
    return fx, sizes


def load(kind: str, image_id: str) -> np.ndarray:
    return np.asarray(Image.open(DATA / kind / f"{image_id}.png"))


def test_csv_fixations_rebuild_the_binary_maps(nus):
    fx, sizes = nus
    assert len(fx) == 500 and sum(len(v) for v in fx.values()) == 43894
    # The CSV keeps 2 decimals, so a coordinate printed as exactly .5 is ambiguous; these ids
    # have none, and the README's rule (MATLAB round, clamp) reproduces their PNGs exactly.
    for image_id in ("001", "005", "009", "017", "019"):
        got = D.fixation_map_from_points(fx[image_id], sizes[image_id])
        np.testing.assert_array_equal(got, load("fixations", image_id) > 0)


def test_center_prior_on_real_data(nus):
    fx, sizes = nus
    ids = [f"{i:03d}" for i in range(1, 501, 25)]  # 20 images, several sizes
    judd, shuffled = [], []
    for image_id in ids:
        fix = load("fixations", image_id)
        prior = M.center_prior(fix.shape)
        others = D.other_fixation_map(
            [(fx[j], sizes[j]) for j in ids if j != image_id], fix.shape
        )
        judd.append(M.auc_judd(prior, fix, rng=0))
        shuffled.append(M.sauc(prior, fix, others, rng=0))
    # The centre bias is strong in free viewing, and sAUC is built to discount it.
    assert np.mean(judd) > 0.7
    assert 0.45 < np.mean(shuffled) < 0.56


def test_ground_truth_scores_itself_highly(nus):
    for image_id in ("001", "250", "500"):
        gt, fix = load("maps", image_id), load("fixations", image_id)
        assert M.cc(gt, gt) == pytest.approx(1.0, abs=1e-12)
        assert M.sim(gt, gt) == pytest.approx(1.0, abs=1e-12)
        assert M.kld(gt, gt) == pytest.approx(0.0, abs=1e-9)
        assert M.nss(gt, fix) > 2.0
        assert M.auc_judd(gt, fix, rng=0) > 0.9
        assert M.auc_judd(gt, fix, rng=0) > M.auc_judd(M.center_prior(gt.shape), fix, rng=0)
