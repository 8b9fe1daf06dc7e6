"""`python -m hub predict`: inputs, outputs, summary.csv, bad files, resuming, flat memory, torchrun."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from hub import SaliencyConfig, SaliencyUNet
from hub.__main__ import main as hub_main
from hub.batch import InputError, Job, collect_inputs, merge_summary, peak_and_top_share, run_batch
from hub.publish import export

ROOT = Path(__file__).resolve().parents[1]
CONFIG = SaliencyConfig(backbone="resnet18", decoder_channels=(32, 16, 16, 8, 8), input_size=(64, 64))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    return export(SaliencyUNet(CONFIG).eval(), tmp_path_factory.mktemp("model"), example_image=None)


@pytest.fixture(scope="module")
def model(model_dir) -> SaliencyUNet:
    return SaliencyUNet.from_pretrained(model_dir)


def photo(path: Path, h: int = 48, w: int = 64, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    rgb = np.zeros((h, w, 3), np.uint8) + rng.integers(0, 60, 3, dtype=np.uint8)
    y, x = rng.integers(0, h - 8), rng.integers(0, w - 8)
    rgb[y : y + 8, x : x + 8] = (255, 230, 40)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rgb).save(path)
    return path


def read_summary(out: Path) -> list[dict[str, str]]:
    with open(out / "summary.csv", newline="") as f:
        return list(csv.DictReader(f))


def cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "hub", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


# -- the statistics of summary.csv ----------------------------------------------------------------


def test_peak_and_top_share_analytic_cases():
    flat = np.ones((40, 50), np.float32)
    assert peak_and_top_share(flat) == (0, 0, pytest.approx(0.1))  # spread evenly: the top 10 % hold 10 %
    spot = np.zeros((40, 50), np.float32)
    spot[7, 31] = 1.0
    assert peak_and_top_share(spot) == (31, 7, pytest.approx(1.0))  # all attention in one pixel
    assert peak_and_top_share(np.zeros((4, 4), np.float32))[2] == 0.0
    big = np.zeros((1000, 600), np.float32)
    big[:100] = 1.0  # the top tenth of the rows: exactly the 10 % most salient pixels
    assert peak_and_top_share(big)[2] == pytest.approx(1.0, abs=0.01)


# -- inputs ---------------------------------------------------------------------------------------


def test_inputs_files_folders_globs(tmp_path):
    for name in ["a.jpg", "b.PNG", "sub/c.png", "sub/deeper/d.jpg", ".hidden/e.png", "notes.txt"]:
        photo(tmp_path / "in" / name) if not name.endswith(".txt") else (tmp_path / "in" / name).write_text("x")
    photo(tmp_path / "single.jpg")
    names = lambda jobs: [j.name for j in jobs]  # noqa: E731
    assert names(collect_inputs([str(tmp_path / "in")])) == ["a", "b"]
    assert names(collect_inputs([str(tmp_path / "in")], recursive=True)) == ["a", "b", "sub/c", "sub/deeper/d"]
    assert names(collect_inputs([str(tmp_path / "in" / "sub" / "*.png"), str(tmp_path / "single.jpg")])) == ["c", "single"]
    assert names(collect_inputs([str(tmp_path / "in" / "**" / "*.jpg")], recursive=True)) == ["a", "d"]
    # the same image twice is one job; the output folder inside an input is not an input
    assert names(collect_inputs([str(tmp_path / "in"), str(tmp_path / "in" / "a.jpg")])) == ["a", "b"]
    assert names(collect_inputs([str(tmp_path / "in")], recursive=True, exclude=tmp_path / "in" / "sub")) == ["a", "b"]
    with pytest.raises(InputError, match="missing.jpg does not exist"):
        collect_inputs([str(tmp_path / "missing.jpg")])
    with pytest.raises(InputError, match="matches no file"):
        collect_inputs([str(tmp_path / "*.gif")])
    photo(tmp_path / "other" / "a.png")
    with pytest.raises(InputError, match="would both write the map a"):
        collect_inputs([str(tmp_path / "in"), str(tmp_path / "other")])


# -- the command ----------------------------------------------------------------------------------


def test_predict_writes_maps_overlays_and_summary(model, model_dir, tmp_path, capsys):
    inputs = [photo(tmp_path / "in" / f"img{i}.jpg", 40 + 8 * i, 70 - 4 * i, seed=i) for i in range(5)]
    photo(tmp_path / "in" / "nested" / "deep.png", 33, 90, seed=9)
    out = tmp_path / "out"
    code = hub_main(["predict", str(tmp_path / "in"), "--recursive", "--model", str(model_dir), "--out", str(out),
                     "--overlay", "--colormap", "turbo", "--batch-size", "2", "--quiet"])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    for path in inputs:
        saved = np.asarray(Image.open(out / f"{path.stem}.png"))
        assert saved.dtype == np.uint16 and saved.shape == Image.open(path).size[::-1]
        np.testing.assert_allclose(saved / 65535.0, model.predict(path), atol=2 / 65535)
        assert Image.open(out / f"{path.stem}.overlay.jpg").size == Image.open(path).size
    assert (out / "nested" / "deep.png").is_file()
    rows = read_summary(out)
    assert [r["map"] for r in rows] == ["img0.png", "img1.png", "img2.png", "img3.png", "img4.png", "nested/deep.png"]
    first = model.predict(inputs[0])
    y, x = np.unravel_index(np.argmax(first), first.shape)
    assert rows[0]["image"] == str(inputs[0]) and (rows[0]["width"], rows[0]["height"]) == ("70", "40")
    assert (int(rows[0]["peak_x"]), int(rows[0]["peak_y"])) == (x, y)
    assert 0.1 <= float(rows[0]["top10_share"]) <= 1.0 and float(rows[0]["seconds"]) > 0
    assert not [p for p in out.rglob(".*")]  # no temp or part files left


def test_npy_format_and_a_glob(model, model_dir, tmp_path):
    a = photo(tmp_path / "a.jpg")
    photo(tmp_path / "b.png")
    assert hub_main(["predict", str(tmp_path / "*.jpg"), "--model", str(model_dir), "--out", str(tmp_path / "o"),
                     "--format", "npy", "--quiet"]) == 0  # fmt: skip
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == ["a.npy", "summary.csv"]
    np.testing.assert_allclose(np.load(tmp_path / "o" / "a.npy"), model.predict(a), atol=1e-6)


def test_bad_files_are_listed_once_at_the_end_and_the_rest_is_done(model_dir, tmp_path, capsys):
    for i in range(4):
        photo(tmp_path / "in" / f"ok{i}.png", seed=i)
    (tmp_path / "in" / "text.jpg").write_text("this is not a JPEG")
    good = (tmp_path / "in" / "ok0.png").read_bytes()
    (tmp_path / "in" / "cut.png").write_bytes(good[: len(good) // 2])  # truncated
    code = hub_main(["predict", str(tmp_path / "in"), "--model", str(model_dir), "--out", str(tmp_path / "out"),
                     "--batch-size", "2", "--quiet"])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 1
    assert "2 of 6 images could not be read and have no map:" in err
    lines = err.splitlines()
    assert [sum(name in line for line in lines) for name in ("cut.png", "text.jpg")] == [1, 1]
    assert err.index("could not be read and have no map") < err.index("cut.png")  # one list, at the end
    assert sorted(r["map"] for r in read_summary(tmp_path / "out")) == [f"ok{i}.png" for i in range(4)]


def test_missing_input_and_model_are_one_sentence(model_dir, tmp_path, capsys):
    assert hub_main(["predict", str(tmp_path / "nope"), "--model", str(model_dir), "--out", str(tmp_path / "o")]) == 2
    assert "nope does not exist; pass image files, folders or glob patterns." in capsys.readouterr().err
    photo(tmp_path / "a.png")
    assert hub_main(["predict", str(tmp_path / "a.png"), "--model", str(tmp_path / "no-model"), "--out", str(tmp_path / "o")]) == 2
    assert "could not load the model" in capsys.readouterr().err


def test_interrupted_run_continues_with_skip_existing(model_dir, tmp_path):
    n = 60
    for i in range(n):
        photo(tmp_path / "in" / f"{i:03d}.png", 96, 96, seed=i)
    out = tmp_path / "out"
    args = ["predict", str(tmp_path / "in"), "--model", str(model_dir), "--out", str(out), "--batch-size", "1", "--quiet"]
    proc = subprocess.Popen([sys.executable, "-m", "hub", *args], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                            stderr=subprocess.PIPE, text=True)  # fmt: skip
    deadline = time.monotonic() + 120
    while len(list(out.glob("*.png"))) < 5 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGINT)  # Ctrl-C
    err = proc.communicate(timeout=120)[1]
    assert proc.returncode == 130, err
    assert "--skip-existing" in err
    first = {p.name: p.stat().st_mtime_ns for p in out.glob("*.png")}
    assert 5 <= len(first) < n, "the run finished before it could be interrupted"
    for name in first:  # whatever was written is complete
        assert np.asarray(Image.open(out / name)).shape == (96, 96)

    done = cli(*args, "--skip-existing", "--batch-size", "8")
    assert done.returncode == 0, done.stderr
    assert f"{n - len(first)} maps written, {len(first)} already there" in done.stderr
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.png") if p.name in first} == first  # not redone
    assert len(list(out.glob("*.png"))) == n
    rows = read_summary(out)
    assert sorted(r["map"] for r in rows) == [f"{i:03d}.png" for i in range(n)]  # one row per image, old and new
    assert not list(out.glob(".*"))


def test_memory_stays_flat_over_many_images(model, tmp_path):
    """Peak traced memory (numpy images and maps, Python objects) of 180 images is that of 30."""
    for i in range(180):
        photo(tmp_path / "in" / f"{i:03d}.png", 64, 64, seed=i)
    jobs = collect_inputs([str(tmp_path / "in")])
    run_batch(model, jobs[:8], tmp_path / "warm", progress=False)  # builds the inference engine once

    def peak(count: int) -> int:
        tracemalloc.start()
        try:
            run_batch(model, jobs[:count], tmp_path / f"out{count}", batch_size=4, progress=False)
            return tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    few, many = peak(30), peak(180)
    per_image = 64 * 64 * (3 + 4)  # a decoded image and its float32 map: 28 KB, 4.2 MB if all 150 more were kept
    assert many - few < 40 * per_image, (few, many)
    assert len(list((tmp_path / "out180").glob("*.png"))) == 180


def test_torchrun_splits_the_images_across_two_processes(model_dir, tmp_path):
    for i in range(7):
        photo(tmp_path / "in" / f"{i}.png", seed=i)
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "hub",
         "predict", str(tmp_path / "in"), "--model", str(model_dir), "--out", str(out), "--device", "cpu", "--quiet"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "rank 0 of 2: 4 of 7 images" in done.stderr and "rank 1 of 2: 3 of 7 images" in done.stderr
    assert "7 maps written" in done.stderr
    assert sorted(r["map"] for r in read_summary(out)) == [f"{i}.png" for i in range(7)]
    assert sorted(p.name for p in out.glob("*.png")) == [f"{i}.png" for i in range(7)]
    assert not list(out.glob(".*"))


def test_summary_merge_keeps_whole_rows_of_existing_maps(tmp_path):
    """Rows of an earlier summary and of part files, one cut by a kill and glued to the next row."""
    jobs = [Job(tmp_path / f"{c}.jpg", c) for c in "abcd"]
    for c in "abc":
        (tmp_path / f"{c}.png").write_bytes(b"map")  # d has no map: no row
    (tmp_path / "summary.csv").write_text(
        "image,map,width,height,peak_x,peak_y,top10_share,seconds\nold-a,a.png,1,1,0,0,0.5,1\nold-b,b.png,1,1,0,0,0.5,1\n")
    (tmp_path / ".summary.part0.csv").write_text("new-b,b.png,2,2,1,1,0.6,2\nnew-c,c.pn" + "new-d,d.png,2,2,1,1,0.6,2\n")
    (tmp_path / ".summary.part1.csv").write_text("new-c,c.png,3,3,1,1,0.7,3\nnew-d,d.png,3,3,1,1,0.7,3\n")
    os.utime(tmp_path / ".summary.part1.csv", ns=(time.time_ns() + 10**9,) * 2)  # the newer part file
    assert merge_summary(tmp_path, jobs, "png16", keep_previous=True) == 3
    assert [(r["image"], r["map"]) for r in read_summary(tmp_path)] == [("old-a", "a.png"), ("new-b", "b.png"), ("new-c", "c.png")]
    assert not list(tmp_path.glob(".summary*"))
    merge_summary(tmp_path, jobs, "png16", keep_previous=False)  # a fresh run forgets the earlier rows
    assert read_summary(tmp_path) == []
