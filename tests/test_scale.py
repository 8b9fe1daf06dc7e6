"""Where users run it: distributed training rules, precision by capability, resume exactness,
--init-from, training-only state, and ZeroGPU serving. Hardware we lack (CUDA, NCCL, ZeroGPU) is
stood in for on the CPU: gloo processes, mocked CUDA calls that record or refuse, a fake `spaces`."""

from __future__ import annotations

import json
import logging
import os
import shlex
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
from app_process import free_port, save_tiny_model, start_app
from PIL import Image
from test_train import ROOT, cli_args, tiny_config, tiny_data  # noqa: F401 (fixture)

import train.loop as loop
from hub import SaliencyUNet
from train.data import DataError
from train.loop import TrainConfig, run

# -- distributed ------------------------------------------------------------------------------------


def test_the_gpu_is_made_current_before_the_process_group_starts(monkeypatch):
    """NCCL binds to the current device: set_device first, then init_process_group (with the device)."""
    calls = []
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")  # torchrun --nproc_per_node 1: the distributed path too
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: calls.append(("set_device", str(device))))
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda **kw: calls.append(("init", kw["backend"], str(kw.get("device_id")))))
    monkeypatch.setattr(dist, "get_rank", lambda: 0)
    monkeypatch.setattr(dist, "get_world_size", lambda: 1)
    device, rank, world = loop.setup_distributed("auto")
    assert calls == [("set_device", "cuda:0"), ("init", "nccl", "cuda:0")]
    assert (str(device), rank, world) == ("cuda:0", 0, 1)


def test_without_torchrun_there_is_no_process_group(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(dist, "init_process_group", lambda **kw: pytest.fail("no process group outside torchrun"))
    assert loop.setup_distributed("cpu") == (torch.device("cpu"), 0, 1)


def test_collectives_run_on_tensors_of_the_process_device(monkeypatch):
    """NCCL takes tensors of the process's GPU only. The meta device stands in for it here."""
    seen = []

    class Sent(Exception):
        pass

    def all_reduce(tensor, op=None):
        seen.append((tensor.device.type, op))
        raise Sent  # a meta tensor has no value to read back; what reached the collective is what counts

    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(dist, "get_rank", lambda: 1)
    monkeypatch.setattr(dist, "all_reduce", all_reduce)
    meta = torch.device("meta")
    with pytest.raises(Sent):
        loop.mean_across_ranks(1.5, meta)
    with pytest.raises(Sent):
        loop.first_bad_rank(True, meta)
    assert seen == [("meta", dist.ReduceOp.SUM), ("meta", dist.ReduceOp.MAX)]


def torchrun(*args: str, nproc: int = 2, timeout: float = 600) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)


def test_a_non_finite_loss_on_one_rank_stops_every_rank_with_one_message(tiny_data, tmp_path):  # noqa: F811
    """Rank 1 diverges at its first step; rank 0 must not wait for it in the gradient all-reduce."""
    script = tmp_path / "diverge_on_rank_1.py"
    script.write_text(textwrap.dedent(f"""
        import os, sys
        sys.path.insert(0, {str(ROOT)!r})
        import train.loop
        from train.losses import SaliencyLoss

        class DivergeOnRank1(SaliencyLoss):
            def forward(self, pred, gt, fix):
                loss, parts = super().forward(pred, gt, fix)
                return (loss * float("nan") if os.environ["RANK"] == "1" else loss), parts

        train.loop.SaliencyLoss = DivergeOnRank1
        sys.exit(train.loop.main(sys.argv[1:]))
    """))
    result = torchrun(str(script), *cli_args(tiny_data, tmp_path / "nan", 2), timeout=300)
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 2 and len(set(errors)) == 1, result.stderr[-3000:]  # both ranks, the same sentence
    assert "non-finite on rank 1 at epoch 1, step 0" in errors[0]


def test_ddp_validation_scores_each_image_once_with_the_means_of_one_process(tiny_data, tmp_path):  # noqa: F811
    """3 validation images on 2 ranks: n_images 3, and the means one process computes on the same weights."""
    out = tmp_path / "ddp"
    result = torchrun("-m", "train", *cli_args(tiny_data, out, 1), "--val-fraction", "0.375", "--blur", "0")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "(2 processes)" in result.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    val = metrics["epochs"][-1]["val"]
    assert val["n_images"] == 3 == len(json.loads((out / "split.json").read_text())["val"])
    single = tmp_path / "single.json"
    from train.evaluate import main as evaluate_main

    assert evaluate_main(["--model", str(out), "--data", str(tiny_data), "--split", "val", "--precision", "fp32",
                          "--out", str(single)]) == 0
    alone = json.loads(single.read_text())
    assert alone["n_images"] == 3
    for key in ("cc", "kld", "nss", "sim"):
        assert val["metrics"][key] == pytest.approx(alone["metrics"][key], rel=2e-3, abs=2e-4), key


# -- precision ----------------------------------------------------------------------------------------


