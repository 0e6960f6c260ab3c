"""The training core: resume after a kill lands on the same weights; precision paths; checkpoints."""

from __future__ import annotations

import pytest
import torch

from finetune.checkpoint import latest_state, list_checkpoints, save_atomic
from finetune.launch import train_plain

from .conftest import fast_config

pytestmark = pytest.mark.serial   # fine-tunes in this process: busy cores


class Killed(RuntimeError):
    pass


def _weights(adapter_dir):
    from safetensors.torch import load_file

    return load_file(f"{adapter_dir}/adapter_model.safetensors")


def test_resume_after_kill_ends_where_an_uninterrupted_run_does(snapshot_dir, tmp_path):
    kw = dict(max_steps=10, batch_size=8, checkpoint_every=4, num_threads=1)
    full = train_plain(snapshot_dir, fast_config(tmp_path / "a", **kw), tmp_path / "full", progress=False)

    cfg = fast_config(tmp_path / "b", **kw)

    def die_after_checkpoint(step, metrics):
        if step == 6:  # the step-4 checkpoint is on disk; steps 5-6 are lost work
            raise Killed()

    with pytest.raises(Killed):
        train_plain(snapshot_dir, cfg, tmp_path / "killed", report=die_after_checkpoint, progress=False)
    ckpts = list_checkpoints(tmp_path / "b" / "ckpt" / next((tmp_path / "b" / "ckpt").iterdir()).name)
    assert [p.name for p in ckpts] == ["step-00000004"]
    resumed = train_plain(snapshot_dir, cfg, tmp_path / "resumed", progress=False)

    assert resumed.metrics["train.resumed_from_step"] == 4 and resumed.metrics["train.steps_run"] == 6
    a, b = _weights(full.adapter_dir), _weights(resumed.adapter_dir)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6)
    for k in ("train.loss_end", "train.loss_mean", "train.loss_start"):
        assert resumed.metrics[k] == pytest.approx(full.metrics[k], rel=1e-4)
    assert not (tmp_path / "b" / "ckpt").exists() or not any((tmp_path / "b" / "ckpt").rglob("step-*"))


