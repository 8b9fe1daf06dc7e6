"""train/aoi.py: AOI shares against real fixation shares, on hand-made maps and through the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
from test_evaluate import make_dataset, model_dir  # noqa: F401 (a fixture)

from hub.analysis import Box
from train import aoi
from train.evaluate import main as evaluate_main


def test_score_image_on_a_map_that_matches_the_fixations():
    h, w = 60, 90
    points = np.array([[10, 10], [11, 12], [80, 50], [12, 9]])  # 3 of 4 fixations top-left
    pred = np.zeros((h, w))
    for x, y in points:
        pred[y, x] += 1  # a map made of the fixations themselves: shares agree exactly
    boxes = {"peaks": [Box("tl", 0, 0, 0.3, 0.3)], "grid": [Box("left", 0, 0, 0.5, 1), Box("right", 0.5, 0, 1, 1)]}
    shares = aoi.score_image(pred, points, (h, w), boxes)
    assert shares["peaks"]["fixations"] == pytest.approx([0.75]) and shares["peaks"]["model"] == pytest.approx([0.75])
    assert shares["grid"]["fixations"] == pytest.approx([0.75, 0.25]) and shares["grid"]["model"] == pytest.approx([0.75, 0.25])
    assert shares["grid"]["center"] == pytest.approx([0.5, 0.5], abs=1e-6)  # the centre prior is symmetric
    summary = aoi.summarize([{"shares": shares}])
    assert summary["all"]["model"]["mae_pp"] == pytest.approx(0.0) and summary["all"]["model"]["cc"] == pytest.approx(1.0)
    assert summary["grid"]["center"]["mae_pp"] == pytest.approx(25.0)  # |0.5 - 0.75| and |0.5 - 0.25|
    assert summary["all"]["model"]["n_boxes"] == 3


def test_agreement_edge_cases():
    assert aoi.agreement([0.1, 0.3], [0.2, 0.2])["mae_pp"] == pytest.approx(10.0)
    assert np.isnan(aoi.agreement([0.1, 0.3], [0.2, 0.2])["cc"])  # constant truth: no correlation
    assert aoi.agreement([], [])["n_boxes"] == 0


def test_image_boxes_are_peak_regions_and_the_grid():
    yy, xx = np.mgrid[0:60, 0:80]
    pred = np.exp(-((yy - 20) ** 2 + (xx - 60) ** 2) / 50.0)
    boxes = aoi.image_boxes(pred)
    assert [b.name for b in boxes["peaks"]] == ["peak 1"] and len(boxes["grid"]) == 9
    peak = boxes["peaks"][0]
    assert peak.x0 < 60 / 80 < peak.x1 and peak.y0 < 20 / 60 < peak.y1


def test_evaluate_aoi_cli_writes_the_report(model_dir, tmp_path, capsys):  # noqa: F811
    make_dataset(tmp_path / "data")
    out = tmp_path / "aoi.json"
    code = evaluate_main(["--aoi", "--model", str(model_dir), "--data", str(tmp_path / "data"), "--out", str(out), "--batch-size", "2"])
    assert code == 0
    table = capsys.readouterr().out
    assert "model MAE (pp)" in table and "centre MAE (pp)" in table
    report = json.loads(out.read_text())
    assert report["n_images"] == 4 and set(report["aoi"]) == {"peaks", "grid", "all"}
    grid = report["aoi"]["grid"]
    assert grid["model"]["n_boxes"] == 4 * 9 and 0 <= grid["model"]["mae_pp"] <= 100
    assert 0 <= grid["center"]["mae_pp"] <= 100


def test_evaluate_aoi_without_fixations_is_one_sentence(model_dir, tmp_path, capsys):  # noqa: F811
    make_dataset(tmp_path / "data", with_fixations=False)
    assert evaluate_main(["--aoi", "--model", str(model_dir), "--data", str(tmp_path / "data")]) == 1
    assert "--aoi needs fixations/<id>.png or fixations.csv" in capsys.readouterr().err
