"""Model loading refuses pickle weights and remote code by default (finetune.model).

A model directory or adapter from a shared drive or a hub is untrusted input: unpickling a
``.bin``/``.pt`` file or importing a repository's Python runs whatever its author wrote.  The
``.bin`` files here are booby-trapped pickles that create a marker file when unpickled, so the
tests show not only the refusal but that nothing was executed on the way to it.

Tiny BERTs are built from config (no download); the tokenizer files come from the packaged
all-MiniLM-L6-v2 so the one positive control loads end to end.
"""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import pytest

from finetune.model import ModelError, check_adapter_dir, load_adapter, load_base, pick_device

TOKENIZER_FILES = ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


class _Trap:
    """Unpickling this creates ``marker``: proof that the pickle was executed."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _write_trap(path: Path, marker: Path) -> None:
    path.write_bytes(pickle.dumps({"bert.embeddings.word_embeddings.weight": _Trap(marker)}, protocol=4))


def _tiny_config(vocab_size: int):
    from transformers import BertConfig

    return BertConfig(vocab_size=vocab_size, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                      intermediate_size=32, max_position_embeddings=128)


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory, minilm_path):
    """Tiny encoders. ``good``: safetensors + tokenizer; ``pickled``: the same model as pytorch_model.bin only."""
    import torch
    from transformers import BertModel

    root = tmp_path_factory.mktemp("tiny-models")
    vocab = len((Path(minilm_path) / "vocab.txt").read_text().splitlines())
    torch.manual_seed(0)
    model = BertModel(_tiny_config(vocab))  # an encoder without a head, like all-MiniLM-L6-v2
    good, pickled = root / "good", root / "pickled"
    model.save_pretrained(good)  # safetensors
    pickled.mkdir()
    model.config.save_pretrained(pickled)
    torch.save(model.state_dict(), pickled / "pytorch_model.bin")  # the legacy pickle format
    for d in (good, pickled):
        for name in TOKENIZER_FILES:
            shutil.copy(Path(minilm_path) / name, d / name)
    assert sorted(p.name for p in good.glob("*.safetensors")) == ["model.safetensors"]
    assert not list(pickled.glob("*.safetensors"))
    return {"good": good, "pickled": pickled, "root": root}


def test_base_model_with_only_pickle_weights_is_refused(tiny_dirs):
    with pytest.raises(ModelError, match=r"no \.safetensors weights.*pickle"):
        load_base(str(tiny_dirs["pickled"]), device=pick_device("cpu"))


def test_refusal_happens_before_anything_is_unpickled(tiny_dirs, tmp_path):
    trapped = tmp_path / "trapped"
    shutil.copytree(tiny_dirs["pickled"], trapped)
    marker = tmp_path / "pwned"
    _write_trap(trapped / "pytorch_model.bin", marker)
    with pytest.raises(ModelError, match="pickle"):
        load_base(str(trapped), device=pick_device("cpu"))
    assert not marker.exists(), "the pickle was executed while loading the base model"


def test_safetensors_are_loaded_and_a_pickle_beside_them_is_ignored(tiny_dirs, tmp_path):
    both = tmp_path / "both"
    shutil.copytree(tiny_dirs["good"], both)
    marker = tmp_path / "pwned"
    _write_trap(both / "pytorch_model.bin", marker)
    model, tok = load_base(str(both), device=pick_device("cpu"))
    assert model.config.num_labels > 1 and tok("milling. vib 2.1")["input_ids"]
    assert not marker.exists(), "the pickle beside the safetensors was executed"


def test_remote_code_is_refused_by_default(tiny_dirs, tmp_path):
    """A config that asks for the repository's own Python (auto_map) is not imported."""
    remote = tmp_path / "remote"
    shutil.copytree(tiny_dirs["good"], remote)
    marker = tmp_path / "pwned"
    (remote / "evil_model.py").write_text(f"from pathlib import Path\nPath({str(marker)!r}).touch()\n")
    cfg = json.loads((remote / "config.json").read_text())
    cfg["model_type"] = "flywheel_untrusted"  # unknown to transformers: only remote code could load it
    cfg["auto_map"] = {"AutoConfig": "evil_model.EvilConfig",
                       "AutoModelForSequenceClassification": "evil_model.EvilModel"}
    (remote / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelError, match="trust_remote_code|flywheel_untrusted"):
        load_base(str(remote), device=pick_device("cpu"))
    assert not marker.exists(), "the repository's Python was imported without trust_remote_code"


def _adapter_dir(root: Path, marker: Path) -> Path:
    d = root / "adapter"
    d.mkdir()
    (d / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "SEQ_CLS", "r": 8, "lora_alpha": 16,
        "target_modules": ["query", "value"], "base_model_name_or_path": "minilm"}))
    (d / "flywheel_model.json").write_text(json.dumps({"base_model": "minilm"}))
    _write_trap(d / "adapter_model.bin", marker)
    return d


def test_adapter_with_only_pickle_weights_is_refused(tiny_dirs, tmp_path):
    marker = tmp_path / "pwned"
    adapter = _adapter_dir(tmp_path, marker)
    with pytest.raises(ModelError, match=r"pickle weights \(\.bin/\.pt\)"):
        check_adapter_dir(adapter)
    model, _tok = load_base(str(tiny_dirs["good"]), device=pick_device("cpu"))
    with pytest.raises(ModelError, match="pickle"):
        load_adapter(model, adapter)
    assert not marker.exists(), "the adapter's pickle was executed"


def test_adapter_pt_file_is_refused_too(tmp_path):
    marker = tmp_path / "pwned"
    adapter = _adapter_dir(tmp_path, marker)
    (adapter / "adapter_model.bin").rename(adapter / "adapter_model.pt")
    with pytest.raises(ModelError, match="pickle"):
        check_adapter_dir(adapter)
    assert not marker.exists()
