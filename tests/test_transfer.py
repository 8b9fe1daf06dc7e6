"""What makes maps transfer to other photo collections: centre prior, aspect-true input, flip TTA,
calibrated blur, EMA weights, several training folders."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from hub import SaliencyConfig, SaliencyUNet
from hub.model import CenterPrior, gaussian_blur
from hub.preprocess import model_input_size
from hub.runtime import inference_engine
from train.data import SaliencyDataset, SizeBatchSampler, find_samples, load_splits
from train.loop import BLUR_GRID, EMA, TrainConfig, run

from test_train import blob_sample, tiny_config, tiny_data  # noqa: F401 - fixture

ROOT = Path(__file__).resolve().parents[1]


def photo(h: int, w: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    blob = np.exp(-((yy - h * 0.3) ** 2 + (xx - w * 0.8) ** 2) / (2 * (h / 6) ** 2))
    rgb = np.stack([xx / w, yy / h, blob], axis=2) * 200 + rng.integers(0, 55, (h, w, 3))
    return rgb.astype(np.uint8)


# -- the centre prior ----------------------------------------------------------------------------------
def test_center_prior_maps_have_the_frame_shape_and_peak_at_their_means():
    prior = CenterPrior(6)
    like = torch.zeros(2, 5, 40, 60)
    with torch.no_grad():
        maps = prior(like)
        padded = prior(torch.zeros(1, 5, 48, 64), valid=(40, 60))
    assert maps.shape == (2, 6, 40, 60) and maps.dtype == like.dtype
    assert float(maps.min()) >= 0.0 and float(maps.max()) <= 1.0
    for k in range(6):
        row, col = np.unravel_index(int(maps[0, k].argmax()), (40, 60))
        mx, my = prior.mu[k].tolist()
        assert abs((col + 0.5) / 60 - mx) < 1 / 60 + 1e-6 and abs((row + 0.5) / 40 - my) < 1 / 40 + 1e-6
    # Padding beyond the valid part does not move the prior within the frame.
    torch.testing.assert_close(padded[0, :, :40, :60], maps[0])


def test_center_prior_learns_its_means_and_widths():
    prior = CenterPrior(4)
    target = torch.zeros(40, 60)
    target[5:12, 40:55] = 1.0  # attention in the top right
    opt = torch.optim.Adam(prior.parameters(), lr=0.05)
    first = None
    for _ in range(30):
        loss = ((prior(torch.zeros(1, 1, 40, 60))[0].mean(0) - target) ** 2).mean()
        first = float(loss.detach()) if first is None else first
        opt.zero_grad()
        loss.backward()
        assert prior.mu.grad is not None and prior.log_sigma.grad is not None
        assert float(prior.mu.grad.abs().sum()) > 0 and float(prior.log_sigma.grad.abs().sum()) > 0
        opt.step()
    assert float(loss.detach()) < 0.7 * first
    assert float(prior.mu[:, 0].detach().mean()) > 0.55  # moved right


def test_model_with_prior_keeps_any_size_and_the_engine_computes_the_same():
    torch.manual_seed(0)
    model = SaliencyUNet(SaliencyConfig(input_size=(64, 64), center_prior=8)).eval()
    assert {"prior.mu", "prior.log_sigma"} <= set(model.state_dict())
    assert model.fuse1[0].in_channels == 64 + 64 + 8  # up1 (d4) + stem skip (c1) + priors
    x = torch.rand(2, 3, 70, 45)
    with torch.inference_mode():
        y = model(x)
        assert y.shape == (2, 1, 70, 45)
        engine = inference_engine(model, "fp32")
        torch.testing.assert_close(engine(x), y, rtol=1e-4, atol=1e-5)
    y = model(x)
    y.mean().backward()
    assert model.prior.mu.grad is not None and float(model.prior.mu.grad.abs().sum()) > 0


def test_config_round_trip_and_old_configs_load_without_the_new_options(tmp_path):
    cfg = SaliencyConfig(input_size=(64, 64), center_prior=4, keep_aspect=True, flip_tta=True, blur=0.02)
    model = SaliencyUNet(cfg)
    model.save_pretrained(tmp_path / "m")
    saved = json.loads((tmp_path / "m" / "config.json").read_text())
    assert saved["center_prior"] == 4 and saved["keep_aspect"] is True and saved["flip_tta"] is True and saved["blur"] == 0.02
    assert SaliencyUNet.from_pretrained(tmp_path / "m").config == cfg
    old = SaliencyConfig.from_dict({k: v for k, v in saved.items() if k not in ("center_prior", "keep_aspect", "flip_tta", "blur")})
    assert (old.center_prior, old.keep_aspect, old.flip_tta, old.blur) == (0, False, False, 0.0)
    with pytest.raises(ValueError, match="blur"):
        SaliencyConfig(blur=0.7)


# -- aspect-true input -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "image, expected",
    [((768, 1024), (192, 256)), ((1024, 768), (256, 192)), ((256, 256), (256, 256)), ((1500, 1000), (256, 160)), ((1000, 1500), (160, 256)),
     ((97, 131), (192, 256)), ((30, 600), (32, 256)), ((1, 1), (256, 256))],
)
def test_model_input_size_keeps_the_aspect_on_a_multiple_of_32(image, expected):
    assert model_input_size(image, (256, 256), keep_aspect=True) == expected
    assert model_input_size(image, (192, 256), keep_aspect=False) == (192, 256)


@pytest.mark.parametrize("shape", [(97, 131), (131, 97), (64, 200), (333, 120)])
def test_keep_aspect_predict_round_trips_odd_and_portrait_sizes(shape):
    torch.manual_seed(0)
    model = SaliencyUNet(SaliencyConfig(input_size=(64, 64), keep_aspect=True)).eval()
    rgb = photo(*shape)
    m = model.predict(rgb, precision="fp32")
    assert m.shape == shape and m.dtype == np.float32 and float(m.max()) == pytest.approx(1.0)
    # The network saw the aspect-true size: the same map as a manual forward at that size.
    from hub.preprocess import images_to_tensor, tensor_to_maps

    size = model_input_size(shape, (64, 64), True)
    with torch.no_grad():
        manual = tensor_to_maps(model(images_to_tensor([rgb], size)), [shape])[0]
    np.testing.assert_allclose(m, manual, atol=1e-4)
    # Mixed sizes in one list: each image is batched with those of its own model size.
    maps = model.predict([photo(60, 80), rgb, photo(80, 60), photo(61, 79)], batch_size=4, precision="fp32")
    assert [x.shape for x in maps] == [(60, 80), shape, (80, 60), (61, 79)]
    np.testing.assert_allclose(maps[1], m, atol=1e-5)


# -- flip averaging and blur --------------------------------------------------------------------------
def test_flip_tta_makes_the_map_mirror_symmetric():
    torch.manual_seed(0)
    plain = SaliencyUNet(SaliencyConfig(input_size=(64, 96), center_prior=4)).eval()
    tta = SaliencyUNet(SaliencyConfig(input_size=(64, 96), center_prior=4, flip_tta=True)).eval()
    tta.load_state_dict(plain.state_dict())
    rgb = photo(60, 90)
    a, b = tta.predict(rgb, precision="fp32"), tta.predict(np.ascontiguousarray(rgb[:, ::-1]), precision="fp32")
    np.testing.assert_allclose(a, b[:, ::-1], atol=1e-5)
    p, q = plain.predict(rgb, precision="fp32"), plain.predict(np.ascontiguousarray(rgb[:, ::-1]), precision="fp32")
    assert np.abs(p - q[:, ::-1]).max() > 1e-3  # without TTA the network is not symmetric
    x = torch.rand(1, 3, 64, 96)
    with torch.no_grad():
        mean = 0.5 * (plain(x) + plain(x.flip(-1)).flip(-1))
        torch.testing.assert_close(tta.infer(x), mean, rtol=1e-5, atol=1e-6)


def test_gaussian_blur_keeps_mass_and_smooths():
    x = torch.zeros(1, 1, 41, 61)
    x[0, 0, 20, 30] = 1.0
    y = gaussian_blur(x, 3.0)
    assert y.shape == x.shape and float(y.sum()) == pytest.approx(1.0, abs=1e-4)
    assert float(y.max()) == pytest.approx(1 / (2 * np.pi * 9), rel=0.05)
    assert int(y.argmax()) == int(x.argmax())
    torch.testing.assert_close(gaussian_blur(x, 0.0), x)


def test_blur_is_stored_and_applied_by_predict(tmp_path):
    torch.manual_seed(0)
    sharp = SaliencyUNet(SaliencyConfig(input_size=(64, 96))).eval()
    blurred = SaliencyUNet(SaliencyConfig(input_size=(64, 96), blur=0.05)).eval()
    blurred.load_state_dict(sharp.state_dict())
    blurred.save_pretrained(tmp_path / "b")
    loaded = SaliencyUNet.from_pretrained(tmp_path / "b")
    assert loaded.config.blur == 0.05
    rgb = photo(64, 96)
    with torch.no_grad():
        x = torch.from_numpy(rgb).permute(2, 0, 1)[None].float() / 255
        expected = gaussian_blur(sharp(x), 0.05 * 96)[0, 0].numpy()
    np.testing.assert_allclose(loaded.predict(rgb, precision="fp32"), expected / expected.max(), atol=1e-4)


# -- training: buckets, several folders, EMA, calibration ---------------------------------------------------
def test_size_batches_cover_each_item_once_across_ranks():
    sizes = [(64, 64)] * 7 + [(48, 64)] * 5 + [(64, 48)]
    val = [SizeBatchSampler(sizes, 3, rank=r, world=2) for r in range(2)]
    seen = [i for s in val for batch in s for i in batch]
    assert sorted(seen) == list(range(13))
    for s in val:
        for batch in s:
            assert len({sizes[i] for i in batch}) == 1 and len(batch) <= 3
    train = [SizeBatchSampler(sizes, 3, shuffle=True, seed=1, rank=r, world=2, drop_uneven=True) for r in range(2)]
    assert len(train[0]) == len(train[1]) == len(list(train[0]))
    first = list(train[0])
    train[0].set_epoch(1)
    assert list(train[0]) != first or len(first) == 1  # reshuffled per epoch
    train[0].set_epoch(0)
    assert list(train[0]) == first  # and replayed for the same epoch


def test_keep_aspect_dataset_gives_each_image_its_own_size(tmp_path):
    blob_sample(tmp_path, "wide", 48, 96, points=((10, 10), (80, 40)))
    blob_sample(tmp_path, "tall", 96, 48, points=((10, 10), (40, 80)))
    samples = find_samples(tmp_path)
    ds = SaliencyDataset(samples, (64, 64), augment=True, keep_aspect=True)
    assert ds.sizes == [(64, 32), (32, 64)]  # tall, wide (sorted ids)
    for i, (h, w) in enumerate(ds.sizes):
        image, gt, fix, _ = ds[i]
        assert image.shape == (3, h, w) and gt.shape == fix.shape == (1, h, w)
        assert float(gt.sum()) == pytest.approx(1.0, abs=1e-4)


def test_several_data_folders_are_pooled_with_prefixed_ids(tmp_path):
    for name in ("alpha", "beta"):
        for i in range(5):
            blob_sample(tmp_path / name, f"{i:03d}")
    splits = load_splits([tmp_path / "alpha", tmp_path / "beta"], tmp_path / "out", val_fraction=0.2, seed=0)
    ids = [s.id for k in ("train", "val") for s in splits[k]]
    assert len(ids) == len(set(ids)) == 10
    assert {i.split("/")[0] for i in ids} == {"alpha", "beta"}
    assert {s.id.split("/")[0] for s in splits["val"]} == {"alpha", "beta"}  # each folder split on its own
    with pytest.raises(ValueError, match="distinct names"):
        load_splits([tmp_path / "alpha", tmp_path / "alpha"], tmp_path / "out2")


def test_training_on_two_folders_with_every_option(tiny_data, tmp_path):  # noqa: F811
    other = tmp_path / "other"
    for i in range(6):
        blob_sample(other, f"{i:03d}", 48, 80)
    out = tmp_path / "out"
    cfg = tiny_config([str(tiny_data), str(other)], out, center_prior=4, keep_aspect=True,
                      flip_tta=True, blur="auto", ema=0.9, select_metric="kld", full_metrics_every=2)
    result = run(cfg)
    split = json.loads((out / "split.json").read_text())
    assert {i.split("/")[0] for i in split["train"]} == {"data", "other"}
    config = json.loads((out / "config.json").read_text())
    assert config["center_prior"] == 4 and config["keep_aspect"] and config["flip_tta"]
    metrics = json.loads((out / "metrics.json").read_text())
    best = metrics["best"]
    # --full-metrics-every 2: the rank-based metrics at epoch 2 (and on the best model at the end) only.
    every = {"cc", "kld", "nss", "sim", "auc_judd", "auc_borji", "sauc", "info_gain"}
    assert [set(e["val"]["metrics"]) for e in metrics["epochs"]] == [{"cc", "kld", "nss", "sim"}, every]
    assert set(best["val"]["metrics"]) == every
    assert config["blur"] == best["blur"] and best["blur"] in BLUR_GRID
    assert set(best["blur_grid"]) == {f"{b:g}" for b in BLUR_GRID} and best["blur_metric"] == "kld"
    assert result["best"]["val"]["metrics"]["kld"] == pytest.approx(best["val"]["metrics"]["kld"])
    card = (out / "README.md").read_text()
    assert "data + other" in card
    # The published weights are the EMA's, not the raw weights of the last step.
    checkpoint = torch.load(out / "checkpoints" / "last.pt", map_location="cpu", weights_only=False)
    published = load_file(str(out / "model.safetensors"))
    if best["epoch"] == cfg.epochs:
        ema_state = checkpoint["ema"]["module"]
        assert all(torch.equal(published[k], ema_state[k]) for k in published)
        assert any(not torch.equal(published[k], checkpoint["model"][k]) for k in published if published[k].is_floating_point())


def test_ema_averages_with_a_ramped_decay():
    torch.manual_seed(0)
    model = SaliencyUNet(SaliencyConfig(input_size=(64, 64), decoder_channels=(16, 16, 16, 16, 8)))
    ema = EMA(model, 0.9)
    before = {k: v.clone() for k, v in ema.module.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema.update(model)  # first update: decay min(0.9, 2/11)
    w = 2 / 11  # the weight kept from the average
    key = "head.weight"
    torch.testing.assert_close(ema.module.state_dict()[key], w * before[key] + (1 - w) * model.state_dict()[key])
    assert not ema.module.head.weight.requires_grad
    with pytest.raises(ValueError, match="--ema"):
        EMA(model, 1.5)


def test_train_cli_takes_several_folders_and_the_options(tmp_path):
    from train.loop import build_parser

    args = build_parser().parse_args(["--data", "a", "b", "--out", "o", "--center-prior", "8", "--keep-aspect",
                                      "--no-flip-tta", "--blur", "auto", "--ema", "0.998"])
    cfg = TrainConfig(**vars(args))
    assert cfg.data_dirs == [Path("a"), Path("b")] and cfg.center_prior == 8 and cfg.keep_aspect and not cfg.flip_tta
    assert cfg.blur_value() is None and TrainConfig(blur="0.02").blur_value() == 0.02
    with pytest.raises(ValueError, match="--blur"):
        TrainConfig(blur="soft").blur_value()


def test_crop_scale_sets_the_smallest_random_crop(tmp_path):
    blob_sample(tmp_path, "a", 64, 64)
    samples = find_samples(tmp_path)
    ds = SaliencyDataset(samples, (32, 32), augment=True, crop_scale=0.3)
    crop = ds.augmentation((32, 32)).transforms[0]
    assert tuple(crop.scale) == (0.3, 1.0)
    with pytest.raises(ValueError, match="--crop-scale"):
        SaliencyDataset(samples, (32, 32), augment=True, crop_scale=0.0)


def test_evaluate_picks_one_folders_val_split_of_a_multi_folder_model(tmp_path):
    from train.data import write_split
    from train.evaluate import DataError, select_samples

    for name in ("alpha", "beta"):
        for i in range(5):
            blob_sample(tmp_path / name, f"{i:03d}")
    roots = [tmp_path / "alpha", tmp_path / "beta"]
    splits = load_splits(roots, tmp_path / "model", val_fraction=0.4, seed=0)
    write_split(splits, roots, tmp_path / "model")
    samples, train = select_samples(tmp_path / "beta", "val", tmp_path / "model")
    assert [s.id for s in samples] == [s.id.split("/")[1] for s in splits["val"] if s.id.startswith("beta/")]
    assert len(train) == 3 and all(s.image.parent.parent.name == "beta" for s in samples + train)
    blob_sample(tmp_path / "gamma", "000")
    with pytest.raises(DataError, match="trained on"):
        select_samples(tmp_path / "gamma", "val", tmp_path / "model")
