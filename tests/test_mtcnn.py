"""The MTCNN face detector (hub.mtcnn) and the face prior's "mtcnn" detector (hub.faces)."""

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from skimage import data as skdata

import hub.faces as faces
import hub.mtcnn as mtcnn
from hub.faces import detect_faces

EYECROWD = Path(__file__).resolve().parents[2] / "shared" / "data" / "eyecrowd"
ASTRONAUT_FACE = (0.35, 0.14, 0.53, 0.32)  # skimage's astronaut photo (public domain, NASA): x and y as fractions


def inside(boxes: np.ndarray, region: tuple[float, float, float, float]) -> np.ndarray:
    cx, cy = (boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2
    x0, y0, x1, y1 = region
    return (x0 < cx) & (cx < x1) & (y0 < cy) & (cy < y1)


def test_the_shipped_weights_are_the_three_networks():
    w = mtcnn.weights()
    assert {k.split(".", 1)[0] for k in w} == {"pnet", "rnet", "onet"}
    assert 0.45e6 < sum(t.numel() for t in w.values()) < 0.55e6  # about half a million parameters
    assert all(t.dtype == torch.float32 for t in w.values())
    assert w["rnet.dense4.weight"].shape == (128, 576) and w["onet.dense5.weight"].shape == (256, 1152)


def test_it_finds_the_astronaut_and_nothing_in_flat_or_tiny_images():
    photo = skdata.astronaut()
    found, prob = mtcnn.detect(photo)
    assert found.dtype == np.float32 and found.shape == (1, 4) and prob[0] > 0.99
    assert inside(found / [512, 512, 512, 512], ASTRONAUT_FACE).all()
    boxes = detect_faces(photo, "mtcnn")
    assert boxes.dtype == np.float32 and boxes.shape == (1, 4) and (0 <= boxes).all() and (boxes <= 1).all()
    np.testing.assert_allclose(boxes, found / 512, atol=0.02)  # searched at 480 px here, for faces of 30 px and more
    for image in (np.full((300, 400, 3), 128, np.uint8), np.zeros((10, 12, 3), np.uint8), np.zeros((40, 1, 3), np.uint8)):
        assert detect_faces(image, "mtcnn").shape == (0, 4)
        assert mtcnn.detect(image)[0].shape == (0, 4)


def test_the_mirror_image_gives_the_mirrored_box_and_a_large_photo_the_same_relative_one():
    photo = skdata.astronaut()
    box = detect_faces(photo, "mtcnn")[0]
    mirrored = detect_faces(np.ascontiguousarray(photo[:, ::-1]), "mtcnn")
    assert len(mirrored) == 1
    np.testing.assert_allclose(mirrored[0], [1 - box[2], box[1], 1 - box[0], box[3]], atol=0.02)
    big = np.repeat(np.repeat(photo, 3, axis=0), 3, axis=1)  # 1536 x 1536: searched at MTCNN_SIDE, like the original
    np.testing.assert_allclose(detect_faces(big, "mtcnn"), [box], atol=0.02)


def test_the_pyramid_starts_where_the_smallest_face_fills_the_window(monkeypatch):
    photo = skdata.astronaut()  # the face is about 100 px tall in 512
    assert len(mtcnn.detect(photo, min_face=40)[0]) == 1
    seen = []
    real = mtcnn.pnet
    monkeypatch.setattr(mtcnn, "pnet", lambda x: seen.append(tuple(x.shape[-2:])) or real(x))
    mtcnn.detect(photo, min_face=40)
    # The first level puts a 40 px face in P-Net's 12 px window; each next one is 0.709x; the last still holds a window.
    assert seen[0] == (int(512 * 12 / 40 + 1),) * 2 and min(seen[-1]) >= 12 and len(seen) == 8
    seen.clear()
    mtcnn.detect(photo, min_face=20)
    assert seen[0] == (int(512 * 12 / 20 + 1),) * 2 and len(seen) == 10


def test_threads_detect_at_once_with_the_same_results():
    photos = [skdata.astronaut(), np.ascontiguousarray(skdata.astronaut()[:, ::-1]), skdata.coffee(), skdata.chelsea()]
    alone = [detect_faces(p, "mtcnn") for p in photos]
    with ThreadPoolExecutor(4) as pool:
        together = list(pool.map(lambda p: detect_faces(p, "mtcnn"), photos * 2))
    for a, b in zip(alone * 2, together):
        np.testing.assert_array_equal(a, b)


def test_convert_reorders_the_dense_inputs_to_torch_flattening(tmp_path, monkeypatch):
    # facenet-pytorch's layout: the dense layers read the last conv's output permuted to N x W x H x C.
    torch.manual_seed(0)
    shapes = {k: tuple(v.shape) for k, v in mtcnn.weights().items()}
    for net in ("pnet", "rnet", "onet"):
        state = {}
        for key, shape in shapes.items():
            if key.startswith(net + "."):
                value = torch.randn(shape) * 0.1
                if key.endswith("dense4.weight") or key.endswith("dense5.weight"):
                    value = value.reshape(shape[0], -1)
                state[key.split(".", 1)[1]] = value
        torch.save(state, tmp_path / f"{net}.pt")
    mtcnn.convert(tmp_path, tmp_path / "converted.safetensors")
    monkeypatch.setattr(mtcnn, "WEIGHTS", tmp_path / "converted.safetensors")
    monkeypatch.setattr(mtcnn, "_weights", {})
    w = mtcnn.weights()
    original = torch.load(tmp_path / "rnet.pt", weights_only=True)

    crops = torch.randn(3, 3, 24, 24)
    x = F.max_pool2d(mtcnn._conv(crops, w, "rnet", 1), 3, 2, ceil_mode=True)
    x = F.max_pool2d(mtcnn._conv(x, w, "rnet", 2), 3, 2, ceil_mode=True)
    x = mtcnn._conv(x, w, "rnet", 3).permute(0, 3, 2, 1).flatten(1)  # facenet-pytorch's flattening
    hidden = F.prelu(F.linear(x, original["dense4.weight"], original["dense4.bias"]), original["prelu4.weight"])
    expected = torch.softmax(F.linear(hidden, original["dense5_1.weight"], original["dense5_1.bias"]), 1)[:, 1]
    prob, offsets = mtcnn.rnet(crops)
    torch.testing.assert_close(prob, expected)
    assert offsets.shape == (3, 4)
    original = torch.load(tmp_path / "onet.pt", weights_only=True)
    crops = torch.randn(2, 3, 48, 48)
    x = F.max_pool2d(mtcnn._conv(crops, w, "onet", 1), 3, 2, ceil_mode=True)
    x = F.max_pool2d(mtcnn._conv(x, w, "onet", 2), 3, 2, ceil_mode=True)
    x = F.max_pool2d(mtcnn._conv(x, w, "onet", 3), 2, 2, ceil_mode=True)
    x = mtcnn._conv(x, w, "onet", 4).permute(0, 3, 2, 1).flatten(1)
    hidden = F.prelu(F.linear(x, original["dense5.weight"], original["dense5.bias"]), original["prelu5.weight"])
    torch.testing.assert_close(mtcnn.onet(crops)[0], torch.softmax(F.linear(hidden, original["dense6_1.weight"], original["dense6_1.bias"]), 1)[:, 1])
    monkeypatch.setattr(mtcnn, "_weights", {})  # the shipped weights again for later tests


def test_missing_weights_are_one_clear_sentence(tmp_path, monkeypatch):
    monkeypatch.setattr(mtcnn, "WEIGHTS", tmp_path / "mtcnn.safetensors")
    monkeypatch.setattr(mtcnn, "_weights", {})
    with pytest.raises(FileNotFoundError, match=r"weights .*mtcnn.safetensors are missing: reinstall saliency-unet"):
        detect_faces(skdata.astronaut(), "mtcnn")
    monkeypatch.setattr(mtcnn, "_weights", {})


def test_the_min_overlap_suppression_keeps_the_best_of_nested_boxes():
    boxes = torch.tensor([[0.0, 0, 10, 10], [2, 2, 6, 6], [20, 20, 30, 30], [0, 0, 10, 12]])
    scores = torch.tensor([0.8, 0.9, 0.7, 0.95])
    # [2,2,6,6] lies inside both others (overlap 1 over its own area); [0,0,10,10] inside [0,0,10,12].
    assert mtcnn._nms_min(boxes, scores, 0.7).tolist() == [3, 2]
    # A chain: b overlaps a and c, a and c do not overlap; a suppresses b, so b cannot suppress c.
    chain = torch.tensor([[0.0, 0, 10, 10], [2, 0, 14, 10], [11, 0, 21, 10]])
    assert mtcnn._nms_min(chain, torch.tensor([0.9, 0.8, 0.7]), 0.7).tolist() == [0, 2]


def test_each_stage_can_reject_every_candidate(monkeypatch):
    photo = skdata.astronaut()
    for thresholds in ((0.6, 1.01, 0.7), (0.6, 0.7, 1.01), (1.01, 0.7, 0.7)):  # no probability reaches 1.01
        monkeypatch.setattr(mtcnn, "THRESHOLDS", thresholds)
        found, prob = mtcnn.detect(photo)
        assert found.shape == (0, 4) and prob.shape == (0,) and found.dtype == prob.dtype == np.float32
    monkeypatch.undo()
    noise = np.random.default_rng(0).integers(0, 256, (240, 320, 3), dtype=np.uint8)
    assert mtcnn.detect(noise)[0].shape == (0, 4)


def test_a_callers_autocast_does_not_reach_the_detector():
    photo = skdata.astronaut()
    plain = mtcnn.detect(photo)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        np.testing.assert_array_equal(mtcnn.detect(photo)[0], plain[0])


def test_mtcnn_runs_on_a_cuda_model_device_and_on_the_cpu_beside_any_other(monkeypatch):
    seen = []
    monkeypatch.setattr(mtcnn, "detect", lambda image, min_face, device: seen.append(str(device)) or (np.zeros((0, 4), np.float32), None))
    for device in (torch.device("cuda", 1), torch.device("mps"), "cpu", torch.device("cpu", 0)):  # device objects only: nothing touches CUDA
        faces._mtcnn(skdata.astronaut(), device)
    assert seen == ["cuda:1", "cpu", "cpu", "cpu"]


def test_every_image_reaches_the_detector_as_uint8_rgb():
    photo = skdata.astronaut()
    box = detect_faces(photo, "mtcnn")
    for other in (photo / 255.0, np.dstack([photo, np.full(photo.shape[:2], 255, np.uint8)])):  # float, RGBA
        np.testing.assert_allclose(detect_faces(other, "mtcnn"), box, atol=1e-3)
    assert detect_faces(photo[:, :, 0], "mtcnn").shape == (1, 4)  # grey


@pytest.mark.skipif(not (EYECROWD / "images" / "250.jpg").is_file(), reason="needs ../shared/data/eyecrowd")
def test_it_finds_the_faces_of_crowds_that_the_cascades_miss():
    from hub.preprocess import load_image

    # eyecrowd 250, a seminar audience: the man at the second row's centre-left, the man with
    # glasses at the front right, and the white-haired woman at the front left, turned away, whom
    # the cascades miss. 137, a street crowd: the woman in white and blue at the centre, where
    # the observers looked most, whom the cascades miss too.
    for name, looked_at, missed in (("250", [(0.25, 0.35, 0.45, 0.65), (0.65, 0.4, 0.95, 0.8)], (0.15, 0.5, 0.3, 0.72)),
                                    ("137", [], (0.4, 0.3, 0.55, 0.55))):
        photo = load_image(EYECROWD / "images" / f"{name}.jpg")
        found, cascades = detect_faces(photo, "mtcnn"), detect_faces(photo, "frontal+profile")
        assert len(found) > len(cascades) >= 1
        assert all(inside(found, region).any() for region in [*looked_at, missed])
        assert not inside(cascades, missed).any()
