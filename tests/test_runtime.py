"""hub.runtime: device and precision decisions, BN folding, oneDNN fusion, the cached inference engine.

No timing here: speed is measured by `python -m bench.infer`.
"""

import copy
import json
import pickle
import threading

import numpy as np
import pytest
import torch
from torch import nn

from hub import SaliencyConfig, SaliencyUNet
from hub import runtime as rt


def calibrated(config: SaliencyConfig, seed: int = 0) -> SaliencyUNet:
    """A random-init model with non-trivial BN statistics (so folding has something to fold)."""
    torch.manual_seed(seed)
    model = SaliencyUNet(config)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.train()
            m.momentum = None
    with torch.no_grad():
        for _ in range(2):
            model(torch.rand(4, 3, *config.input_size))
    return model.eval()


@pytest.fixture(scope="module")
def model() -> SaliencyUNet:
    return calibrated(SaliencyConfig(input_size=(64, 96)))


def photo(h: int = 64, w: int = 96, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    blob = np.exp(-((yy - h * rng.random()) ** 2 + (xx - w * rng.random()) ** 2) / (2 * (h / 6) ** 2))
    return (np.stack([xx / w, yy / h, blob], axis=2) * 255).astype(np.uint8)


# -- decisions --------------------------------------------------------------------------------------


def test_resolve_precision(monkeypatch):
    cpu = torch.device("cpu")
    assert rt.resolve_precision(cpu, "fp32") is None
    assert rt.resolve_precision(cpu, "bf16") is torch.bfloat16  # forced, even where emulated
    assert rt.resolve_precision(cpu, "fp16") is torch.float16
    monkeypatch.setattr(rt, "native_bf16", lambda device: True)
    assert rt.resolve_precision(cpu, "auto") is torch.bfloat16
    monkeypatch.setattr(rt, "native_bf16", lambda device: False)
    assert rt.resolve_precision(cpu, "auto") is None
    with pytest.raises(ValueError, match="precision must be one of"):
        rt.resolve_precision(cpu, "half")


@pytest.mark.parametrize(
    ("capability", "expected"),
    [((9, 0), "bf16"), ((8, 0), "bf16"), ((8, 6), "bf16"), ((7, 5), "fp16"), ((7, 0), "fp16"), ((6, 1), "fp32")],
)
def test_auto_precision_on_cuda_follows_the_compute_capability(monkeypatch, capability, expected):
    """H100/A100/RTX 30 run bf16, T4/V100 fp16 (their tensor cores; bf16 would be emulated), Pascal fp32."""
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)  # True on a T4: not trusted
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a, **k: capability)
    assert rt.precision_name(torch.device("cuda"), "auto") == expected
    assert rt.precision_name(torch.device("cuda"), "fp32") == "fp32"


@pytest.mark.parametrize(
    ("avx512_bf16", "amx", "expected"),
    [(True, False, True), (False, True, True), (True, True, True), (False, False, False)],
)
def test_native_bf16_on_cpu_follows_the_cpu_features(monkeypatch, avx512_bf16, amx, expected):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)
    assert rt.native_bf16(torch.device("cpu")) is expected


def test_native_bf16_elsewhere(monkeypatch):
    assert rt.native_bf16(torch.device("meta")) is False
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)  # emulation counts there; not here
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a, **k: (8, 0))  # A100, H100: native
    assert rt.native_bf16(torch.device("cuda")) is True
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a, **k: (7, 5))  # T4: emulated
    assert rt.native_bf16(torch.device("cuda")) is False


def test_pick_device(monkeypatch):
    assert rt.pick_device("cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert rt.pick_device("auto") == torch.device("cpu")
    with pytest.raises(RuntimeError, match="no CUDA GPU is visible"):
        rt.pick_device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert rt.pick_device("auto") == torch.device("cuda")


def test_auto_plan_is_bf16_only_with_native_bf16(model, monkeypatch):
    cpu = torch.device("cpu")
    stages = [name for name, _ in model.named_children()]
    monkeypatch.setattr(rt, "native_bf16", lambda device: False)
    plan = rt.precision_plan(model, cpu, "auto")
    assert list(plan) == stages and set(plan.values()) == {torch.float32}
    monkeypatch.setattr(rt, "native_bf16", lambda device: True)
    assert rt.precision_plan(model, cpu, "auto") == dict.fromkeys(stages, torch.bfloat16)
    assert set(rt.precision_plan(model, cpu, "fp32").values()) == {torch.float32}
    plan = rt.precision_plan(model, cpu, "auto", fp32_stages=("stem", "layer1"))
    assert [s for s, d in plan.items() if d == torch.float32] == ["stem", "layer1"]
    with pytest.raises(ValueError, match=r"fp32_stages \['encoder'\] are not stages"):
        rt.precision_plan(model, cpu, "auto", fp32_stages=("encoder",))


# -- BatchNorm folding and fusion ------------------------------------------------------------------------


def randomise_bn(module: nn.Module, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=gen))
            m.running_var.copy_(torch.rand(n, generator=gen) + 0.5)
            if m.affine:
                m.weight.data.copy_(torch.randn(n, generator=gen))
                m.bias.data.copy_(torch.randn(n, generator=gen))