def test_fp16_training_uses_a_grad_scaler_and_records_what_ran(tiny_data, tmp_path):  # noqa: F811
    out = tmp_path / "fp16"
    result = run(tiny_config(tiny_data, out, epochs=1, precision="fp16"))
    assert np.isfinite(result["history"][0]["train_loss"])
    runs_on = json.loads((out / "train_config.json").read_text())["runs_on"]
    assert runs_on == {"device": "cpu", "precision": "fp16", "processes": 1}
    checkpoint = torch.load(out / "checkpoints" / "last.pt", weights_only=False)
    assert checkpoint["scaler"]["scale"] > 0  # the GradScaler's state, for an exact resume


def test_auto_training_precision_is_what_the_device_does_natively(tiny_data, tmp_path, monkeypatch, caplog):  # noqa: F811
    import hub.runtime as rt

    monkeypatch.setattr(rt, "native_bf16", lambda device: False)
    caplog.set_level(logging.INFO, logger="train")
    run(tiny_config(tiny_data, tmp_path / "auto", epochs=1, precision="auto"))
    assert json.loads((tmp_path / "auto" / "train_config.json").read_text())["runs_on"]["precision"] == "fp32"
    assert "precision: fp32 on cpu" in caplog.text
    # The card carries the command that trained the weights, and it parses back to the same run.
    card = (tmp_path / "auto" / "README.md").read_text()
    command = next(line for line in card.splitlines() if line.startswith("python -m train "))
    again = TrainConfig(**vars(loop.build_parser().parse_args(shlex.split(command)[3:])))
    again.resolve()
    assert loop.schedule_changes(json.loads((tmp_path / "auto" / "train_config.json").read_text()), again) == []


# -- resume ---------------------------------------------------------------------------------------------


def test_resume_with_another_schedule_stops_and_names_the_flags(tiny_data, tmp_path):  # noqa: F811
    out = tmp_path / "run"
    run(tiny_config(tiny_data, out, epochs=1))
    with pytest.raises(DataError) as info:
        run(tiny_config(tiny_data, out, epochs=3, lr=5e-4, resume=True))
    message = str(info.value)
    assert "--epochs 1 -> 3" in message and "--lr 0.001 -> 0.0005" in message and "\n" not in message
    assert "--batch-size" not in message  # unchanged flags are not named


def test_cuda_generator_state_is_saved_and_restored(monkeypatch):
    state = {"set": None}
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device=None: torch.tensor([7], dtype=torch.uint8))
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda new, device=None: state.update(set=(new, str(device))))
    cuda = torch.device("cuda", 0)
    saved = loop.rng_state(cuda)
    assert torch.equal(saved["cuda"], torch.tensor([7], dtype=torch.uint8))
    loop.set_rng_state(saved, cuda)
    assert state["set"][1] == "cuda:0" and torch.equal(state["set"][0], saved["cuda"])
    assert "cuda" not in loop.rng_state(torch.device("cpu"))


# -- fine-tuning workflows -------------------------------------------------------------------------------


def test_a_random_encoder_is_trained_whole_at_the_full_rate_unless_the_flags_say_otherwise():
    random_init = TrainConfig(data=["d"], out="o", backbone_weights="none")
    assert random_init.frozen == () and random_init.encoder_lr == 1.0
    pretrained = TrainConfig(data=["d"], out="o")  # ImageNet
    assert pretrained.frozen == ("stem", "layer1") and pretrained.encoder_lr == 0.1
    assert TrainConfig(data=["d"], out="o", backbone_weights="none", init_from="me/salicon").frozen == ("stem", "layer1")
    explicit = TrainConfig(data=["d"], out="o", backbone_weights="none", freeze="stem", encoder_lr_mult="0.5")
    assert explicit.frozen == ("stem",) and explicit.encoder_lr == 0.5
    explicit.resolve()
    assert (explicit.freeze, explicit.encoder_lr_mult) == ("stem", "0.5")


def test_init_from_starts_from_a_published_model_and_checks_its_architecture(tiny_data, tmp_path, monkeypatch):  # noqa: F811
    source = tmp_path / "salicon"
    run(tiny_config(tiny_data, source, epochs=1, blur="0"))
    published = SaliencyUNet.from_pretrained(source).state_dict()
    seen = {}
    real = loop.train_one_epoch

    def capture(model, *args, **kwargs):
        seen.setdefault("start", {k: v.clone() for k, v in model.state_dict().items()})
        return real(model, *args, **kwargs)

    monkeypatch.setattr(loop, "train_one_epoch", capture)
    # backbone_weights stays "imagenet": with --init-from nothing is downloaded (the tests have no network).
    cfg = tiny_config(tiny_data, tmp_path / "mit", epochs=1, init_from=str(source), backbone_weights="imagenet")
    run(cfg)
    assert all(torch.equal(seen["start"][k], published[k]) for k in published)
    config = json.loads((tmp_path / "mit" / "train_config.json").read_text())
    assert config["freeze"] == "stem,layer1" and config["encoder_lr_mult"] == "0.1"
    with pytest.raises(DataError, match="another architecture than this run; add --center-prior 0"):
        run(tiny_config(tiny_data, tmp_path / "bad", epochs=1, init_from=str(source), center_prior=4))
    with pytest.raises(DataError, match="--init-from .*nowhere: could not load a saliency model"):
        run(tiny_config(tiny_data, tmp_path / "bad2", epochs=1, init_from=str(tmp_path / "nowhere")))


