"""predict() and the one preprocessing path: every input kind, every image mode, list in/list out."""

import numpy as np
import pytest
import torch
from PIL import Image

from hub import SaliencyConfig, SaliencyUNet
from hub import preprocess as pp


@pytest.fixture(scope="module")
def model() -> SaliencyUNet:
    torch.manual_seed(0)
    return SaliencyUNet(SaliencyConfig(input_size=(64, 96))).eval()


def photo(h: int = 60, w: int = 80) -> np.ndarray:
    """A smooth colour test image with a bright blob off-centre."""
    yy, xx = np.mgrid[0:h, 0:w]
    blob = np.exp(-((yy - h * 0.3) ** 2 + (xx - w * 0.7) ** 2) / (2 * (h / 8) ** 2))
    rgb = np.stack([xx / w, yy / h, blob], axis=2) * 255
    return rgb.astype(np.uint8)


def check_map(m: np.ndarray, shape: tuple[int, int]) -> None:
    assert m.dtype == np.float32 and m.shape == shape
    assert float(m.min()) >= 0.0 and float(m.max()) == pytest.approx(1.0)


def test_predict_from_array_pil_and_path(model, tmp_path):
    rgb = photo()
    Image.fromarray(rgb).save(tmp_path / "a.png")
    from_array = model.predict(rgb)
    from_pil = model.predict(Image.fromarray(rgb))
    from_path = model.predict(tmp_path / "a.png")
    from_str = model.predict(str(tmp_path / "a.png"))
    check_map(from_array, (60, 80))
    for other in (from_pil, from_path, from_str):
        np.testing.assert_array_equal(other, from_array)


def test_predict_matches_a_manual_forward(model):
    rgb = photo(64, 96)
    with torch.no_grad():
        x = torch.from_numpy(rgb).permute(2, 0, 1)[None].float() / 255
        manual = model(x)[0, 0].numpy()
    np.testing.assert_allclose(model.predict(rgb, precision="fp32"), manual / manual.max(), rtol=1e-4, atol=1e-5)


def test_list_in_list_out_batched(model):
    images = [photo(60, 80), photo(30, 200), photo(128, 50)]
    maps = model.predict(images, batch_size=2)
    assert isinstance(maps, list) and len(maps) == 3
    for m, img in zip(maps, images):
        check_map(m, img.shape[:2])
    np.testing.assert_allclose(maps[1], model.predict(images[1]), atol=1e-5)


def test_predict_restores_train_mode(model):
    model.train()
    model.predict(photo())
    assert model.training
    model.eval()


@pytest.mark.parametrize(
    "mode",
    ["L", "LA", "RGBA", "P", "PA", "I;16", "I", "CMYK", "1", "F"],
)
def test_every_pil_mode_becomes_rgb(model, tmp_path, mode):
    rgb = photo()
    if mode in ("I;16", "I"):
        img = Image.fromarray((rgb[:, :, 0].astype(np.uint16) * 257))
        if mode == "I":
            img = img.convert("I")
    elif mode == "F":
        img = Image.fromarray(rgb[:, :, 0].astype(np.float32) / 255.0)
    else:
        img = Image.fromarray(rgb).convert(mode)
    arr = pp.load_image(img)
    assert arr.shape == (60, 80, 3) and arr.dtype == np.uint8
    check_map(model.predict(img), (60, 80))


def test_16_bit_png_keeps_its_range(tmp_path):
    grey = (np.linspace(0, 65535, 80)[None, :].repeat(60, 0)).astype(np.uint16)
    Image.fromarray(grey).save(tmp_path / "deep.png")
    arr = pp.load_image(tmp_path / "deep.png")
    assert arr[0, 0, 0] == 0 and arr[0, -1, 0] == 255 and 120 < arr[0, 40, 0] < 135


def test_transparency_goes_onto_white():
    rgba = np.zeros((4, 4, 4), np.uint8)  # fully transparent black
    assert (pp.load_image(rgba) == 255).all()


