"""`python -m train.evaluate` and `python -m train.maps` end to end on tiny data."""

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from hub import SaliencyConfig, SaliencyUNet
from hub.publish import export
from train.data import GroundTruth, find_samples, read_fixations, read_map
from train.evaluate import EPOCH_METRICS, Scorer
from train.evaluate import main as evaluate_main
from train.maps import auto_sigma
from train.maps import main as maps_main

NUS = Path(__file__).resolve().parents[2] / "shared" / "data" / "nus_scene"


def make_dataset(root: Path, n: int = 4, with_fixations: bool = True) -> None:
    rng = np.random.default_rng(0)
    for sub in ("images", "maps", "fixations"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for i in range(n):
        h, w = 40 + 8 * i, 60
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(root / "images" / f"{i:03d}.jpg")
        yy, xx = np.mgrid[0:h, 0:w]
        m = np.exp(-((xx - w / 2) ** 2 + (yy - h / 2) ** 2) / 100.0)
        Image.fromarray((m / m.max() * 255).astype(np.uint8)).save(root / "maps" / f"{i:03d}.png")
        if with_fixations:
            f = np.zeros((h, w), np.uint8)
            f[h // 2, w // 2] = f[5, 7] = f[h - 3, w - 9] = 255
            Image.fromarray(f).save(root / "fixations" / f"{i:03d}.png")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    directory = tmp_path_factory.mktemp("model")
    export(SaliencyUNet(SaliencyConfig(input_size=(64, 64))), directory)
    return directory


def test_evaluate_writes_json_table_and_maps(model_dir, tmp_path, capsys):
    make_dataset(tmp_path / "data")
    out = tmp_path / "report.json"
    code = evaluate_main(["--model", str(model_dir), "--data", str(tmp_path / "data"), "--out", str(out), "--limit", "3",
                          "--save-maps", str(tmp_path / "maps"), "--map-format", "npy", "--batch-size", "2"])
    assert code == 0
    table = capsys.readouterr().out
    assert "center baseline" in table and "mean baseline" in table and "sauc" in table
    report = json.loads(out.read_text())
    assert report["n_images"] == 3 and [r["id"] for r in report["images"]] == ["000", "001", "002"]
    assert set(report["metrics"]) == {"cc", "kld", "nss", "sim", "auc_judd", "auc_borji", "sauc", "info_gain"}
    assert report["baselines"]["center"]["info_gain"] == pytest.approx(0.0)
    # The centre prior matches these centred maps almost perfectly.
    assert report["baselines"]["center"]["cc"] > 0.9
    saved = np.load(tmp_path / "maps" / "001.npy")
    assert saved.shape == (48, 60) and saved.dtype == np.float32


def test_evaluate_without_fixations_scores_map_metrics_only(model_dir, tmp_path):
    make_dataset(tmp_path / "data", with_fixations=False)
    out = tmp_path / "r.json"
    assert evaluate_main(["--model", str(model_dir), "--data", str(tmp_path / "data"), "--out", str(out), "--baseline", "center"]) == 0
    report = json.loads(out.read_text())
    assert set(report["metrics"]) == {"cc", "kld", "sim"}
    assert set(report["baselines"]) == {"center"}


def test_evaluate_errors_are_clear(model_dir, tmp_path, capsys):
    make_dataset(tmp_path / "data")
    assert evaluate_main(["--model", str(model_dir), "--data", str(tmp_path / "data"), "--split", "val"]) == 1
    assert "has no train/val folders and the model has no split.json" in capsys.readouterr().err
    (tmp_path / "split" / "train").mkdir(parents=True)
    make_dataset(tmp_path / "split" / "train")
    make_dataset(tmp_path / "split" / "val")
    assert evaluate_main(["--model", str(model_dir), "--data", str(tmp_path / "split"), "--split", "test"]) == 1
    assert "has no 'test' split; choose --split from ['train', 'val']" in capsys.readouterr().err
    assert evaluate_main(["--model", str(tmp_path / "no-model"), "--data", str(tmp_path / "data")]) == 1
    assert evaluate_main(["--model", str(model_dir), "--data", str(tmp_path / "nothing")]) == 1
    assert "is not a folder" in capsys.readouterr().err


def test_maps_from_raw_fixations(tmp_path):
    images = tmp_path / "stimuli"
    images.mkdir()
    Image.fromarray(np.zeros((64, 80, 3), np.uint8)).save(images / "a.jpg")
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(images / "b.jpg")
    with open(tmp_path / "fix.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["id", "subject", "x", "y", "duration_ms"])
        writer.writerows([["a", 0, 11, 21, 200], ["a", 1, 11.4, 20.6, 180], ["a", 1, 70, 50, 300], ["b", 0, 16, 16, 250]])
    assert maps_main(["--images", str(images), "--fixations", str(tmp_path / "fix.csv"), "--out", str(tmp_path / "ds"), "--sigma", "3"]) == 0
    fix = np.asarray(Image.open(tmp_path / "ds" / "fixations" / "a.png"))
    assert sorted(zip(*np.nonzero(fix))) == [(20, 10), (49, 69)]  # two fixations share a pixel
    dens = np.asarray(Image.open(tmp_path / "ds" / "maps" / "a.png"))
    assert dens.max() == 255 and np.unravel_index(dens.argmax(), dens.shape) == (20, 10)  # the double fixation wins
    assert (tmp_path / "ds" / "images").is_dir()  # linked, so the folder is a training dataset
    assert auto_sigma((256, 256)) == 8.0 and auto_sigma((768, 1024)) == 24.0


def test_maps_reports_images_without_fixations(tmp_path, capsys):
    (tmp_path / "stimuli").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "stimuli" / "lonely.jpg")
    (tmp_path / "fix.csv").write_text("id,x,y\nother,1,1\n")
    assert maps_main(["--images", str(tmp_path / "stimuli"), "--fixations", str(tmp_path / "fix.csv"), "--out", str(tmp_path / "o")]) == 1
    assert "1 images have no fixations" in capsys.readouterr().err


@pytest.mark.skipif(not NUS.is_dir(), reason="real eye-tracking data (shared/data/nus_scene) is absent")
def test_maps_rebuild_the_shipped_nus_maps(tmp_path):
    ids = ["001", "450"]
    (tmp_path / "stimuli").mkdir()
    for i in ids:
        (tmp_path / "stimuli" / f"{i}.jpg").symlink_to(NUS / "images" / f"{i}.jpg")
    rows = [r for r in csv.DictReader(open(NUS / "fixations.csv")) if r["id"] in ids]
    with open(tmp_path / "fix.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    assert maps_main(["--images", str(tmp_path / "stimuli"), "--fixations", str(tmp_path / "fix.csv"), "--out", str(tmp_path / "ds")]) == 0
    for i in ids:
        ours = np.asarray(Image.open(tmp_path / "ds" / "maps" / f"{i}.png")).astype(int)
        shipped = np.asarray(Image.open(NUS / "maps" / f"{i}.png")).astype(int)
        assert np.abs(ours - shipped).max() <= 1


# -- the prepared ground truth and the two ways of scoring -----------------------------------------
def test_device_scores_match_the_numpy_scores_with_baselines(tmp_path):
    """score_batch (torch, model-size maps resized on the device) = score (numpy, MIT-exact) on the same maps."""
    make_dataset(tmp_path / "data", n=5)
    samples = find_samples(tmp_path / "data")
    scorer = Scorer(samples, train_samples=None, seed=0)  # leave-one-out mean baseline
    rng = np.random.default_rng(0)
    preds = torch.tensor(rng.random((5, 1, 24, 32)), dtype=torch.float32) + 0.1
    preds[3] = 0.7  # a flat map (of image indices[3]) scores chance both ways
    indices = [4, 0, 2, 1, 3]  # any order, several original sizes in one batch
    device_rows = scorer.score_batch(preds, indices)
    for row, i, pred in zip(device_rows, indices, preds):
        full = scorer.score(i, pred[0].numpy())
        assert row["id"] == full["id"] == samples[i].id
        assert set(row) - {"id", "baselines"} == set(EPOCH_METRICS)
        for k in EPOCH_METRICS:
            assert row[k] == pytest.approx(full[k], abs=1e-5), (i, k)
        for name in ("center", "mean"):
            for k in EPOCH_METRICS:
                assert row["baselines"][name][k] == pytest.approx(full["baselines"][name][k], abs=1e-5), (i, name, k)
    assert device_rows[3]["cc"] == 0.0 and device_rows[3]["nss"] == 0.0 and device_rows[3]["sim"] == 0.0


def test_ground_truth_is_read_once_however_often_it_is_scored(tmp_path, monkeypatch):
    import train.data
    import train.evaluate

    make_dataset(tmp_path / "data", n=4)
    samples = find_samples(tmp_path / "data")
    reads: list[str] = []
    real_map, real_fix = train.data._read_map_stored, train.data.read_fixations
    monkeypatch.setattr(train.data, "_read_map_stored", lambda path: reads.append(Path(path).name) or real_map(path))
    monkeypatch.setattr(train.data, "read_fixations", lambda s, shape: reads.append(s.id) or real_fix(s, shape))
    monkeypatch.setattr(train.evaluate, "read_map", None)  # the mean map of the evaluated images comes from memory
    scorer = Scorer(samples, seed=0)
    assert sorted(reads) == sorted([f"{s.id}.png" for s in samples] + [s.id for s in samples])
    reads.clear()
    pred = torch.rand(4, 1, 16, 16)
    for _ in range(3):  # three "epochs"
        scorer.score_batch(pred, [0, 1, 2, 3])
        for i in range(4):
            scorer.score(i, pred[i, 0].numpy())
    assert reads == []


def test_ground_truth_gives_what_the_readers_give(tmp_path):
    make_dataset(tmp_path / "data", n=3)
    (tmp_path / "data" / "fixations" / "002.png").unlink()
    samples = find_samples(tmp_path / "data")
    truth = GroundTruth(samples, seed=0)
    for i, s in enumerate(samples):
        np.testing.assert_array_equal(truth.gt_map(i), read_map(s.map))
        if s.has_fixations:
            np.testing.assert_array_equal(truth.fixation_mask(i), read_fixations(s, truth.sizes[i]))
            assert truth.other_mask(i).shape == truth.sizes[i] and truth.other_mask(i).any()
    assert truth.fixation_mask(2) is None and truth.other_mask(2) is None
