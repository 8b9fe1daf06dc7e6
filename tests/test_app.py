"""The demo app: its /predict API through gradio_client against a running `python app.py`, the
strange files it must survive, model-loading errors, --share offline, the handlers and rendering
in-process, and the one-command Space deploy against the local test Hub."""

from __future__ import annotations

import csv
import io
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from app_process import ROOT, free_port, save_tiny_model, shared_app
from test_analysis import blobs
from PIL import Image

from hub.publish import PublishError, push, space_files, space_readme
from space import render, serving
from space.serving import ModelLoadError, ModelSpec, ModelStore

gradio_client = pytest.importorskip("gradio_client")
from gradio_client import Client, handle_file  # noqa: E402
from gradio_client.exceptions import AppError  # noqa: E402

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


# -- fixtures and test images ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(scope="module")
def app():
    return shared_app()  # `python app.py` in a subprocess, shared with the browser tests


@pytest.fixture(scope="module")
def client(app) -> Client:
    return Client(app.url, verbose=False)


def photo(h: int = 48, w: int = 64, seed: int = 0) -> np.ndarray:
    """A smooth colour image with a bright blob: H x W x 3 uint8."""
    yy, xx = np.mgrid[0:h, 0:w]
    blob = np.exp(-((yy - h * 0.3) ** 2 + (xx - w * 0.7) ** 2) / (2 * (max(h, w) / 8) ** 2))
    noise = np.random.default_rng(seed).integers(0, 20, (h, w, 1))
    return np.clip(np.stack([xx / w * 200, yy / h * 200, blob * 255], axis=2) + noise, 0, 255).astype(np.uint8)


def write(path: Path, make) -> Path:
    make(path)
    return path