def test_checkpoints_are_atomic_and_a_broken_newest_falls_back(tmp_path):
    def state(step):
        return {"step": step, "trainable": {"w": torch.full((2,), float(step))}, "optimizer": {"state": {}},
                "scheduler": {"last_epoch": step}, "rng": {"cpu": torch.get_rng_state()}, "fingerprint": "fp",
                "extras": {"loss_sum": 1.0}}

    for step in (2, 4, 6):
        save_atomic(tmp_path, state(step), keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-00000004", "step-00000006"]
    assert not list(tmp_path.glob(".tmp-*"))
    (tmp_path / "step-00000006" / "trainable.safetensors").write_bytes(b"torn write")
    got = latest_state(tmp_path, "fp")
    assert got["step"] == 4 and got["trainable"]["w"].tolist() == [4.0, 4.0]
    assert latest_state(tmp_path, "other-run") is None


def _bf16_run(snapshot_dir, tmp_path, device):
    from finetune.data import load_snapshot
    from finetune.launch import run_worker

    cfg = fast_config(tmp_path, max_steps=3, batch_size=4)
    model, _, metrics, _ = run_worker(load_snapshot(snapshot_dir), cfg, device=device)
    trainable = {p.dtype for p in model.parameters() if p.requires_grad}
    frozen = {p.dtype for p in model.parameters() if not p.requires_grad}
    return trainable, frozen, metrics


def test_low_precision_path_on_cpu(snapshot_dir, tmp_path):
    """The GPU recipe (bf16 base, fp32 trainable weights, autocast) at tiny size on CPU."""
    from finetune.model import DeviceSpec

    trainable, frozen, metrics = _bf16_run(snapshot_dir, tmp_path, DeviceSpec("cpu", "bfloat16"))
    assert trainable == {torch.float32} and frozen == {torch.bfloat16}
    assert metrics["train.steps"] == 3 and torch.isfinite(torch.tensor(metrics["train.loss_end"]))


def test_cpu_mixed_precision_keeps_fp32_weights_runs_bf16_matmuls_and_is_recorded(snapshot_dir, tmp_path):
    """precision=bf16 on a CPU: weights stay fp32, autocast runs the matmuls in bf16; training
    records it with the adapter, and inference in bf16 moves probabilities only slightly."""
    import numpy as np

    from finetune.evaluate import load_adapter_model
    from finetune.model import pick_device, predict_proba, read_adapter_meta

    spec = pick_device("cpu", "bf16")
    assert (spec.dtype_name, spec.compute_name, spec.precision) == ("float32", "bfloat16", "bf16")
    with spec.autocast():
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
    trainable, frozen, metrics = _bf16_run(snapshot_dir, tmp_path / "w", spec)
    assert trainable == frozen == {torch.float32} and metrics["train.steps"] == 3

    cfg = fast_config(tmp_path / "p", max_steps=3, batch_size=4, precision="bf16")
    adapter = train_plain(snapshot_dir, cfg, tmp_path / "adapter", progress=False).adapter_dir
    assert read_adapter_meta(adapter)["trained_on"] == {"device": "cpu", "precision": "bf16"}

    texts = ["milling. vib 2.1 normal flat. temp 301 K rising.", "pump. flow 12 low falling."] * 4
    fp32 = pick_device("cpu", "fp32")
    model, tok, _ = load_adapter_model(adapter, fp32)
    exact = predict_proba(model, tok, texts, device=fp32)
    mixed = predict_proba(model, tok, texts, device=spec)
    assert np.allclose(mixed.sum(axis=1), 1.0, atol=1e-5)
    assert 0 < np.abs(mixed - exact).max() < 0.05     # bf16 really ran, and stays close


def test_precision_names_are_checked_where_they_are_set():
    from finetune import TrainConfig
    from finetune.model import ModelError, cpu_has_native_bf16, pick_device
    from flywheel.base.config import ConfigError
    from serve.config import ServeConfig

    assert pick_device("cpu", "auto").precision == ("bf16" if cpu_has_native_bf16() else "fp32")
    assert pick_device("cpu", "fp32").precision == "fp32"
    with pytest.raises(ModelError, match="precision must be one of auto, fp32, bf16, got 'fp16'"):
        pick_device("cpu", "fp16")
    with pytest.raises(ConfigError, match="precision should be one of auto, fp32, bf16"):
        TrainConfig(precision="half")
    with pytest.raises(ConfigError, match="precision should be auto, fp32 or bf16"):
        ServeConfig(precision="half")


def test_cuda_asked_for_without_a_gpu_names_the_setting_the_user_wrote():
    """`flywheel train --use-gpu` on a CPU machine said "device=cuda was asked for", a key it has not."""
    import torch

    from finetune.model import ModelError, pick_device

    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU; the refusal is for machines without one")
    with pytest.raises(ModelError) as err:
        pick_device("cuda", "auto", "train.use_gpu=true")
    assert str(err.value) == "train.use_gpu=true was asked for but no CUDA GPU is visible; use train.use_gpu=false " \
                             "(--use-gpu off)"
    with pytest.raises(ModelError, match=r"^serve.device=cuda was asked for .*; use serve.device=auto or cpu$"):
        pick_device("cuda", "auto", "serve.device=cuda")


@pytest.mark.gpu
def test_bf16_path_on_gpu(snapshot_dir, tmp_path):
    from finetune.model import pick_device

    device = pick_device("cuda")
    trainable, frozen, metrics = _bf16_run(snapshot_dir, tmp_path, device)
    assert device.dtype_name in ("bfloat16", "float16")
    assert trainable == {torch.float32} and frozen == {device.dtype}
    assert torch.isfinite(torch.tensor(metrics["train.loss_end"]))


def test_batch_plan_balances_and_caps(snapshot_dir):
    import numpy as np

    from finetune.data import LABEL_INDEX, label_ids, load_snapshot, plan_batches

    y = label_ids(load_snapshot(snapshot_dir).train["label"])
    plan = plan_batches(y, epochs=2, batch_size=16, seed=0, ok_ratio=1.0, max_train_samples=200)
    epoch0 = np.concatenate([s for s, e in zip(plan.steps, plan.epoch_of_step) if e == 0])
    n_ok = int((y[epoch0] == LABEL_INDEX["ok"]).sum())
    assert len(epoch0) == 100 and abs(n_ok - (len(epoch0) - n_ok)) <= 2   # ok:failure 1:1, 100 per epoch
    again = plan_batches(y, epochs=2, batch_size=16, seed=0, ok_ratio=1.0, max_train_samples=200)
    assert all((a == b).all() for a, b in zip(plan.steps, again.steps))    # deterministic order
    w = plan.class_weights
    assert w[LABEL_INDEX["ok"]] < w[LABEL_INDEX["BRG"]] <= 10.0


def test_top_layers_adapts_only_the_top_layers_and_the_backward_pass_stops_below_them(snapshot_dir, tmp_path):
    """lora.top_layers=2 on the packaged 6-layer MiniLM: LoRA weights in layers 4-5 only, nothing
    below layer 4 is part of the graph (so a step's backward pass is shorter), and the adapter
    records the layers so serving rebuilds the same model."""
    import json

    import numpy as np

    from finetune.data import load_snapshot
    from finetune.evaluate import load_adapter_model
    from finetune.launch import build_model
    from finetune.model import LoraSettings, ModelError, pick_device, predict_proba

    device = pick_device("cpu", "fp32")
    cfg = fast_config(tmp_path, max_steps=3, batch_size=4, lora=LoraSettings(top_layers=2))
    model, tok = build_model(cfg, device)
    adapted = {n.split(".layer.")[1].split(".")[0] for n, p in model.named_parameters()
               if p.requires_grad and "lora_" in n}
    assert adapted == {"4", "5"}

    layers = model.base_model.model.bert.encoder.layer
    needs_grad = {}
    hooks = [layers[i].register_forward_hook(lambda m, a, out, i=i: needs_grad.__setitem__(i, out[0].requires_grad))
             for i in range(len(layers))]
    model.train()
    batch = tok(["milling. vib 2.1 normal flat.", "pump. flow 12 low falling."], return_tensors="pt", padding=True)
    model(**batch).logits.sum().backward()
    for h in hooks:
        h.remove()
    assert needs_grad == {0: False, 1: False, 2: False, 3: False, 4: True, 5: True}

    adapter = train_plain(snapshot_dir, cfg, tmp_path / "adapter", progress=False).adapter_dir
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["layers_to_transform"] == [4, 5]
    assert {k.split(".layer.")[1].split(".")[0] for k in _weights(adapter) if "lora_" in k} == {"4", "5"}
    served, served_tok, _ = load_adapter_model(adapter, device)
    trained, _ = build_model(cfg, device, warm_start_dir=adapter)   # the adapter read back as training would
    texts = list(load_snapshot(snapshot_dir).eval["text"][:8])
    assert np.allclose(predict_proba(served, served_tok, texts, device=device),
                       predict_proba(trained.eval(), tok, texts, device=device), atol=1e-6)

    with pytest.raises(ModelError, match=r"lora.top_layers=7 but the base model has 6 layers: use a count from 1 "
                                         r"to 6, or 0 for all"):
        build_model(fast_config(tmp_path, lora=LoraSettings(top_layers=7)), device)
