"""Bad inputs give clear errors that name the problem and the fix."""

from __future__ import annotations

import json
import shutil

import pandas as pd
import pytest

from finetune.data import DataError, load_snapshot
from finetune.model import ModelError, check_adapter_dir, load_base, resolve_base_model
from finetune.synthetic import make_rows, write_snapshot

pytestmark = pytest.mark.serial   # fine-tunes in this process: busy cores


def test_empty_training_split(tmp_path):
    snap = write_snapshot(tmp_path / "empty", train_rows=[], eval_rows=make_rows(10, 1))
    with pytest.raises(DataError, match="empty training split"):
        load_snapshot(snap)


def test_single_label_training_split(tmp_path):
    rows = [r for r in make_rows(60, 2) if r["label"] == "ok"]
    snap = write_snapshot(tmp_path / "single", train_rows=rows, eval_rows=rows[:5])
    with pytest.raises(DataError, match=r"only label \['ok'\].*at least two labels"):
        load_snapshot(snap)


def test_label_set_that_does_not_match_the_contract(tmp_path):
    rows = make_rows(30, 3)
    rows[4]["label"] = "MELTDOWN"
    snap = write_snapshot(tmp_path / "labels", train_rows=rows, eval_rows=make_rows(10, 4))
    with pytest.raises(DataError, match=r"\['MELTDOWN'\].*contract's label set"):
        load_snapshot(snap)


def test_missing_snapshot_and_missing_columns(tmp_path):
    with pytest.raises(DataError, match="not a directory"):
        load_snapshot(tmp_path / "nope")
    snap = write_snapshot(tmp_path / "cols", n_train=20, n_eval=5)
    pd.DataFrame({"text": ["a"]}).to_parquet(snap / "train.parquet")
    with pytest.raises(DataError, match=r"lacks column\(s\) \['label'\]"):
        load_snapshot(snap)


def test_rows_without_readings_are_dropped_not_fatal(tmp_path):
    rows = make_rows(40, 5)
    rows[0]["readings"] = None
    snap = load_snapshot(write_snapshot(tmp_path / "nulls", train_rows=rows, eval_rows=make_rows(5, 6)))
    assert len(snap.train) == 39


def test_readings_that_are_not_json_name_the_row_and_the_fix(tmp_path):
    rows = make_rows(40, 5)
    rows[3]["readings"] = "[{'vib': 1.0}"
    snap = write_snapshot(tmp_path / "badjson", train_rows=rows, eval_rows=make_rows(5, 6))
    with pytest.raises(DataError, match=r"row 3: readings .* not a JSON list of readings.*flywheel dataset build"):
        load_snapshot(snap)


def test_snapshot_is_featurised_with_the_named_featuriser_and_unknown_ones_are_refused(tmp_path):
    from finetune import TrainConfig
    from flywheel.base.config import ConfigError
    from flywheel.base.features import FeaturiserError, parse_readings, render

    snap = write_snapshot(tmp_path / "feat", n_train=20, n_eval=5)
    loaded = load_snapshot(snap, "text-summary/1")
    row = loaded.train.iloc[0]
    assert row["text"] == render(row["kind"], parse_readings(row["readings"]))
    # featurised once per featuriser: a split read_split made is passed through for the same one
    from finetune.data import read_split

    assert loaded.train.attrs["featuriser"] == "text-summary/1"
    marked = loaded.train.copy()
    marked.loc[0, "text"] = "pump. already featurised."
    assert read_split(marked, "train", "text-summary/1").loc[0, "text"] == "pump. already featurised."
    with pytest.raises(FeaturiserError, match=r"'numeric-stats/3' is not known.*"
                                              r"known: numeric-stats/1, text-summary/1"):
        load_snapshot(snap, "numeric-stats/3")
    with pytest.raises(ConfigError, match=r"featuriser: .*'numeric-stats/3' is not known"):
        TrainConfig(featuriser="numeric-stats/3")


def test_unknown_base_model():
    with pytest.raises(ModelError, match="unknown base model"):
        resolve_base_model("./no/such/model/dir")
    with pytest.raises(ModelError, match="cannot load base model 'nobody/no-such-model'"):
        load_base("nobody/no-such-model")


def test_unknown_config_key_names_the_key():
    from finetune import TrainConfig
    from flywheel.base.config import ConfigError, load

    with pytest.raises(ConfigError, match="unknown config key 'lora.rnk'.*did you mean 'rank'"):
        load(TrainConfig, None, ["lora.rnk=4"])
    with pytest.raises(ModelError, match="lora.rank should be positive, got 0"):
        load(TrainConfig, None, ["lora.rank=0"])
    with pytest.raises(ModelError, match=r"lora.top_layers should be 0 \(all layers\) or a positive count, got -1"):
        load(TrainConfig, None, ["lora.top_layers=-1"])
    cfg = load(TrainConfig, None, ["lora.rank=4", "epochs=2", "lora.target_modules=query,key"])
    assert cfg.lora.rank == 4 and cfg.epochs == 2 and cfg.lora.target_modules == ["query", "key"]


