"""`flywheel train` end to end: dataset id -> registered version, with train.key=value overrides (and the
bare alias); `flywheel train rollback` as a sub-command."""

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
    # section.key=value, the bare alias of train's own section, and a flag after the overrides
    rc = main(["train", "--workdir", str(workdir), "--dataset", "ds-cli", "--no-progress",
               "--campaign", "cli", "--turn", "7", "train.max_steps=2", "batch_size=8", "train.lora.rank=4",
               "--seed", "3"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "fine-tune turn: version 1" in out and "gate:" in out
    uri = f"sqlite:///{workdir.resolve() / 'mlflow.db'}"
    info = get_version(uri, "fault-detector", "challenger")
    assert info.tags["flywheel.turn"] == "7" and info.tags["flywheel.campaign"] == "cli"
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    params = client.get_run(info.run_id).data.params
    assert params["train.seed"] == "3" and params["train.lora.rank"] == "4" and params["train.max_steps"] == "2"
    assert params["train.batch_size"] == "8"
    assert params["train.checkpoint_dir"] == str(workdir.resolve() / "checkpoints")

    # `flywheel train rollback` is a sub-command on the same registry (the workdir's MLflow by default)
    from finetune.registry import set_alias

    set_alias(uri, "fault-detector", "champion", "1")
    v2 = client.create_model_version("fault-detector", source=client.get_model_version("fault-detector", "1").source,
                                     run_id=info.run_id)
    set_alias(uri, "fault-detector", "champion", v2.version)
    assert main(["train", "rollback", "--workdir", str(workdir)]) == 0
    assert "version 1" in capsys.readouterr().out
    assert get_version(uri, "fault-detector", "champion").version == "1"
    # options may also come before the action's name; nothing older is one line on stderr, exit 1
    assert main(["train", "--workdir", str(workdir), "rollback"]) == 1
    err = capsys.readouterr().err
    assert "cannot roll back" in err and len(err.strip().splitlines()) == 1
