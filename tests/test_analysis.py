"""hub.analysis on hand-made maps: peak regions, AOI shares, focus region, viewing order, transfer
of AOIs between variants by relative position, and the comparison table."""

from __future__ import annotations

import numpy as np
import pytest

from hub import analysis as A


def blobs(h: int = 120, w: int = 160) -> np.ndarray:
    """Two Gaussian hills: peak 1 at (x 50, y 40) sigma 10, peak 0.6 at (x 120, y 80) sigma 15."""
    yy, xx = np.mgrid[0:h, 0:w]

    def g(cy, cx, s, a):
        return a * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * s * s))

    m = g(40, 50, 10, 1.0) + g(80, 120, 15, 0.6)
    return (m / m.max()).astype(np.float32)


# -- peak regions (moved here from space/render.py) -------------------------------------------------


def test_peak_regions_of_two_blobs():
    stats = A.attention_stats(blobs(), top_k=3)
    assert len(stats.regions) == 2  # two hills, so two regions even though three were asked for
    first, second = stats.regions
    assert [first.index, second.index] == [1, 2]
    assert first.peak == pytest.approx((50 / 160, 40 / 120), abs=0.02)
    assert second.peak == pytest.approx((120 / 160, 80 / 120), abs=0.02)
    assert first.peak_value == pytest.approx(1.0) and second.peak_value == pytest.approx(0.6, abs=0.02)
    # Each region is the half-maximum disc of its Gaussian: radius 1.177 sigma.
    assert first.area == pytest.approx(np.pi * (1.177 * 10) ** 2 / (120 * 160), rel=0.15)
    # Half-maximum disc of a 2-D Gaussian holds 1 - 2**-1 = 50 % of that Gaussian's mass.
    mass1, mass2 = 1.0 * 10**2, 0.6 * 15**2
    assert first.share == pytest.approx(0.5 * mass1 / (mass1 + mass2), rel=0.1)
    assert second.share == pytest.approx(0.5 * mass2 / (mass1 + mass2), rel=0.1)
    # The bounding box of the half-maximum disc: centre +- 1.177 sigma.
    r = 1.177 * 10
    assert first.bbox == pytest.approx(((50 - r) / 160, (40 - r) / 120, (50 + r) / 160, (40 + r) / 120), abs=0.015)
    assert 0.1 < stats.top10_share <= 1
    assert A.attention_stats(blobs(), top_k=0).regions == ()
    flat = A.attention_stats(np.ones((50, 50), np.float32), top_k=3)
    assert flat.top10_share == pytest.approx(0.1, abs=0.01)
    assert A.attention_stats(np.zeros((20, 20), np.float32)).regions == ()


def test_a_bright_speck_is_not_a_region():
    m = blobs()
    m[0, -1] = 0.12  # one stray border pixel: a local maximum holding ~0 % of the attention
    assert len(A.attention_stats(m, top_k=3).regions) == 2


def test_region_boxes_and_grid():
    boxes = A.region_boxes(A.attention_stats(blobs(), top_k=2))
    assert [b.name for b in boxes] == ["peak 1", "peak 2"]
    grid = A.grid_boxes(3, 4)
    assert len(grid) == 12 and grid[0] == A.Box("r1c1", 0, 0, 0.25, 1 / 3)
    assert sum(b.area for b in grid) == pytest.approx(1.0)
    # A grid's shares add up to all of the attention.
    assert A.box_shares(blobs(), grid).sum() == pytest.approx(1.0)


# -- areas of interest ---------------------------------------------------------------------------------


def test_aoi_shares_area_ratio_and_rank():
    m = np.zeros((100, 200), np.float32)
    m[:, :50] = 1.0  # all attention in the left quarter
    m[:, 50:] = 0.0
    boxes = [
        A.Box("left quarter", 0, 0, 0.25, 1),
        A.Box("left eighth", 0, 0, 0.125, 1),
        A.Box("right half", 0.5, 0, 1, 1),
        A.Box("top-left", 0, 0, 0.25, 0.5),
    ]
    rows = A.aoi_shares(m, boxes)
    assert [r.name for r in rows] == [b.name for b in boxes]
    assert [r.share for r in rows] == pytest.approx([1.0, 0.5, 0.0, 0.5])
    assert [r.area for r in rows] == pytest.approx([0.25, 0.125, 0.5, 0.125])
    assert [r.ratio for r in rows] == pytest.approx([4.0, 4.0, 0.0, 4.0])
    assert rows[0].rank == 1 and rows[2].rank == 4 and {rows[1].rank, rows[3].rank} == {2, 3}
    # A uniform map gives every box its fair share: ratio 1.
    uniform = A.aoi_shares(np.ones((30, 40)), boxes)
    assert [r.ratio for r in uniform] == pytest.approx([1, 1, 1, 1])
    # An empty map: zero shares, no division by zero.
    assert [r.share for r in A.aoi_shares(np.zeros((30, 40)), boxes)] == [0, 0, 0, 0]
    assert A.aoi_shares(m, []) == []


def test_box_edges_count_partial_pixels():
    # A box covering half a pixel column gets half that column's attention (no staircase error).
    m = np.ones((10, 10))
    assert A.box_shares(m, [A.Box("half", 0, 0, 0.05, 1)])[0] == pytest.approx(0.05)
    assert A.box_shares(m, [A.Box("thin", 0.33, 0.21, 0.57, 0.64)])[0] == pytest.approx(0.24 * 0.43)


