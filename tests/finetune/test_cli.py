"""`flywheel train` end to end: dataset id -> registered version, with key=value overrides."""

from __future__ import annotations

import pandas as pd


def test_flywheel_train_resolves_the_dataset_id_and_registers(snapshot_dir, tmp_path, capsys):
    from finetune.registry import get_version
    from finetune.synthetic import write_snapshot
    from flywheel.cli import main

    workdir = tmp_path / "wd"
    rows = pd.read_parquet(f"{snapshot_dir}/train.parquet").to_dict("records")[:48]
    evals = pd.read_parquet(f"{snapshot_dir}/eval.parquet").to_dict("records")[:24]
    write_snapshot(workdir / "lake" / "datasets" / "ds-cli", train_rows=rows, eval_rows=evals)
    rc = main(["train", "--workdir", str(workdir), "--dataset", "ds-cli", "--seed", "3", "--no-progress",
               "--campaign", "cli", "--turn", "7", "max_steps=2", "batch_size=8", "lora.rank=4"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "fine-tune turn: version 1" in out and "gate:" in out
    info = get_version(f"sqlite:///{workdir / 'mlflow.db'}", "fault-detector", "challenger")
    assert info.tags["flywheel.turn"] == "7" and info.tags["flywheel.campaign"] == "cli"
    from mlflow import MlflowClient

    params = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}").get_run(info.run_id).data.params
    assert params["train.seed"] == "3" and params["train.lora.rank"] == "4" and params["train.max_steps"] == "2"
    assert params["train.checkpoint_dir"] == str(workdir.resolve() / "checkpoints")
