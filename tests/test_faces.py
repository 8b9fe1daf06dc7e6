"""The face prior (hub.faces): detection, face maps, how the model applies it, and training with it."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from skimage import data as skdata

import hub.faces as faces
from hub import SaliencyConfig, SaliencyUNet
from hub.config import FACE_DETECTORS
from hub.faces import apply_face_prior, detect_faces, face_maps, image_faces
from hub.preprocess import images_to_tensor
from train.evaluate import Scorer
from train.loop import TrainConfig, batch_faces, run, val_faces

from test_train import blob_sample, tiny_config, tiny_data  # noqa: F401 - fixture

EYECROWD = Path(__file__).resolve().parents[2] / "shared" / "data" / "eyecrowd"
# Where the face is in skimage's astronaut photo (public domain, NASA): x and y as fractions.
ASTRONAUT_FACE = (0.35, 0.14, 0.53, 0.32)


def test_detector_finds_the_face_in_a_photo_and_none_in_flat_or_tiny_images():
    boxes = detect_faces(skdata.astronaut(), "frontal")
    assert boxes.dtype == np.float32 and boxes.shape[1] == 4 and (0 <= boxes).all() and (boxes <= 1).all()
    cx, cy = (boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2
    x0, y0, x1, y1 = ASTRONAUT_FACE
    assert ((x0 < cx) & (cx < x1) & (y0 < cy) & (cy < y1)).any(), boxes
    for detector in FACE_DETECTORS:
        assert detect_faces(np.full((300, 400, 3), 128, np.uint8), detector).shape == (0, 4)
        assert detect_faces(np.zeros((10, 12, 3), np.uint8), detector).shape == (0, 4)
    with pytest.raises(ValueError, match="frontal\\+profile"):
        detect_faces(skdata.astronaut(), "eyes")


def test_threads_search_at_once_with_classifiers_of_their_own_that_later_searches_reuse(monkeypatch):
    import threading
    from concurrent.futures import ThreadPoolExecutor

    photos = [skdata.astronaut(), skdata.astronaut()[:, ::-1], np.ascontiguousarray(skdata.astronaut()[::2, ::2])] * 2
    alone = [detect_faces(p, "frontal+profile") for p in photos]
    with ThreadPoolExecutor(3) as pool:
        together = list(pool.map(lambda p: detect_faces(p, "frontal+profile"), photos))
    for a, b in zip(alone, together):
        np.testing.assert_array_equal(a, b)
    # detectMultiScale is not safe to share: three searches at once hold three classifiers ...
    monkeypatch.setattr(faces, "_idle", {})
    loads = []
    monkeypatch.setattr(faces, "_load", lambda name: loads.append(name) or object())
    meet = threading.Barrier(3)

    def hold(_: int) -> int:
        with faces._detector("frontal") as cascade:
            meet.wait()
            return id(cascade)

    with ThreadPoolExecutor(3) as pool:
        assert len(set(pool.map(hold, range(3)))) == 3
    # ... and the next searches, in new threads as predict() starts them, load none again.
    def use(_: int) -> None:
        with faces._detector("frontal"):
            pass

    with ThreadPoolExecutor(2) as pool:
        list(pool.map(use, range(4)))
    assert loads == ["frontal"] * 3 and len(faces._idle["frontal"]) == 3


def test_profile_faces_are_searched_in_the_image_and_its_mirror_image(monkeypatch):
    class Fake:  # a cascade whose "profile face" is the bright square of whatever grey image it is given
        def __init__(self, name: str) -> None:
            self.name = name

        def detectMultiScale(self, gray, scaleFactor, minNeighbors):  # noqa: N802, N803 - OpenCV's names
            if self.name != "profile":
                return ()
            ys, xs = np.nonzero(gray > 128)
            return [(xs.min(), ys.min(), xs.max() + 1 - xs.min(), ys.max() + 1 - ys.min())]

    monkeypatch.setattr(faces, "_idle", {})
    monkeypatch.setattr(faces, "_load", Fake)
    image = np.zeros((200, 400, 3), np.uint8)  # under both search sides: searched as it is
    image[20:50, 10:40] = 255  # off-centre, so a search of the unflipped image in the mirror pass lands elsewhere
    assert detect_faces(image, "frontal").shape == (0, 4)
    square = [10 / 400, 20 / 200, 40 / 400, 50 / 200]
    np.testing.assert_allclose(detect_faces(image, "frontal+profile"), [square, square], atol=1e-6)


@pytest.mark.skipif(not EYECROWD.is_dir(), reason="needs ../shared/data/eyecrowd")
def test_profile_search_finds_the_turned_faces_of_a_crowd_that_the_frontal_one_misses():
    from hub.preprocess import load_image

    photo = load_image(EYECROWD / "images" / "250.jpg")  # a seminar audience, most faces turned
    frontal, both = detect_faces(photo, "frontal"), detect_faces(photo, "frontal+profile")
    assert len(both) > len(frontal) >= 1
    np.testing.assert_array_equal(both[: len(frontal)], frontal)


def test_searches_run_before_a_cpu_network_and_in_all_but_one_core_beside_a_gpu():
    from hub.faces import search_threads

    cpu, gpu = torch.device("cpu"), torch.device("cuda", 0)  # a device object only: nothing touches CUDA
    assert [search_threads(cpu, n) for n in (1, 2, 16, 64)] == [0, 0, 0, 0]
    assert [search_threads(gpu, n) for n in (1, 2, 16, 64)] == [1, 1, 15, 16]


def test_an_opencv_without_the_cascade_classifier_is_one_clear_sentence(monkeypatch, without_cascades):
    without_cascades(faces)
    monkeypatch.setattr(faces, "_idle", {})
    with pytest.raises(ImportError, match=r"OpenCV 4's cascade classifier.*opencv-python-headless>=4.14,<5"):
        detect_faces(skdata.astronaut(), "frontal")


def test_a_large_photo_is_searched_at_the_detector_side_with_the_same_relative_boxes():
    small = skdata.astronaut()
    big = np.repeat(np.repeat(small, 3, axis=0), 3, axis=1)  # 1536 x 1536, searched at 640
    near = [np.abs(detect_faces(big, "frontal") - b).max(1).min() for b in detect_faces(small, "frontal") if (b[0] + b[2]) / 2 < 0.53]
    assert near and min(near) < 0.05


def test_face_maps_peak_on_each_box_and_are_round_in_the_original_image():
    boxes = [np.array([[0.1, 0.2, 0.3, 0.4], [0.6, 0.5, 0.8, 0.9]], np.float32), np.zeros((0, 4), np.float32)]
    maps = face_maps(boxes, (64, 64), aspects=[2.0, 1.0])  # the first image is 2:1, squeezed onto a square grid
    assert maps.shape == (2, 1, 64, 64) and maps.dtype == torch.float32
    assert float(maps.min()) >= 0 and float(maps.max()) <= 1 and float(maps[1].abs().max()) == 0
    m = maps[0, 0].numpy()
    for x0, y0, x1, y1 in boxes[0]:
        row, col = int((y0 + y1) / 2 * 64), int((x0 + x1) / 2 * 64)
        assert m[row, col] > 0.95 and m[row - 1 : row + 2, col - 1 : col + 2].max() == m[row - 2 : row + 3, col - 2 : col + 3].max()
    # The first box is 0.2 of the width and 0.2 of the height of a 2:1 image: twice as wide as high
    # there, so its Gaussian is set by the width and is round in the original, half as wide as high on the grid.
    row = int(0.3 * 64)
    across = (m[row, :32] > 0.5).sum()
    down = (m[:, int(0.2 * 64)] > 0.5).sum()
    assert down == pytest.approx(2 * across, abs=2)


def test_the_prior_multiplies_within_zero_to_one():
    pred = torch.rand(2, 1, 16, 16)
    f = torch.zeros(2, 1, 16, 16)
    f[:, :, 4:8, 4:8] = 1.0
    out = apply_face_prior(pred, f, 2.0)
    assert float(out.min()) >= 0 and float(out.max()) <= 1
    torch.testing.assert_close(out[:, :, 4:8, 4:8], pred[:, :, 4:8, 4:8])
    torch.testing.assert_close(out[:, :, 10:, 10:], pred[:, :, 10:, 10:] / 3)


def test_config_keeps_the_face_prior_and_old_configs_have_none(tmp_path):
    model = SaliencyUNet(SaliencyConfig(input_size=(64, 64), face_prior=2))
    model.save_pretrained(tmp_path / "m")
    saved = json.loads((tmp_path / "m" / "config.json").read_text())
    assert saved["face_prior"] == 2.0 and SaliencyUNet.from_pretrained(tmp_path / "m").config.face_prior == 2.0
    assert SaliencyConfig.from_dict({k: v for k, v in saved.items() if k != "face_prior"}).face_prior == 0.0
    with pytest.raises(ValueError, match="face_prior"):
        SaliencyConfig(face_prior=-1)
    # The detector: frontal faces in configs written before it was a field, what the config says otherwise.
    assert saved["face_detector"] == "frontal"
    assert SaliencyConfig.from_dict({k: v for k, v in saved.items() if k != "face_detector"}).face_detector == "frontal"
    profile = SaliencyUNet(SaliencyConfig(input_size=(64, 64), face_prior=2, face_detector="frontal+profile"))
    profile.save_pretrained(tmp_path / "p")
    assert SaliencyUNet.from_pretrained(tmp_path / "p").config.face_detector == "frontal+profile"
    # The card says which faces raise the map.
    assert "Haar profile-face" in (tmp_path / "p" / "README.md").read_text()
    assert "LBP frontal-face" in (tmp_path / "m" / "README.md").read_text()
    assert "profile" not in (tmp_path / "m" / "README.md").read_text()
    SaliencyUNet(SaliencyConfig(input_size=(64, 64), face_prior=6, face_detector="mtcnn")).save_pretrained(tmp_path / "c")
    card = (tmp_path / "c" / "README.md").read_text()
    assert "MTCNN" in card and "hub.mtcnn" in card and "cascade" not in card
    with pytest.raises(ValueError, match="face_detector 'eyes' must be one of frontal, frontal\\+profile"):
        SaliencyConfig(face_detector="eyes")


def test_infer_needs_the_face_maps_of_a_model_with_a_face_prior():
    model = SaliencyUNet(SaliencyConfig(input_size=(64, 64), face_prior=2)).eval()
    with torch.no_grad(), pytest.raises(ValueError, match="image_faces"):
        model.infer(torch.rand(1, 3, 64, 64))


def test_predict_raises_the_map_on_the_faces_it_finds():
    torch.manual_seed(0)
    plain = SaliencyUNet(SaliencyConfig(input_size=(128, 128))).eval()
    with_faces = SaliencyUNet(SaliencyConfig(input_size=(128, 128), face_prior=4)).eval()
    with_faces.load_state_dict(plain.state_dict())
    photo = skdata.astronaut()
    a, b = plain.predict(photo, precision="fp32"), with_faces.predict(photo, precision="fp32")
    assert b.shape == photo.shape[:2] and b.dtype == np.float32 and b.max() == pytest.approx(1.0)
    # What predict computes: the network's map times the face map of the original photo, normalised.
    with torch.no_grad():
        x = images_to_tensor([photo], (128, 128))
        expected = with_faces.infer(x, faces=image_faces([photo], (128, 128), "frontal"))
    y = torch.nn.functional.interpolate(expected, size=photo.shape[:2], mode="bilinear", align_corners=False)[0, 0].numpy()
    assert np.corrcoef(y.ravel(), b.ravel())[0, 1] > 0.999
    h, w = photo.shape[:2]
    x0, y0, x1, y1 = ASTRONAUT_FACE
    face = (slice(int(y0 * h), int(y1 * h)), slice(int(x0 * w), int(x1 * w)))
    share = lambda m: m[face].sum() / m.sum()  # noqa: E731
    assert share(b) > 1.5 * share(a)


def test_validation_applies_the_face_prior_with_boxes_detected_once(tiny_data, tmp_path, monkeypatch):  # noqa: F811
    calls = []

    def fake_detect(image, detector):
        calls.append((image.shape, detector))
        return np.array([[0.0, 0.0, 0.5, 0.5]], np.float32)

    monkeypatch.setattr("train.loop.detect_faces", fake_detect)
    from train.data import find_samples

    samples = find_samples(tiny_data)[:3]
    boxes = val_faces(samples, [0, 2], workers=0, detector="frontal")
    assert sorted(boxes) == [0, 2] and len(calls) == 2 and {d for _, d in calls} == {"frontal"}
    scorer = Scorer(samples, baselines=())
    scorer.faces = boxes
    maps = batch_faces(scorer, [2, 0], torch.zeros(2, 3, 32, 32))
    assert maps.shape == (2, 1, 32, 32) and float(maps[:, :, :8, :8].mean()) > float(maps[:, :, 24:, 24:].mean())
    scorer.faces = None
    assert batch_faces(scorer, [0], torch.zeros(1, 3, 32, 32)) is None

    # A run with --face-prior validates with it and publishes it, and its detector, in config.json.
    calls.clear()
    out = tmp_path / "out"
    run(tiny_config(tiny_data, out, face_prior=2.0, face_detector="frontal+profile", blur="auto"))
    config = json.loads((out / "config.json").read_text())
    assert config["face_prior"] == 2.0 and config["face_detector"] == "frontal+profile"
    assert len(calls) == len(json.loads((out / "split.json").read_text())["val"])
    assert {d for _, d in calls} == {"frontal+profile"}
    assert "--face-prior 2.0" in (out / "README.md").read_text()
    assert (TrainConfig().face_detector, TrainConfig().face_prior) == ("mtcnn", 6.0)  # what a run publishes unless told otherwise


def test_image_faces_runs_the_detector_on_each_original_image(monkeypatch):
    seen = []
    monkeypatch.setattr(faces, "detect_faces", lambda im, detector, device="cpu": seen.append((im.shape, detector)) or np.zeros((0, 4), np.float32))
    out = image_faces([np.zeros((30, 40, 3), np.uint8), np.zeros((50, 20, 3), np.uint8)], (32, 32), "frontal+profile")
    assert out.shape == (2, 1, 32, 32) and seen == [((30, 40, 3), "frontal+profile"), ((50, 20, 3), "frontal+profile")]


def test_predict_detects_faces_on_the_models_device_before_a_cpu_network_and_in_threads_beside_a_gpu(monkeypatch):
    import threading
    from concurrent.futures import Future

    import hub.model as model_module

    threads = []
    real = faces.detect_faces

    def detect(image, detector, device):
        threads.append((threading.current_thread(), detector, device))
        return real(image, detector, device)

    monkeypatch.setattr(faces, "detect_faces", detect)
    photos = [skdata.astronaut(), skdata.astronaut()[::2, ::2]]
    for detector in ("frontal+profile", "mtcnn"):
        threads.clear()
        model = SaliencyUNet(SaliencyConfig(input_size=(64, 64), face_prior=4, face_detector=detector)).eval()
        maps = model.predict(photos, precision="fp32")
        # On a CPU: in the calling thread (the network and the searches each use every core).
        assert [(t, d, str(dev)) for t, d, dev in threads] == [(threading.main_thread(), detector, "cpu")] * 2
        assert [m.shape for m in maps] == [p.shape[:2] for p in photos]
    # Beside a GPU the searches run in threads, one task per image, on the model's device: the
    # same code with the rule's thread count, on the CPU here (device cpu:0, to tell it from the default).
    monkeypatch.setattr(model_module, "search_threads", lambda device, cores: 2)
    monkeypatch.setattr(SaliencyUNet, "device", property(lambda self: torch.device("cpu", 0)))
    threads.clear()
    expected = model.predict(photos, precision="fp32")
    assert len(threads) == 2 and threading.main_thread() not in [t for t, _, _ in threads]
    assert {(d, str(dev)) for _, d, dev in threads} == {("mtcnn", "cpu:0")}
    for a, b in zip(maps, expected):
        np.testing.assert_array_equal(a, b)
    # infer() takes the face maps or anything with result() (PendingFaces, a Future), waited for after the forward pass.
    x = torch.rand(1, 3, 64, 64)
    face = faces.face_maps([np.array([[0.2, 0.2, 0.5, 0.5]], np.float32)], (64, 64))
    pending: Future = Future()
    pending.set_result(face)
    with torch.no_grad():
        torch.testing.assert_close(model.infer(x, faces=pending), model.infer(x, faces=face))


def test_the_detector_benchmark_names_a_folder_without_photos(tmp_path):
    from bench import faces as bench_faces

    (tmp_path / "notes.txt").write_text("no photos here")
    with pytest.raises(SystemExit, match=r"--data .*: no \.jpg or \.png images there"):
        bench_faces.main(["--data", str(tmp_path)])


def test_the_detector_benchmark_times_every_detector_and_only_mtcnn_without_cascades(tmp_path, capsys, without_cascades):
    from PIL import Image

    from bench import faces as bench_faces

    for name in ("astronaut", "coffee"):
        Image.fromarray(getattr(skdata, name)()).save(tmp_path / f"{name}.png")
    args = ["--data", str(tmp_path), "--repeat", "1", "--threads", "1,2"]
    assert bench_faces.main(args) == 0
    rows = [line.split("|") for line in capsys.readouterr().out.splitlines() if line.count("|") == 4]
    timed = {r[0].strip(): [float(v) for v in r[1:]] for r in rows[1:]}
    assert list(timed) == ["frontal", "frontal+profile", "mtcnn"]
    assert all(v[1] > 0 and v[2] > 0 and v[3] > 0 for v in timed.values())
    assert timed["mtcnn"][0] >= 1  # the astronaut's face

    without_cascades(bench_faces)
    assert bench_faces.main(args) == 0
    out = capsys.readouterr().out
    assert "only mtcnn is timed" in out
    assert [line.split("|")[0].strip() for line in out.splitlines() if line.count("|") == 4][1:] == ["mtcnn"]