@pytest.fixture
def adapter_copy(registry, tmp_path):
    _, outcome = registry
    d = tmp_path / "adapter"
    shutil.copytree(outcome.adapter_dir, d)
    return d


def test_corrupt_adapter_file(adapter_copy, tmp_path):
    from finetune.evaluate import evaluate_adapter

    (adapter_copy / "adapter_model.safetensors").write_bytes(b"\x00garbage" * 100)
    with pytest.raises(ModelError, match="cannot be loaded"):
        evaluate_adapter(adapter_copy, pd.DataFrame(make_rows(3, 7)))


def test_an_adapter_record_that_is_not_text_is_named(adapter_copy):
    from finetune.families import check_model_dir

    record = adapter_copy / "flywheel_model.json"
    record.write_bytes(b"\xff\xfe not text at all")
    for check in (check_adapter_dir, check_model_dir):
        with pytest.raises(ModelError, match=f"{record} is not valid JSON"):
            check(adapter_copy)


def test_pickle_only_adapter_is_refused(adapter_copy):
    (adapter_copy / "adapter_model.safetensors").rename(adapter_copy / "adapter_model.bin")
    with pytest.raises(ModelError, match="pickle weights"):
        check_adapter_dir(adapter_copy)


def test_adapter_with_other_labels_is_refused(adapter_copy):
    meta = json.loads((adapter_copy / "flywheel_model.json").read_text())
    meta["labels"] = ["ok", "broken"]
    (adapter_copy / "flywheel_model.json").write_text(json.dumps(meta))
    with pytest.raises(ModelError, match="trained on labels"):
        check_adapter_dir(adapter_copy)


def test_trained_adapter_records_its_input_pipeline_and_an_unknown_featuriser_is_refused(adapter_copy):
    from finetune.model import adapter_featuriser, adapter_window
    from flywheel.base.features import WindowConfig

    meta = json.loads((adapter_copy / "flywheel_model.json").read_text())
    assert meta["featuriser"] == {"name": "text-summary", "version": 1, "params": {}}
    assert adapter_featuriser(meta).ref == "text-summary/1"
    assert adapter_window(meta) == WindowConfig(length=6, stride_s=600.0, horizon_s=3600.0)   # the snapshot's
    meta["featuriser"] = {"name": "spectral-bands", "version": 2, "params": {}}
    (adapter_copy / "flywheel_model.json").write_text(json.dumps(meta))
    with pytest.raises(ModelError, match=r"featuriser 'spectral-bands/2' is not known.*"
                                         r"known: numeric-stats/1, text-summary/1"):
        check_adapter_dir(adapter_copy)
    meta["featuriser"] = {"name": "numeric-stats", "version": 1, "params": {}}   # a tree model's featuriser
    (adapter_copy / "flywheel_model.json").write_text(json.dumps(meta))
    with pytest.raises(ModelError, match=r"records featuriser numeric-stats/1, which makes numeric input; a "
                                         r"language-model adapter reads text"):
        check_adapter_dir(adapter_copy)


def test_cli_errors_are_clear(tmp_path, capsys):
    from flywheel.cli import main

    # Both are the user's to fix on the command line: exit 2, one line on stderr.
    assert main(["train", "--workdir", str(tmp_path), "--dataset", "ds-missing"]) == 2
    assert "dataset 'ds-missing' not found" in capsys.readouterr().err
    assert main(["train", "--workdir", str(tmp_path)]) == 2
    assert "--dataset ID is required" in capsys.readouterr().err


def test_the_layer_count_is_read_as_each_architecture_names_it(tmp_path):
    """A campaign checks lora.top_layers against the base model before it starts; GPT-2's config
    calls its layer count n_layer, MiniLM's num_hidden_layers."""
    from transformers import GPT2Config

    from finetune.model import LoraSettings, base_model_layers, check_top_layers

    GPT2Config(n_layer=3, n_embd=32, n_head=2).save_pretrained(tmp_path / "gpt2")
    assert base_model_layers(str(tmp_path / "gpt2")) == 3
    assert base_model_layers("minilm") == 6
    assert check_top_layers(LoraSettings(top_layers=3), 3) == 3
    with pytest.raises(ModelError, match=r"^lora.top_layers=4 but the base model has 3 layers: use a count from 1 "
                                         r"to 3, or 0 for all$"):
        check_top_layers(LoraSettings(top_layers=4), 3)
    with pytest.raises(ModelError, match="needs a base model whose config gives its number of layers"):
        check_top_layers(LoraSettings(top_layers=1), None)


def test_training_refuses_more_layers_than_the_base_model_has_before_it_opens_a_run(snapshot_dir, tmp_path):
    """The check ran when the model was built: after the run was opened, which was left FAILED."""
    from finetune import TrainConfig, train_and_register
    from finetune.model import LoraSettings

    db = tmp_path / "mlflow.db"
    with pytest.raises(ModelError, match=r"^lora.top_layers=12 but the base model has 6 layers: use a count from "
                                         r"1 to 6, or 0 for all$"):
        train_and_register(snapshot_dir, TrainConfig(lora=LoraSettings(top_layers=12)), f"sqlite:///{db}",
                           progress=False)
    assert not db.exists()
