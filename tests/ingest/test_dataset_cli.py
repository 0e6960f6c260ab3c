"""`flywheel dataset build` starts Ray only where it needs it: the in-process engine builds without
one, and a lake with no telemetry is named before Ray starts (~4 s on a laptop).  Run with
``RAY_ADDRESS`` pointing where no Ray listens, so that any start of Ray fails the command (with one
line naming the variable: Ray itself would retry it for minutes)."""

from __future__ import annotations

import os
import subprocess
import sys

from ingest_plantgen import Incident, day_start, stream, write_lake

from flywheel.base.broker import free_port


def _build(workdir, *overrides) -> subprocess.CompletedProcess:
    env = {**os.environ, "RAY_ADDRESS": f"127.0.0.1:{free_port()}"}    # nothing listens there
    return subprocess.run([sys.executable, "-m", "flywheel.cli", "dataset", "build", "--workdir", str(workdir),
                           "--no-mlflow", *overrides], capture_output=True, text=True, env=env, timeout=300)


def test_no_ray_for_an_empty_lake_nor_for_the_in_process_engine(tmp_path):
    empty = _build(tmp_path)                                         # the default engine, Ray Data
    assert empty.returncode == 1, empty.stdout + empty.stderr
    assert empty.stderr.strip().splitlines() == [
        f"flywheel dataset: the lake {tmp_path / 'lake'} holds no telemetry yet (expected "
        f"{tmp_path / 'lake' / 'raw' / 'telemetry'}/date=YYYY-MM-DD/*.parquet); run `flywheel ingest` while the "
        "plant publishes"]
    t0 = day_start()
    write_lake(str(tmp_path / "lake"), stream([("l1", "p1", "pump")], t0, 30 * 3600,
                                              incidents=[Incident("p1", t0 + 5 * 3600 + 30, "failure", "BRG")]))
    built = _build(tmp_path, "dataset.engine=local")
    assert built.returncode == 0, built.stdout + built.stderr
    dataset_id = built.stdout.split()[1]
    assert dataset_id.startswith("ds-") and (tmp_path / "lake" / "datasets" / dataset_id / "manifest.json").is_file()
    # Ray Data needs Ray: ray.init would join $RAY_ADDRESS and retry it for minutes; it is named at once
    with_ray = _build(tmp_path, "dataset.engine=ray")
    err = with_ray.stderr.strip().splitlines()
    assert with_ray.returncode == 1 and len(err) == 1, with_ray.stdout + with_ray.stderr
    assert err[0].startswith("flywheel dataset: cannot join the Ray cluster at 127.0.0.1:") and \
        err[0].endswith("It comes from the environment variable RAY_ADDRESS, which Ray joins when no --ray-address "
                        "is given: unset it to start a local Ray, or point it at a running cluster"), err