def strange_files(tmp: Path) -> dict[str, tuple[Path, tuple[int, int] | str]]:
    """name -> (file, expected (width, height) of the returned PNGs, or a phrase the error must contain)."""
    rgb = photo(60, 80)
    out: dict[str, tuple[Path, tuple[int, int] | str]] = {}
    out["not an image"] = (write(tmp / "notes.jpg", lambda p: p.write_text("these are not pixels")), "could not be read")
    jpeg = io.BytesIO()
    Image.fromarray(photo(240, 320)).save(jpeg, format="JPEG", quality=90)
    out["truncated JPEG"] = (
        write(tmp / "cut.jpg", lambda p: p.write_bytes(jpeg.getvalue()[: len(jpeg.getvalue()) // 2])),
        "truncated or damaged",
    )
    out["1x1"] = (write(tmp / "dot.png", lambda p: Image.new("RGB", (1, 1), (200, 30, 30)).save(p)), (1, 1))
    out["12000x12000"] = (
        write(tmp / "huge.jpg", lambda p: Image.new("L", (12000, 12000), 90).save(p, quality=70)),
        (4096, 4096),  # the documented cap: original size up to 4096 px per side
    )
    out["CMYK JPEG"] = (write(tmp / "cmyk.jpg", lambda p: Image.fromarray(rgb).convert("CMYK").save(p)), (80, 60))
    grey16 = (np.linspace(0, 65535, 80 * 60).reshape(60, 80)).astype(np.uint16)
    out["16-bit PNG"] = (write(tmp / "deep.png", lambda p: Image.fromarray(grey16).save(p)), (80, 60))
    rgba = np.dstack([rgb, np.tile(np.linspace(0, 255, 80, dtype=np.uint8), (60, 1))])
    out["RGBA PNG"] = (write(tmp / "alpha.png", lambda p: Image.fromarray(rgba, "RGBA").save(p)), (80, 60))
    out["palette PNG"] = (
        write(tmp / "palette.png", lambda p: Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE).save(p, transparency=0)),
        (80, 60),
    )
    frames = [Image.fromarray(photo(60, 80, seed=i)).convert("P") for i in range(3)]
    out["animated GIF"] = (
        write(tmp / "anim.gif", lambda p: frames[0].save(p, save_all=True, append_images=frames[1:], duration=100, loop=0)),
        (80, 60),
    )
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise when shown
    out["EXIF-rotated photo"] = (write(tmp / "rotated.jpg", lambda p: Image.fromarray(rgb).save(p, exif=exif.tobytes())), (60, 80))
    return out


def check_pngs(overlay: str, saliency: str, size: tuple[int, int]) -> None:
    for path in (overlay, saliency):
        assert Path(path).read_bytes()[:8] == PNG_SIGNATURE
    with Image.open(overlay) as ov, Image.open(saliency) as sal:
        assert ov.size == size and ov.mode == "RGB"
        assert sal.size == size and sal.mode == "I;16"  # lossless 16-bit map
        m = np.asarray(sal)
    assert m.max() == 65535  # maps are scaled to peak 1


# -- the running app through gradio_client ----------------------------------------------------------


def test_predict_api_returns_pngs_of_the_input_size(client, tmp_path):
    Image.fromarray(photo(97, 131)).save(tmp_path / "odd.jpg", quality=92)
    overlay, saliency = client.predict(handle_file(tmp_path / "odd.jpg"), api_name="/predict")
    check_pngs(overlay, saliency, (131, 97))
    with Image.open(overlay) as ov:
        assert np.asarray(ov).std() > 5  # a picture, not a blank


def test_bad_file_gives_one_error_and_the_next_call_succeeds(client, tmp_path):
    (tmp_path / "report.txt").write_text("not an image at all")
    with pytest.raises(AppError) as info:
        client.predict(handle_file(tmp_path / "report.txt"), api_name="/predict")
    message = str(info.value)
    assert "report.txt could not be read" in message and "upload a JPEG, PNG" in message
    assert "\n" not in message and "Traceback" not in message
    Image.fromarray(photo()).save(tmp_path / "ok.png")
    check_pngs(*client.predict(handle_file(tmp_path / "ok.png"), api_name="/predict"), (64, 48))


@pytest.fixture(scope="module")
def strange(tmp_path_factory):
    return strange_files(tmp_path_factory.mktemp("strange"))


@pytest.mark.parametrize(
    "case",
    ["not an image", "truncated JPEG", "1x1", "12000x12000", "CMYK JPEG", "16-bit PNG", "RGBA PNG",
     "palette PNG", "animated GIF", "EXIF-rotated photo"],
)  # fmt: skip
def test_strange_files_give_a_result_or_one_clear_error(client, strange, case, tmp_path):
    path, expected = strange[case]
    if isinstance(expected, str):
        with pytest.raises(AppError) as info:
            client.predict(handle_file(path), api_name="/predict")
        message = str(info.value)
        assert path.name in message and expected in message
        assert "\n" not in message and "Traceback" not in message
    else:
        check_pngs(*client.predict(handle_file(path), api_name="/predict"), expected)
    # The server is still serving.
    Image.fromarray(photo(30, 40)).save(tmp_path / "next.png")
    check_pngs(*client.predict(handle_file(tmp_path / "next.png"), api_name="/predict"), (40, 30))


def test_too_many_pixels_is_refused_before_decoding(client, tmp_path):
    Image.new("1", (13000, 13000)).save(tmp_path / "bomb.png")  # tiny file, 169 megapixels
    with pytest.raises(AppError, match=r"bomb.png is 13000 x 13000 pixels \(169 MP\); this demo takes images up to 150 MP"):
        client.predict(handle_file(tmp_path / "bomb.png"), api_name="/predict")


def test_uploads_over_the_size_limit_are_refused(app, client, tmp_path):
    import httpx

    big = tmp_path / "huge.png"
    with open(big, "wb") as f:
        f.truncate(serving.MAX_UPLOAD_MB * 2**20 + 1)
    with open(big, "rb") as f:  # the server refuses it, whatever the client does
        response = httpx.post(f"{app.url}gradio_api/upload", files={"files": ("huge.png", f, "image/png")}, timeout=60)
    assert response.status_code == 413
    with pytest.raises(ValueError, match="exceeds the maximum file size of 52428800 bytes"):
        client.predict(handle_file(big), api_name="/predict")  # gradio_client checks it before uploading
    Image.fromarray(photo()).save(tmp_path / "ok.png")
    check_pngs(*client.predict(handle_file(tmp_path / "ok.png"), api_name="/predict"), (64, 48))


def test_the_api_documents_predict_and_analyze(client):
    endpoints = client.view_api(print_info=False, return_format="dict")["named_endpoints"]
    assert list(endpoints) == ["/predict", "/analyze"]
    assert [p["component"] for p in endpoints["/predict"]["parameters"]] == ["Image"]
    assert [r["component"] for r in endpoints["/predict"]["returns"]] == ["Image", "Image"]
    assert [p["component"] for p in endpoints["/analyze"]["parameters"]] == ["Image", "Json", "Number", "Number"]
    assert [r["component"] for r in endpoints["/analyze"]["returns"]] == ["Json", "Image", "Image", "Image"]


def test_analyze_api_returns_the_aoi_table_and_three_views(client, tmp_path):
    Image.fromarray(photo(120, 160)).save(tmp_path / "ad.png")
    boxes = [{"name": "logo", "xmin": 0, "ymin": 0, "xmax": 80, "ymax": 60}, {"name": "rest", "xmin": 80, "ymin": 0, "xmax": 160, "ymax": 120}]
    table, overlay, focus, order = client.predict(handle_file(tmp_path / "ad.png"), boxes, 0.5, 3, api_name="/analyze")
    assert [a["name"] for a in table["aois"]] == ["logo", "rest"]
    logo, rest = table["aois"]
    assert logo["area_share"] == pytest.approx(0.25) and rest["area_share"] == pytest.approx(0.5)
    assert 0 <= logo["attention_share"] <= 1 and logo["ratio"] == pytest.approx(logo["attention_share"] / 0.25)
    assert sorted([logo["rank"], rest["rank"]]) == [1, 2]
    assert logo["box"] == {"xmin": 0, "ymin": 0, "xmax": 80, "ymax": 60}
    assert 1 <= len(table["viewing_order"]) <= 3 and table["focus"]["mass"] == 0.5
    assert "not a scanpath model" in table["note"] and table["model"]
    for path in (overlay, focus, order):
        with Image.open(path) as im:
            assert im.size == (160, 120) and im.mode == "RGB"
    # No boxes: still the views and the viewing order; a bad box: one sentence naming it.
    table, *_ = client.predict(handle_file(tmp_path / "ad.png"), [], 0.75, 5, api_name="/analyze")
    assert table["aois"] == [] and table["focus"]["mass"] == 0.75
    with pytest.raises(AppError) as info:
        client.predict(handle_file(tmp_path / "ad.png"), [{"name": "cta", "xmin": 10}], 0.75, 5, api_name="/analyze")
    assert "boxes[0]" in str(info.value) and "needs numbers xmin, ymin, xmax, ymax" in str(info.value)
    with pytest.raises(AppError, match=r"Area of interest 'off' .* has no area inside the 160 x 120 image"):
        client.predict(handle_file(tmp_path / "ad.png"), [{"name": "off", "xmin": 200, "ymin": 0, "xmax": 300, "ymax": 50}],
                       0.75, 5, api_name="/analyze")  # fmt: skip


# -- starting the app ------------------------------------------------------------------------------


def test_app_without_a_model_says_what_to_pass():
    env = {k: v for k, v in os.environ.items() if k not in ("MODEL_ID", "MODEL_REVISION")}
    result = subprocess.run([sys.executable, "app.py"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "no model given; pass --model DIR_OR_REPO_ID or set MODEL_ID" in result.stderr


def test_model_and_revision_come_from_the_environment(monkeypatch):
    import app as app_module

    monkeypatch.setenv("MODEL_ID", "someone/saliency")
    monkeypatch.setenv("MODEL_REVISION", "v2")
    args = app_module.build_parser().parse_args([])
    assert (args.model, args.revision, args.device, args.share) == ("someone/saliency", "v2", "auto", False)
    args = app_module.build_parser().parse_args(["--model", "./local", "--revision", "main", "--device", "cpu"])
    assert (args.model, args.revision, args.device) == ("./local", "main", "cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown when there is no GPU")
def test_cuda_without_a_gpu_is_a_clear_exit(capsys):
    import app as app_module

    with pytest.raises(SystemExit) as info:
        app_module.main(["--model", "x/y", "--device", "cuda"])
    assert info.value.code == 2
    assert "no CUDA GPU is visible; pass --device cpu or auto" in capsys.readouterr().err


def test_unloadable_model_is_one_sentence_in_the_log_and_the_page(monkeypatch, caplog, tmp_path):
    import gradio as gr
    from huggingface_hub import constants

    from space.ui import Handlers

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # what HF_HUB_OFFLINE=1 sets at import
    expected = (
        "Could not load the model 'someone/missing-model' (the Hub could not be reached and the model is not in the "
        "local cache); pass --model DIR_OR_REPO_ID (or set MODEL_ID) with a folder written by save_pretrained or a "
        "Hub model repo id such as NAMESPACE/NAME."
    )
    store = ModelStore(ModelSpec("someone/missing-model"))
    store.warm_up().join(timeout=60)
    assert [r.getMessage() for r in caplog.records if r.levelname == "ERROR"] == [expected]  # the terminal
    Image.fromarray(photo()).save(tmp_path / "ok.png")
    with pytest.raises(gr.Error) as info:
        Handlers(store).api_predict(payload(tmp_path / "ok.png"))  # the page and the API
    assert info.value.message == expected
    from space.ui import status_markdown

    assert expected in status_markdown(store)


def test_share_failure_keeps_serving_locally(tiny_model_dir, monkeypatch, capfd):
    import urllib.request

    from space.ui import build_demo, launch

    # A refused proxy makes "offline" deterministic and keeps the test off the network.
    for name in ("HTTPS_PROXY", "HTTP_PROXY", "ALL_PROXY", "https_proxy", "http_proxy"):
        monkeypatch.setenv(name, "http://127.0.0.1:9")
    demo = build_demo(ModelStore(ModelSpec(str(tiny_model_dir))))
    try:
        _, local_url, share_url = launch(demo, host="127.0.0.1", port=free_port(), share=True, quiet=True)
        assert share_url is None
        err = capfd.readouterr().err
        assert "--share: gradio could not create a public share link" in err
        assert f"so the app is only served at {local_url}" in err
        with urllib.request.urlopen(local_url, timeout=10) as page:  # 127.0.0.1 is in NO_PROXY
            assert page.status == 200
        # Busy servers queue (and refuse beyond QUEUE_SIZE with gradio's "queue is full" message),
        # and the model runs one request at a time, whichever way it is called.
        assert demo._queue.max_size == serving.QUEUE_SIZE
        inference = [fn for fn in demo.fns.values() if fn.name in ("analyse", "batch", "compare", "api_predict", "api_analyze")]
        assert len(inference) == 5
        assert {(fn.concurrency_id, fn.concurrency_limit) for fn in inference} == {("inference", serving.INFERENCE_CONCURRENCY)}
    finally:
        demo.close()


# -- model loading -----------------------------------------------------------------------------------


def test_model_store_loads_once_and_explains_failures(tiny_model_dir, tmp_path, hub_server, hub_repo_id):
    store = ModelStore(ModelSpec(str(tiny_model_dir)))
    assert store.get() is store.get()
    maps, seconds = store.predict([photo()])
    assert maps[0].shape == (48, 64) and seconds > 0

    (tmp_path / "empty").mkdir()
    cases = {
        str(tmp_path / "empty"): "(the folder has no model.safetensors)",
        str(tmp_path / "no" / "such" / "dir"): "(no such folder, and not a valid Hub repo id)",
        "test-user/never-pushed": "(no such model repo on the Hub, or it is private and HF_TOKEN is not set)",
    }
    for model, reason in cases.items():
        with pytest.raises(ModelLoadError) as info:
            ModelStore(ModelSpec(model), retry_after_s=0).get()
        assert str(info.value) == (
            f"Could not load the model {model!r} {reason}; pass --model DIR_OR_REPO_ID (or set MODEL_ID) with a folder "
            "written by save_pretrained or a Hub model repo id such as NAMESPACE/NAME."
        )

    push(tiny_model_dir, hub_repo_id)
    assert ModelStore(ModelSpec(hub_repo_id)).predict([photo()])[0][0].shape == (48, 64)
    with pytest.raises(ModelLoadError, match="the repo has no revision 'nope'; pass --revision"):
        ModelStore(ModelSpec(hub_repo_id, revision="nope")).get()


def test_a_failed_load_is_remembered_then_retried(tmp_path, tiny_model_dir):
    target = tmp_path / "model"
    store = ModelStore(ModelSpec(str(target)), retry_after_s=3600)
    with pytest.raises(ModelLoadError) as first:
        store.get()
    with pytest.raises(ModelLoadError) as second:
        store.get()
    assert second.value is first.value  # no new attempt within retry_after_s
    store.retry_after_s = 0
    shutil.copytree(tiny_model_dir, target)
    assert store.get() is not None and store.error is None


# -- handlers and rendering in-process --------------------------------------------------------------


class CountingStore(ModelStore):
    calls = 0

    def predict(self, images):
        CountingStore.calls += 1
        return super().predict(images)


@pytest.fixture(scope="module")
def handlers(tiny_model_dir):
    from space.ui import Handlers

    CountingStore.calls = 0
    return Handlers(CountingStore(ModelSpec(str(tiny_model_dir))))


def payload(path: Path) -> dict:
    return {"path": str(path), "orig_name": path.name, "meta": {"_type": "gradio.FileData"}}


def test_display_changes_re_render_without_running_the_model(handlers, tmp_path):
    Image.fromarray(photo(120, 160)).save(tmp_path / "cat.jpg")
    state, overlay, grey, (before, after), stats, status = handlers.analyse(
        payload(tmp_path / "cat.jpg"), "turbo", 0.6, 0.0, 3
    )
    map_file, overlay_file = (update["value"] for update in handlers.export(state, "turbo", 0.6, 0.0, 3))
    assert CountingStore.calls == 1
    assert overlay.shape == (120, 160, 3) and grey.shape == (120, 160) and before.shape == (120, 160, 3)
    assert "inference" in status and "160 × 120 px" in status and "predicted attention" in stats
    with Image.open(map_file) as m:
        assert m.size == (160, 120) and m.mode == "I;16" and Path(map_file).name == "cat_saliency.png"
    with Image.open(overlay_file) as o:
        assert o.size == (160, 120) and o.mode == "RGB" and Path(overlay_file).name == "cat_overlay.png"

    views = {}
    for settings in [("turbo", 0.6, 0.0, 3), ("jet", 0.6, 0.0, 3), ("turbo", 0.1, 0.0, 3), ("turbo", 0.6, 5.0, 3), ("turbo", 0.6, 0.0, 0)]:
        new_overlay, (_, slider_after), new_stats = handlers.rerender(state, *settings)
        assert slider_after is new_overlay
        views[settings] = new_overlay
    assert CountingStore.calls == 1  # colormap, opacity, blur and peaks never re-ran the model
    first = views[("turbo", 0.6, 0.0, 3)]
    np.testing.assert_array_equal(first, overlay)
    for settings, view in views.items():
        if settings != ("turbo", 0.6, 0.0, 3):
            assert np.abs(view.astype(int) - first.astype(int)).mean() > 0.5, settings

    full = handlers.export_overlay(state, "jet", 0.3, 0.0, 2)
    with Image.open(full) as im:
        assert im.size == (160, 120) and im.mode == "RGB"
    assert CountingStore.calls == 1
    # Clearing the input clears the outputs.
    cleared = handlers.analyse(None, "turbo", 0.6, 0.0, 3)
    assert cleared[0] is None and cleared[1] is None


def test_aois_focus_order_and_report_come_from_the_stored_map(handlers, tmp_path):
    from hub.analysis import Box
    from space.ui import boxes_from_annotator

    Image.fromarray(photo(120, 160)).save(tmp_path / "poster.png")
    state, *_ = handlers.analyse(payload(tmp_path / "poster.png"), "turbo", 0.6, 0.0, 3)
    calls = CountingStore.calls
    focus, order, editor, rows = handlers.views(state, [], 0.75, 5)
    assert focus.shape == order.shape == (120, 160, 3) and rows == []
    assert editor["boxes"] == [] and editor["image"].shape == (120, 160, 3)

    # Draw two AOIs in the editor (pixels of the shown image), one unnamed.
    drawn = {"image": editor["image"], "boxes": [
        {"label": "logo", "xmin": 0, "ymin": 0, "xmax": 80, "ymax": 60},
        {"label": "", "xmin": 80, "ymin": 60, "xmax": 160, "ymax": 120},
    ]}  # fmt: skip
    boxes, table = handlers.edit_aois(state, drawn)
    assert boxes == [Box("logo", 0, 0, 0.5, 0.5), Box("AOI 2", 0.5, 0.5, 1, 1)]
    assert sorted(r[0] for r in table) == ["AOI 2", "logo"] and [r[4] for r in table] == ["1", "2"]  # by rank
    shares = [float(r[1].rstrip("%")) / 100 for r in table]
    assert shares[0] >= shares[1] and [r[2] for r in table] == ["25.0%", "25.0%"]
    ratio = float(table[0][3].split()[0])
    assert ratio == pytest.approx(shares[0] / 0.25, abs=0.06)
    # Moving an AOI re-computes its row, still without the model.
    drawn["boxes"][0].update(xmin=40, xmax=120)
    moved, table2 = handlers.edit_aois(state, drawn)
    assert moved[0] == Box("logo", 0.25, 0, 0.75, 0.5) and table2 != table

    # Focus threshold and the number of places re-render from the state.
    tight, loose = handlers.focus_view(state, 0.5), handlers.focus_view(state, 0.9)
    assert tight.shape == loose.shape and np.abs(tight.astype(int) - loose.astype(int)).mean() > 0.5
    assert handlers.order_view(state, 2).shape == (120, 160, 3)

    csv_update, report_update = handlers.export_analysis(state, moved, "turbo", 0.6, 0.0, 3, 0.75, 5)
    assert CountingStore.calls == calls  # AOIs, focus, viewing order, CSV and report never re-ran the model
    with open(csv_update["value"], encoding="utf-8-sig") as f:
        rows_csv = list(csv.DictReader(f))
    assert [r["rank"] for r in rows_csv] == ["1", "2"] and [r["aoi"] for r in rows_csv] == [r[0] for r in table2]  # as the table
    logo = next(r for r in rows_csv if r["aoi"] == "logo")
    assert rows_csv[0]["image"] == "poster.png" and (logo["xmin_px"], logo["xmax_px"], logo["ymax_px"]) == ("40", "120", "60")
    assert float(logo["area_share"]) == pytest.approx(0.25) and logo["model"]
    with Image.open(report_update["value"]) as report:
        assert report.mode == "RGB" and report.width == 1600 and report.height > 800
        assert Path(report_update["value"]).name == "poster_report.png"
    # Without AOIs: no CSV to download, still a report.
    csv_none, report_none = handlers.export_analysis(state, [], "turbo", 0.6, 0.0, 3, 0.75, 5)
    assert csv_none["interactive"] is False and report_none["interactive"] is True
    # The AOIs carry over, by relative position, to the next upload.
    Image.fromarray(photo(60, 200)).save(tmp_path / "banner.png")
    banner, *_ = handlers.analyse(payload(tmp_path / "banner.png"), "turbo", 0.6, 0.0, 3)
    _, _, editor2, rows2 = handlers.views(banner, moved, 0.75, 5)
    assert [(b["xmin"], b["ymin"], b["xmax"], b["ymax"]) for b in editor2["boxes"]] == [(50, 0, 150, 30), (100, 30, 200, 60)]
    assert sorted(r[0] for r in rows2) == ["AOI 2", "logo"]
    assert boxes_from_annotator(None) == []


def test_compare_puts_variants_on_one_scale_with_the_same_aois(handlers, tmp_path):
    from hub.analysis import Box

    files = []
    for i, (h, w) in enumerate([(120, 160), (60, 80), (90, 120)]):
        Image.fromarray(photo(h, w, seed=i)[:, ::-1 if i == 1 else 1]).save(tmp_path / f"v{i}.png")
        files.append(payload(tmp_path / f"v{i}.png"))
    boxes = [Box("left", 0, 0, 0.5, 1), Box("right", 0.5, 0, 1, 1)]
    gallery, table, status = handlers.compare(files, boxes, "turbo", 0.6)
    # Each variant at its own size under a strip naming it (the gallery hides captions until clicked).
    bars = {g[0].shape[0] - h for g, (h, w) in zip(gallery, [(120, 160), (60, 80), (90, 120)])}
    assert [g[0].shape[1:] for g in gallery] == [(160, 3), (80, 3), (120, 3)] and len(bars) == 1 and bars.pop() > 10
    strip = gallery[0][0][: gallery[0][0].shape[0] - 120]
    assert (strip == 255).mean() > 0.5 and strip.min() < 100  # white with dark text
    assert [c.split(":")[0] for _, c in gallery] == ["A", "B", "C"]
    assert "| AOI | A (v0.png) | B (v1.png) | C (v2.png) | Larger share |" in table
    assert "| left |" in table and "| right |" in table and "3 variants" in status
    rows = [line.split("|")[1].strip() for line in table.splitlines()[2:]]
    a_share = {r.split("|")[1].strip(): float(r.split("|")[2].strip().rstrip("%")) for r in table.splitlines()[2:]}
    assert rows == sorted(rows, key=lambda n: -a_share[n])  # by A's share, as the AOI table ranks
    _, no_aois, _ = handlers.compare(files[:2], [], "turbo", 0.6)
    assert "No areas of interest yet" in no_aois
    import gradio as gr

    with pytest.raises(gr.Error, match=r"Add two to four variants of the design to compare \(1 given\)"):
        handlers.compare(files[:1], boxes, "turbo", 0.6)


def test_batch_gives_a_gallery_and_one_zip_of_maps(handlers, tmp_path):
    sizes = [(40, 50), (61, 33)]
    files = []
    for i, (h, w) in enumerate(sizes):
        Image.fromarray(photo(h, w, seed=i)).save(tmp_path / f"img{i}.png")
        files.append(payload(tmp_path / f"img{i}.png"))
    (tmp_path / "bad.png").write_bytes(b"nope")
    files.insert(1, payload(tmp_path / "bad.png"))
    gallery, button, status = handlers.batch(files, "turbo", 0.6, 0.0, 3)
    assert len(gallery) == 2 and [c.split(":")[0] for _, c in gallery] == ["img0.png", "img1.png"]
    assert "2 of 3 images" in status and "bad.png could not be read" in status
    with zipfile.ZipFile(button["value"]) as zf:
        assert zf.namelist() == ["img0_saliency.png", "img1_saliency.png", "summary.csv"]
        for name, (h, w) in zip(zf.namelist(), sizes):
            with Image.open(io.BytesIO(zf.read(name))) as m:
                assert m.size == (w, h) and m.mode == "I;16"
        rows = list(csv.DictReader(io.StringIO(zf.read("summary.csv").decode())))
    assert [r["image"] for r in rows] == ["img0.png", "img1.png"] and 0 < float(rows[0]["top10_share"]) <= 1


def test_blur_keeps_size_and_peak_and_outlines_are_drawn():
    m = blobs()
    blurred = render.blur(m, 0.05)
    assert blurred.shape == m.shape and blurred.max() == pytest.approx(1.0)
    assert (blurred > 0.5).mean() > 1.5 * (m > 0.5).mean()  # the hills spread out
    assert render.blur(m, 0) is m
    image = np.full((120, 160, 3), 128, np.uint8)
    plain, _ = render.render_overlay(image, m, top_k=0)
    outlined, stats = render.render_overlay(image, m, top_k=2)
    changed = np.any(plain != outlined, axis=2)
    assert len(stats.regions) == 2 and changed.mean() > 0.01
    ys, xs = np.nonzero(changed)  # every drawn pixel is near one of the two blobs
    near = np.minimum(np.hypot(ys - 40, xs - 50), np.hypot(ys - 80, xs - 120))
    assert near.max() < 35


def test_focus_view_order_aois_and_one_colour_scale_are_drawn():
    from hub.analysis import Box, aoi_shares, focus_mask, viewing_order

    m = blobs()
    image = np.full((120, 160, 3), 200, np.uint8)
    fog = render.render_focus(image, m, 0.5)
    inside = focus_mask(m, 0.5)
    far = m < 0.02
    assert fog.shape == image.shape
    assert fog[far].mean() < 80 and fog[inside].mean() > 150  # dimmed outside, the photo (and outline) inside
    order = viewing_order(m, 3)
    drawn = render.render_viewing_order(image, order)
    x, y = round(order[0].x * 160), round(order[0].y * 120)
    assert tuple(drawn[y, x]) != tuple(drawn[5, 80])  # a badge on the first place, the photo dimmed elsewhere
    assert drawn[5, 80].mean() < 200
    boxes = [Box("logo", 0.1, 0.1, 0.5, 0.5)]
    tagged = render.draw_aois(image, boxes, aoi_shares(m, boxes))
    changed = np.any(tagged != image, axis=2)
    assert changed[12:60, 16].any() and not changed[100:, 100:].any()  # the box's edge, nothing far from it
    flat, peaked = render.common_scale([np.ones((10, 10)), np.pad(np.ones((5, 5)), 5)[:10, :10] + 1e-3])
    assert peaked.max() == pytest.approx(1.0) and flat.max() < 0.5  # equal colours, equal density
    page = render.render_report("t", [render.ReportPanel("a", image), render.ReportPanel("b", fog)], [["h1", "h2"], ["x", "1"]], ["note"])
    assert page.shape[1] == 1600 and page.dtype == np.uint8


def test_aoi_tags_keep_clear_of_peak_numbers_and_boxes_keep_their_editor_colour():
    from hub.analysis import Box, attention_stats
    from space.ui import annotator_value, boxes_from_annotator, stats_markdown

    image = np.full((200, 200, 3), 100, np.uint8)
    box = Box("headline", 0.25, 0.3, 0.75, 0.7)
    plain = np.any(render.draw_aois(image, [box]) != image, axis=2)
    assert plain[40:58, 52:70].any()  # the tag sits above the box by default
    badge = (60, 44, 8)  # a peak number just above the box's left corner
    moved = np.any(render.draw_aois(image, [box], avoid=[badge]) != image, axis=2)
    yy, xx = np.mgrid[:200, :200]
    assert not moved[(xx - 60) ** 2 + (yy - 44) ** 2 < 8**2].any()  # nothing drawn over the number
    assert moved[46:58, 100:148].any() and not moved[46:58, 50:70].any()  # the tag moved to the right-hand end
    m = blobs()
    stats = attention_stats(m, 2)
    assert [(x, y) for x, y, _ in render.region_badges(stats.regions, m.shape)] == [
        (round(r.peak[0] * 160), round(r.peak[1] * 120)) for r in stats.regions]  # fmt: skip
    # The table gives the peak, where the number is drawn (x, y in pixels).
    r = stats.regions[0]
    assert f"| 1 | {r.share:.1%} | {r.area:.1%} | {round(r.peak[0] * 160)}, {round(r.peak[1] * 120)} |" in stats_markdown(stats, m.shape)

    # A box keeps the colour the editor gave it; boxes without one take the palette's (the editor's order).
    value = {"image": image, "boxes": [{"label": "a", "xmin": 0, "ymin": 0, "xmax": 50, "ymax": 50, "color": (92, 172, 238)},
                                       {"label": "b", "xmin": 50, "ymin": 50, "xmax": 100, "ymax": 100}]}  # fmt: skip
    boxes = boxes_from_annotator(value)
    assert boxes[0].color == (92, 172, 238) and boxes[1].color is None and boxes[0] == Box("a", 0, 0, 0.25, 0.25)
    assert [b["color"] for b in annotator_value(image, boxes)["boxes"]] == [(92, 172, 238), render.AOI_COLORS[1]]
    drawn = render.draw_aois(image, boxes)
    assert tuple(drawn[25, 1]) == (92, 172, 238) or tuple(drawn[25, 0]) == (92, 172, 238)


def test_display_values_from_the_page_are_clamped():
    from space.ui import Display

    assert Display.of("nope", 7, -3, 99) == Display(colormap="turbo", opacity=1.0, blur=0.0, peaks=5)
    assert Display.of("hot", "0.25", None, 2.0) == Display(colormap="hot", opacity=0.25, blur=0.0, peaks=2)


def test_read_upload_bounds_size_and_reports_orientation(tmp_path):
    Image.new("RGB", (9000, 3000), (10, 200, 30)).save(tmp_path / "wide.png")
    upload = serving.read_upload(tmp_path / "wide.png")
    assert upload.original_size == (3000, 9000) and upload.image.shape == (1365, 4096, 3) and upload.downscaled
    frames = [Image.new("RGB", (10, 8), c).convert("P") for c in ((255, 0, 0), (0, 0, 255))]
    frames[0].save(tmp_path / "a.gif", save_all=True, append_images=frames[1:])
    assert serving.read_upload(tmp_path / "a.gif").animated
    assert serving.read_upload(tmp_path / "a.gif", name="shown.gif").name == "shown.gif"


# -- the Space deploy ---------------------------------------------------------------------------------


def project_modules_imported_by(entry: Path) -> set[str]:
    """Project files (posix, relative to ROOT) that `entry` imports, directly or in functions, transitively."""
    import ast

    def resolve(name: str) -> list[Path]:
        base = ROOT.joinpath(*name.split("."))
        return [p for p in (base.with_suffix(".py"), base / "__init__.py") if p.is_file()]

    seen: set[Path] = set()
    todo = [entry]
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            for name in names:
                parts = name.split(".")
                for i in range(1, len(parts) + 1):  # a package's __init__ runs first
                    todo += resolve(".".join(parts[:i]))
    return {p.relative_to(ROOT).as_posix() for p in seen}


def test_space_files_are_exactly_what_the_app_imports():
    files = space_files()
    modules = project_modules_imported_by(ROOT / "app.py")
    assert {f for f in files if f.endswith(".py")} == modules
    assert not [f for f in modules if f.startswith(("train/", "tests/", "bench/"))]
    assert "requirements.txt" in files and "space/examples/SOURCES.md" in files
    assert {"hub/mtcnn.safetensors", "hub/MTCNN_LICENSE"} <= set(files)  # what hub.mtcnn reads, and its licence
    examples = [f for f in files if f.startswith("space/examples/") and f.endswith(".jpg")]
    assert sorted(examples) == sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "space/examples").glob("*.jpg"))
    assert len(examples) >= 3 and all((ROOT / f).stat().st_size < 150_000 for f in examples)


def test_space_readme_front_matter_matches_the_pins():
    from huggingface_hub import SpaceCard

    data = SpaceCard(space_readme(ROOT, "me/demo", "me/model").decode()).data
    pinned = next(line.split("==")[1].strip() for line in (ROOT / "requirements.txt").read_text().splitlines() if line.startswith("gradio=="))
    import gradio

    assert data.sdk == "gradio" and str(data.sdk_version) == pinned == gradio.__version__
    assert data.app_file == "app.py" and data.models == ["me/model"] and data.license == "apache-2.0"
    for key in ("title", "emoji", "python_version", "suggested_hardware", "short_description", "tags"):
        assert data.get(key), key
    assert len(data.short_description) <= 60


def test_space_readme_with_another_gradio_is_refused(tmp_path):
    (tmp_path / "space").mkdir()
    (tmp_path / "space" / "README.md").write_text((ROOT / "space" / "README.md").read_text())
    (tmp_path / "requirements.txt").write_text("gradio==1.0.0\n")
    with pytest.raises(PublishError, match="requirements.txt pins gradio==1.0.0; make them equal"):
        space_readme(tmp_path, "me/demo", "me/model")


def test_space_command_deploys_to_the_test_hub(tiny_model_dir, hub_server, hub_api, capsys):
    from hub.__main__ import main

    model_id = f"{hub_server.user}/saliency-unet-for-space"
    push(tiny_model_dir, model_id)
    space_id = f"{hub_server.user}/saliency-demo"
    assert main(["space", space_id, "--model", model_id, "--hardware", "t4-small", "--private"]) == 0
    url = capsys.readouterr().out.strip()
    assert url == f"{hub_server.url}/spaces/{space_id}"

    repo = hub_server.repo(space_id, "space")
    files = repo.files()
    assert set(files) - {".gitattributes"} == set(space_files()) | {"README.md"}
    for name in ("app.py", "space/ui.py", "hub/model.py", "space/examples/coffee.jpg"):
        assert files[name] == (ROOT / name).read_bytes()
    readme = files["README.md"].decode()
    assert f"  - {model_id}\n" in readme and "YOUR_NAMESPACE" not in readme and f'Client("{space_id}")' in readme
    assert repo.sdk == "gradio" and repo.private and repo.hardware == "t4-small"
    assert repo.variables["MODEL_ID"].value == model_id
    assert hub_api.get_space_runtime(space_id).stage == "RUNNING"  # app_file found: the Space would start

    # A redeploy replaces files the project no longer has, and leaves the user's own files alone.
    hub_api.upload_file(path_or_fileobj=b"old", path_in_repo="space/removed.py", repo_id=space_id, repo_type="space")
    hub_api.upload_file(path_or_fileobj=b"mine", path_in_repo="NOTES.md", repo_id=space_id, repo_type="space")
    assert main(["space", space_id, "--model", model_id, "--model-revision", "main"]) == 0
    files = hub_server.repo(space_id, "space").files()
    assert "space/removed.py" not in files and files["NOTES.md"] == b"mine"
    assert hub_server.repo(space_id, "space").variables["MODEL_REVISION"].value == "main"

    assert main(["space", f"{hub_server.user}/other-demo", "--model", f"{hub_server.user}/not-pushed"]) == 1
    assert "does not exist on the Hub" in capsys.readouterr().err