def test_fold_batchnorm_conv_and_transposed_conv():
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.ConvTranspose2d(8, 4, 4, stride=2, padding=1), nn.BatchNorm2d(4, affine=False), nn.ReLU(),
        nn.BatchNorm2d(4),  # not after a conv: stays
    ).eval()  # fmt: skip
    randomise_bn(net)
    x = torch.randn(2, 3, 10, 12)
    with torch.no_grad():
        expected = net(x)
        folded = copy.deepcopy(net)
        rt.fold_batchnorm(folded)
        got = folded(x)
    kinds = [type(m) for m in folded]
    assert kinds == [nn.Conv2d, nn.ReLU, nn.ConvTranspose2d, nn.ReLU, nn.BatchNorm2d]
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_bn_in_train_mode_is_not_folded():
    net = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)).train()
    rt.fold_batchnorm(net)
    assert isinstance(net[1], nn.BatchNorm2d)


@pytest.mark.parametrize("backbone", ["resnet50", "resnet18"])  # Bottleneck and BasicBlock
def test_fold_and_fuse_keep_the_function(backbone):
    if not rt._mkldnn_fusion_available():
        pytest.skip("this torch build has no oneDNN fusion operators")
    net = calibrated(SaliencyConfig(backbone=backbone, input_size=(64, 64)))
    randomise_bn(net)  # includes BN gammas far from 1, so a wrong fold would show
    x = torch.rand(2, 3, 64, 96)
    with torch.no_grad():
        expected = net(x)
        engine = copy.deepcopy(net)
        rt.fold_batchnorm(engine)
        assert not any(isinstance(m, nn.BatchNorm2d) for m in engine.modules())
        folded = engine(x)
        rt.fuse_mkldnn(engine)
        assert not any(isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)) for m in engine.modules())
        fused = engine(x)
    torch.testing.assert_close(folded, expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(fused, expected, rtol=1e-4, atol=1e-5)


# -- the engine ----------------------------------------------------------------------------------------


def test_fp32_engine_computes_the_model(model):
    x = torch.rand(3, 3, 64, 96).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        expected = model(x.contiguous())
    with torch.inference_mode():
        got = rt.inference_engine(model, "fp32")(x)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_fp16_engine_keeps_plain_convolutions_where_onednn_has_no_fp16(model, monkeypatch):
    """oneDNN's fp16 convolutions need AVX512-FP16 or AVX-NE-CONVERT (an AVX512-BF16 AMD EPYC has neither):
    there the fp16 engine must not hand them fp16 tensors (it raised), and still predicts."""
    if not rt._mkldnn_fusion_available():
        pytest.skip("this torch build has no oneDNN fusion operators")
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_fp16_supported", lambda: False, raising=False)
    engine = rt.inference_engine(model, "fp16")
    assert rt._FusedConv not in {type(m) for m in engine.modules()}
    assert rt._FusedConv in {type(m) for m in rt.inference_engine(model, "fp32").modules()}
    x = torch.rand(1, 3, 64, 96)
    with torch.inference_mode():
        got, expected = engine(x), rt.inference_engine(model, "fp32")(x)
    assert got.dtype == torch.float32 and torch.isfinite(got).all()
    assert np.corrcoef(got.ravel().numpy(), expected.ravel().numpy())[0, 1] > 0.95


def test_engine_without_onednn_fusion_folds_and_casts_only(model, monkeypatch):
    """The engine CUDA (and a CPU build without oneDNN) gets: BN folded, stages cast, plain convolutions."""
    monkeypatch.setattr(rt, "_mkldnn_fusion_available", lambda dtypes=(): False)
    engine = rt.inference_engine(model, "bf16")
    kinds = {type(m) for m in engine.modules()}
    assert nn.Conv2d in kinds and nn.ConvTranspose2d in kinds
    assert nn.BatchNorm2d not in kinds and rt._FusedConv not in kinds
    x = torch.rand(2, 3, 64, 96)
    with torch.no_grad():
        expected = model(x)
    with torch.inference_mode():
        got = engine(x)
    assert got.dtype == torch.float32 and float((got - expected).abs().max()) < 0.05


def test_bf16_engine_runs_the_plan(model):
    engine = rt.inference_engine(model, "bf16", fp32_stages=("stem", "layer1"))
    for name, dtype in rt.precision_plan(model, torch.device("cpu"), "bf16", ("stem", "layer1")).items():
        assert {p.dtype for p in getattr(engine, name).parameters()} == {dtype}, name
    assert engine.stem.dtype == torch.float32 and engine.layer2.dtype == torch.bfloat16
    x = torch.rand(2, 3, 64, 96)
    with torch.no_grad():
        expected = model(x)
    with torch.inference_mode():
        got = engine(x)
    assert got.dtype == torch.float32 and got.shape == expected.shape  # the head hands fp32 to the sigmoid
    assert float((got - expected).abs().max()) < 0.05


def test_engine_is_cached_and_rebuilt_when_weights_change():
    model = calibrated(SaliencyConfig(input_size=(64, 64)), seed=1)
    first = rt.inference_engine(model, "fp32")
    assert rt.inference_engine(model, "fp32") is first
    assert rt.inference_engine(model, "bf16") is not first
    with torch.no_grad():
        model.head.bias.add_(1.0)  # what an optimizer step does: in place
    second = rt.inference_engine(model, "fp32")
    assert second is not first
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        expected = model(x)
    with torch.inference_mode():
        torch.testing.assert_close(second(x), expected, rtol=1e-4, atol=1e-5)
    model.load_state_dict(calibrated(SaliencyConfig(input_size=(64, 64)), seed=2).state_dict())
    assert rt.inference_engine(model, "fp32") is not second
    assert len(model._engine_cache._entries) == 1  # engines of old weights are dropped


def test_concurrent_first_calls_build_one_engine(monkeypatch):
    model = calibrated(SaliencyConfig(input_size=(64, 64)), seed=3)
    builds = []
    real = rt._build_engine

    def counting(*args, **kwargs):
        builds.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(rt, "_build_engine", counting)
    engines = []
    threads = [threading.Thread(target=lambda: engines.append(rt.inference_engine(model, "fp32"))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(builds) == 1 and all(e is engines[0] for e in engines)


def test_predict_leaves_the_model_untouched(model):
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    model.predict(photo(), precision="bf16")
    assert model.training
    model.eval()
    after = model.state_dict()
    assert list(after) == list(before)  # no engine tensors leak into what save_pretrained writes
    for k, v in before.items():
        assert torch.equal(after[k], v), k
    assert all(p.is_contiguous() for p in model.parameters())  # no channels_last conversion of the model


def test_copies_and_pickles_get_no_engine(model):
    rt.inference_engine(model, "fp32")
    clone = copy.deepcopy(model)
    assert clone._engine_cache is not model._engine_cache and not clone._engine_cache._entries
    restored = pickle.loads(pickle.dumps(model))
    assert not restored._engine_cache._entries
    np.testing.assert_allclose(restored.predict(photo(), precision="fp32"), model.predict(photo(), precision="fp32"))


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_predict_precisions_agree(model, precision):
    images = [photo(seed=i) for i in range(3)]
    fp32 = model.predict(images, precision="fp32", batch_size=2)
    low = model.predict(images, precision=precision, batch_size=2)
    for a, b in zip(fp32, low):
        assert b.dtype == np.float32 and b.shape == a.shape and float(b.max()) == pytest.approx(1.0)
        assert np.corrcoef(a.ravel(), b.ravel())[0, 1] > 0.95
    with pytest.raises(ValueError, match="precision must be one of"):
        model.predict(images[0], precision="half")


def test_a_model_built_under_inference_mode_predicts():
    """Tensors made under inference_mode have no version counter; the engine cache must not need one."""
    with torch.inference_mode():
        built = SaliencyUNet(SaliencyConfig(backbone="resnet18", input_size=(64, 64))).eval()
    first = built.predict(photo(64, 64), precision="fp32")
    assert first.shape == (64, 64) and np.isfinite(first).all()
    np.testing.assert_array_equal(built.predict(photo(64, 64), precision="fp32"), first)


def test_batchnorm_folds_on_a_device_without_float64():
    """Apple MPS has no float64: folding computes in float64 on the CPU and moves the result back.

    Stand-in: a model on the meta device under a dispatch mode that refuses float64 there (and
    hands back zeros for meta -> CPU copies, which the meta device cannot make)."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    class NoFloat64OnMeta(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            source = args[0] if args and isinstance(args[0], torch.Tensor) else None
            if func is torch.ops.aten._to_copy.default and source is not None and source.device.type == "meta" \
                    and kwargs.get("device") == torch.device("cpu"):
                return torch.ones(source.shape, dtype=kwargs.get("dtype") or source.dtype)
            out = func(*args, **kwargs)
            for t in tree_leaves(out):
                if isinstance(t, torch.Tensor) and t.device.type == "meta" and t.dtype == torch.float64:
                    raise RuntimeError(f"{func}: float64 is not supported on this device")
            return out

    seq = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).eval().to("meta")
    with NoFloat64OnMeta():
        rt.fold_batchnorm(seq)
    assert len(seq) == 1 and seq[0].weight.device.type == "meta" and seq[0].weight.dtype == torch.float32


def test_compile_switch_wraps_the_engine_in_torch_compile(model, monkeypatch):
    calls = []

    def fake_compile(module, **kwargs):  # records the call; compiling for real takes about a minute
        calls.append(kwargs)
        return module

    monkeypatch.setattr(torch, "compile", fake_compile)
    compiled = model.predict(photo(), precision="fp32", compile=True)
    eager = model.predict(photo(), precision="fp32")
    assert calls == [{"dynamic": False, "options": {"freezing": True}}]
    np.testing.assert_allclose(compiled, eager, rtol=1e-4, atol=1e-5)


# -- the benchmark's output format (figures are not checked: they are measurements) -----------------------


def test_bench_infer_writes_one_record_per_size_batch_and_path(tmp_path, capsys):
    from bench import infer

    calibrated(SaliencyConfig(input_size=(64, 64))).save_pretrained(tmp_path / "m")
    out = tmp_path / "bench.json"
    args = ["--model", str(tmp_path / "m"), "--sizes", "64x64,32x96", "--batch", "1,2", "--repeat", "1",
            "--warmup", "0", "--json", str(out)]  # fmt: skip
    assert infer.main(args) == 0
    records = json.loads(out.read_text())
    assert [(r["size"], r["batch"], r["path"]) for r in records] == [
        (s, b, p) for s in ("64x64", "32x96") for b in (1, 2) for p in ("reference", "default")
    ]
    keys = {"size", "batch", "path", "ms_median", "img_per_s", "gflops_per_s", "fidelity_cc", "speedup"}
    keys |= {"sensitivity_cc", "frac_matmul_bf16", "matmul_bf16_gflops_per_s"}
    for r in records:
        assert keys <= set(r)
        assert r["ms_median"] > 0 and r["gflops_per_s"] > 0 and -1.0 <= r["fidelity_cc"] <= 1.0 + 1e-9
    assert all(r["speedup"] == 1.0 and r["fidelity_cc"] == 1.0 for r in records if r["path"] == "reference")
    assert "matmul" in capsys.readouterr().out


def test_bench_infer_options_times_each_option_on_a_folder_and_leaves_out_cascades_opencv_lacks(tmp_path, capsys, without_cascades):
    from PIL import Image
    from skimage import data as skdata

    from bench import infer

    SaliencyUNet(SaliencyConfig(backbone="resnet18", decoder_channels=(32, 16, 16, 8, 8), input_size=(64, 64))).save_pretrained(tmp_path / "m")
    (tmp_path / "photos").mkdir()
    for name in ("astronaut", "coffee"):
        Image.fromarray(getattr(skdata, name)()).save(tmp_path / "photos" / f"{name}.jpg")
    args = ["--options", "--model", str(tmp_path / "m"), "--sizes", "48x64", "--batch", "1", "--repeat", "1", "--warmup", "0",
            "--photos", str(tmp_path / "photos"), "--json", str(tmp_path / "o.json")]  # fmt: skip
    assert infer.main(args) == 0
    records = json.loads((tmp_path / "o.json").read_text())
    options = [r["option"] for r in records]
    assert options[0] == "none" and "face_prior=6 (mtcnn)" in options and "face_prior=4 (frontal+profile)" in options
    assert all(r["photos"] == str(tmp_path / "photos") and r["ms_median"] > 0 for r in records)
    assert "2 photos from" in capsys.readouterr().out

    without_cascades(infer)
    assert infer.main(args) == 0
    left = [r["option"] for r in json.loads((tmp_path / "o.json").read_text())]
    assert "face_prior=6 (mtcnn)" in left and "all" in left and not [o for o in left if "frontal" in o or "cascades" in o]
    assert "no cascade classifier: the rows of the cascade face detectors are left out" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        infer.main([*args[:-4], "--photos", str(tmp_path / "m")])  # a folder without photos