# -- ZeroGPU ------------------------------------------------------------------------------------------------

FAKE_SPACES = '''
"""Stand-in for Hugging Face's `spaces` on a ZeroGPU Space, for the tests: any CUDA initialisation
outside a @spaces.GPU call raises; inside one, "the GPU" is this CPU."""
import threading
import torch

_attached = threading.local()
MESSAGE = "CUDA must not be initialized in the main process"


def _guard(name):
    real = getattr(torch.cuda, name)

    def guarded(*args, **kwargs):
        if not getattr(_attached, "on", False):
            raise RuntimeError(f"{MESSAGE} (torch.cuda.{name})")
        return real(*args, **kwargs)

    setattr(torch.cuda, name, guarded)


for _name in ("_lazy_init", "init", "is_available", "device_count", "current_device", "get_device_name",
              "get_device_capability", "get_device_properties", "set_device", "synchronize", "is_bf16_supported"):
    _guard(_name)

_real_to = torch.nn.Module.to


def _to_attached_gpu(self, *args, **kwargs):
    if not getattr(_attached, "on", False):
        return _real_to(self, *args, **kwargs)
    args = tuple("cpu" if str(a).startswith("cuda") else a for a in args)
    if str(kwargs.get("device", "")).startswith("cuda"):
        kwargs["device"] = "cpu"
    return _real_to(self, *args, **kwargs)


torch.nn.Module.to = _to_attached_gpu
calls = 0


def GPU(fn=None, **options):
    def wrap(f):
        def call(*args, **kwargs):
            global calls
            calls += 1
            _attached.on = True
            try:
                return f(*args, **kwargs)
            finally:
                _attached.on = False
        return call
    return wrap(fn) if fn is not None else wrap
'''


def test_zero_gpu_app_never_touches_cuda_in_the_main_process(tmp_path):
    """`python app.py --device cuda` on a ZeroGPU Space: loads on the CPU, answers /predict through the GPU call."""
    from gradio_client import Client, handle_file

    fake = tmp_path / "fake_spaces"
    fake.mkdir()
    (fake / "spaces.py").write_text(FAKE_SPACES)
    model = save_tiny_model(tmp_path / "model")
    env = {"SPACES_ZERO_GPU": "true", "PYTHONPATH": os.pathsep.join([str(fake), str(ROOT)])}
    app = start_app(model, tmp_path, "--device", "cuda", env=env)
    try:
        app.wait_served()
        app.wait_for_log("loaded", timeout=60)
        Image.fromarray(np.random.default_rng(0).integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(tmp_path / "a.png")
        client = Client(app.url, verbose=False)
        overlay, saliency = client.predict(handle_file(tmp_path / "a.png"), api_name="/predict")
        with Image.open(saliency) as im:
            assert im.size == (64, 48)
        log = app.log()
        assert "CUDA must not be initialized" not in log, log[-3000:]
        assert "cpu (ZeroGPU)" in log
    finally:
        app.stop()


def test_zero_gpu_store_keeps_the_main_process_model_on_the_cpu(tmp_path, monkeypatch):
    from space import serving

    monkeypatch.setenv("SPACES_ZERO_GPU", "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: pytest.fail("torch.cuda touched in the main process"))
    store = serving.ModelStore(serving.ModelSpec(str(save_tiny_model(tmp_path / "m")), device="cuda"))
    assert store.device == torch.device("cuda") and "ZeroGPU" in store.device_label()
    model = store.get()
    assert model.device.type == "cpu" and not getattr(model, "_engine_cache", None)  # nothing built for the GPU yet
    monkeypatch.setattr(store, "device", torch.device("cpu"))  # inside the GPU call, "the GPU" is this CPU
    maps, _ = store.predict([np.zeros((40, 50, 3), np.uint8)])
    assert maps[0].shape == (40, 50)
    assert store.model_for_inference() is store.model_for_inference() is not model  # moved once, cached


def test_the_status_line_names_the_precision_that_runs(tmp_path, monkeypatch):
    import hub.runtime as rt
    from space import serving

    monkeypatch.delenv("SPACES_ZERO_GPU", raising=False)
    model = str(save_tiny_model(tmp_path / "m"))
    with monkeypatch.context() as m:
        m.setattr(rt, "native_bf16", lambda device: False)  # a CPU without AVX512-BF16/AMX
        assert serving.ModelStore(serving.ModelSpec(model, device="cpu")).device_label() == "CPU · fp32"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Tesla T4")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (7, 5))
    assert serving.ModelStore(serving.ModelSpec(model, device="cuda")).device_label() == "CUDA (Tesla T4) · fp16"