def test_cmyk_jpeg_file(model, tmp_path):
    Image.fromarray(photo()).convert("CMYK").save(tmp_path / "print.jpg")
    check_map(model.predict(tmp_path / "print.jpg"), (60, 80))


def test_exif_rotation_is_applied(model, tmp_path):
    rgb = photo(40, 100)  # stored landscape
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display": the photo is shown portrait
    Image.fromarray(rgb).save(tmp_path / "phone.jpg", exif=exif)
    assert pp.load_image(tmp_path / "phone.jpg").shape == (100, 40, 3)
    check_map(model.predict(tmp_path / "phone.jpg"), (100, 40))


def test_animated_gif_gives_first_frame(tmp_path):
    frames = [Image.fromarray(np.full((10, 12, 3), v, np.uint8)) for v in (10, 200)]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:])
    arr = pp.load_image(tmp_path / "anim.gif")
    assert arr.shape == (10, 12, 3) and abs(int(arr[0, 0, 0]) - 10) < 8


def test_tiny_and_odd_arrays(model):
    m = model.predict(np.full((1, 1, 3), 128, np.uint8))
    assert m.shape == (1, 1)
    check_map(model.predict(photo()[:, :, 0]), (60, 80))  # H x W grey
    check_map(model.predict(photo().astype(np.float32) / 255), (60, 80))


def test_bad_inputs_say_what_to_do(tmp_path):
    (tmp_path / "notes.txt").write_text("not an image")
    with pytest.raises(ValueError, match="notes.txt could not be read as an image"):
        pp.load_image(tmp_path / "notes.txt")
    with pytest.raises(FileNotFoundError, match="missing.jpg does not exist"):
        pp.load_image(tmp_path / "missing.jpg")
    Image.fromarray(photo()).save(tmp_path / "cut.jpg")
    data = (tmp_path / "cut.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="cut.jpg"):
        pp.load_image(tmp_path / "cut.jpg")
    with pytest.raises(ValueError, match="shape"):
        pp.load_image(np.zeros((4, 4, 5), np.uint8))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        pp.load_image(np.full((4, 4, 3), 7.0))
    with pytest.raises(TypeError, match="pass a file path"):
        pp.load_image(42)


def test_max_side_bounds_the_decode(tmp_path):
    Image.fromarray(np.zeros((800, 1200, 3), np.uint8)).save(tmp_path / "big.jpg")
    assert pp.load_image(tmp_path / "big.jpg", max_side=300).shape == (200, 300, 3)
    assert pp.load_image(np.zeros((800, 1200, 3), np.uint8), max_side=600).shape == (400, 600, 3)


def test_images_to_tensor_is_channels_last_in_unit_range():
    x = pp.images_to_tensor([photo(), photo(30, 40)], (64, 96))
    assert x.shape == (2, 3, 64, 96) and x.dtype == torch.float32
    assert x.is_contiguous(memory_format=torch.channels_last)
    assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0


def test_map_images_and_overlay():
    m = np.linspace(0, 1, 12, dtype=np.float32).reshape(3, 4)
    eight, sixteen = pp.map_to_image(m, 8), pp.map_to_image(m, 16)
    assert eight.mode == "L" and np.asarray(eight)[-1, -1] == 255
    assert np.asarray(sixteen).max() == 65535
    for name in ("jet", "turbo", "inferno", "viridis", "hot"):
        assert pp.colorize(m, name).shape == (3, 4, 3)
    rgb = np.full((3, 4, 3), 100, np.uint8)
    over = pp.overlay(rgb, m, alpha=0.0)
    assert (over == 100).all()  # opacity 0 shows the photo unchanged
    assert not (pp.overlay(rgb, m, alpha=1.0) == 100).all()
    with pytest.raises(ValueError, match="unknown colormap"):
        pp.colorize(m, "rainbow-ish")