def test_boxes_from_pixels_clip_and_refuse_empty():
    box = A.Box.from_pixels("logo", 700, -20, 320, 240, (480, 640))  # corners swapped, partly outside
    assert (box.x0, box.y0, box.x1, box.y1) == pytest.approx((0.5, 0.0, 1.0, 0.5))
    assert box.to_pixels((480, 640)) == (320, 0, 640, 240)
    with pytest.raises(ValueError, match=r"Area of interest 'cta' \(10, 10, 10, 50\) has no area inside the 640 x 480 image"):
        A.Box.from_pixels("cta", 10, 10, 10, 50, (480, 640))


def test_aois_transfer_to_another_variant_by_relative_position():
    # Drawn on a 640 x 480 design; the variant is 320 x 240 with the same layout, and a 300 x 400 one.
    drawn = A.Box.from_pixels("headline", 64, 48, 320, 144, (480, 640))
    assert drawn.to_pixels((240, 320)) == (32, 24, 160, 72)
    assert drawn.to_pixels((400, 300)) == (30, 40, 150, 120)
    # The same layout at two sizes: the AOI gets the same share on both.
    big = blobs(240, 320)
    small = np.asarray(A.work_copy(big, 160))
    assert small.shape == (120, 160)
    assert A.aoi_shares(big, [drawn])[0].share == pytest.approx(A.aoi_shares(small, [drawn])[0].share, abs=0.01)


def test_point_shares_count_fixations_in_boxes():
    points = np.array([[0, 0], [9, 9], [5, 1], [1, 5]])  # (x, y) pixels on a 10 x 10 image
    shares = A.point_shares(points, [A.Box("top", 0, 0, 1, 0.5), A.Box("all", 0, 0, 1, 1), A.Box("none", 0.2, 0.2, 0.3, 0.3)], (10, 10))
    assert shares == pytest.approx([0.5, 1.0, 0.0])
    assert A.point_shares(np.zeros((0, 2)), [A.Box("all", 0, 0, 1, 1)], (10, 10)) == pytest.approx([0.0])


def test_compare_aois_names_the_variant_with_the_larger_share():
    boxes = [A.Box("left", 0, 0, 0.5, 1), A.Box("right", 0.5, 0, 1, 1), A.Box("middle", 0.25, 0, 0.75, 1)]
    left = np.zeros((20, 20))
    left[:, :8] = 1
    right = left[:, ::-1].copy()
    table = A.compare_aois([A.aoi_shares(left, boxes), A.aoi_shares(right, boxes)])
    assert [c.name for c in table] == ["left", "right", "middle"]
    assert table[0].winner == 0 and table[1].winner == 1
    assert table[2].winner is None  # both give the middle the same share: a tie
    assert table[0].shares == pytest.approx((1.0, 0.0))
    assert A.compare_aois([]) == []


# -- focus region ------------------------------------------------------------------------------------


def test_focus_mask_is_the_smallest_region_holding_the_mass():
    m = np.array([[4.0, 3.0, 2.0, 1.0]])  # total 10: the top pixel holds 40 %, the top two 70 %
    assert A.focus_mask(m, 0.4).tolist() == [[True, False, False, False]]
    assert A.focus_mask(m, 0.5).tolist() == [[True, True, False, False]]
    assert A.focus_mask(m, 0.7).tolist() == [[True, True, False, False]]
    assert A.focus_mask(m, 0.9).tolist() == [[True, True, True, False]]
    assert A.focus_mask(m, 0.95).tolist() == [[True, True, True, True]]
    assert A.focus_mask(m, 1.0).all()
    # On the blobs map: more mass, larger region, each containing the one before.
    masks = [A.focus_mask(blobs(), level) for level in A.FOCUS_LEVELS]
    for small, large in zip(masks, masks[1:]):
        assert small.sum() < large.sum() and not (small & ~large).any()
    density = blobs() / blobs().sum()
    for level, mask in zip(A.FOCUS_LEVELS, masks):
        assert density[mask].sum() >= level and density[mask].sum() < level + 0.02
    assert not A.focus_mask(np.zeros((5, 5))).any()
    with pytest.raises(ValueError, match="focus mass 75 must be a fraction in"):
        A.focus_mask(blobs(), 75)


# -- viewing order ----------------------------------------------------------------------------------


def test_viewing_order_visits_the_strongest_place_first_and_moves_on():
    order = A.viewing_order(blobs(), n=4)
    assert [f.index for f in order] == list(range(1, len(order) + 1))
    first, second = order[0], order[1]
    assert (first.x, first.y) == pytest.approx((50 / 160, 40 / 120), abs=0.02) and first.value == pytest.approx(1.0)
    assert (second.x, second.y) == pytest.approx((120 / 160, 80 / 120), abs=0.03) and second.value == pytest.approx(0.6, abs=0.03)
    # Inhibition of return: no two places within one IoR sigma of each other.
    for i, a in enumerate(order):
        for b in order[i + 1 :]:
            assert np.hypot((a.x - b.x) * 160, (a.y - b.y) * 120) > A.IOR_SIGMA * 160
    assert len(A.viewing_order(blobs(), n=1)) == 1 and A.viewing_order(blobs(), n=0) == []
    assert A.viewing_order(np.zeros((10, 10)), n=3) == []
    # A single sharp spot on black: one place, then nothing above MIN_PEAK is left.
    spot = np.zeros((64, 64))
    spot[10, 20] = 1
    assert [(round(f.x * 64 - 0.5), round(f.y * 64 - 0.5)) for f in A.viewing_order(spot, n=5)] == [(20, 10)]
