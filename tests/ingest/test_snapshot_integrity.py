"""A snapshot's splits are read as they were built: the pages' CRCs and the manifest's split hashes
are checked, so a model is trained on the rows its ``content_hash`` names, or the file and the fix
are named (one line from ``flywheel train``)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from ingest_plantgen import Incident, damage_pages, day_start, stream, write_lake

from finetune.data import DataError, load_snapshot
from flywheel.base.features import WindowConfig
from flywheel.base.snapshot import REBUILD, content_hash, split_hash
from flywheel.cli import main
from ingest import BuildConfig, build_snapshot

T0 = day_start()
MACHINES = [("l1", "m1", "milling"), ("l1", "p1", "pump")]
INCIDENTS = [Incident("m1", T0 + 5 * 3600 + 17, "failure", "TWF"),
             Incident("p1", T0 + 20 * 3600 + 30, "failure", "BRG")]
CFG = BuildConfig(window=WindowConfig(length=10, stride_s=600, horizon_s=3600), eval_fraction=0.25, engine="local")


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    """A workdir whose lake holds one snapshot the builder made."""
    wd = tmp_path_factory.mktemp("snapshot-integrity")
    write_lake(str(wd / "lake"), stream(MACHINES, T0, 30 * 3600, seed=5, incidents=INCIDENTS), batch=300,
               collector="a")
    snap = build_snapshot(str(wd / "lake"), CFG, track=False)
    return Path(snap.path)


@pytest.fixture
def snapshot(built, tmp_path) -> Path:
    """A copy of the built snapshot in a workdir of its own, to change."""
    out = tmp_path / "wd" / "lake" / "datasets" / built.name
    shutil.copytree(built, out)
    return out


def test_the_builder_s_hashes_are_the_rows_read_back(snapshot):
    manifest = json.loads((snapshot / "manifest.json").read_text())
    for split, want in manifest["split_hashes"].items():
        assert split_hash(pq.read_table(snapshot / f"{split}.parquet").to_pandas(), manifest["columns"]) == want
    assert content_hash(manifest["split_hashes"]) == manifest["content_hash"]
    assert snapshot.name == f"ds-{manifest['content_hash'][:12]}"
    loaded = load_snapshot(snapshot, "numeric-stats/1")
    assert len(loaded.train) == sum(manifest["counts"]["train"].values())


def _train(snapshot: Path, capsys) -> tuple[int, list[str]]:
    rc = main(["train", "--workdir", str(snapshot.parents[2]), "--dataset", snapshot.name, "--no-progress",
               "train.family=gbdt"])
    return rc, capsys.readouterr().err.strip().splitlines()


def test_a_split_rewritten_with_other_rows_is_named_before_anything_trains_on_it(snapshot, capsys):
    """Sound Parquet with one label changed: it reads without error; the split hash tells."""
    path = snapshot / "train.parquet"
    df = pq.read_table(path).to_pandas()
    i = int((df["label"] == "ok").values.argmax())
    df.loc[i, "label"] = "TWF"
    df.to_parquet(path, index=False)
    said = (f"{snapshot}/train.parquet does not hold the rows its manifest's hash names (split_hashes.train): "
            f"it changed after snapshot {snapshot.name} was built")
    with pytest.raises(DataError) as exc:
        load_snapshot(snapshot, "numeric-stats/1")
    assert str(exc.value).startswith(said) and str(exc.value).endswith(REBUILD)
    rc, err = _train(snapshot, capsys)
    assert rc == 1 and len(err) == 1 and said in err[0], err


def test_bytes_changed_inside_a_split_s_pages_fail_its_read_with_the_fix(snapshot, capsys):
    path = snapshot / "eval.parquet"
    path.write_bytes(damage_pages(path.read_bytes(), at="middle"))
    with pytest.raises(DataError, match=f"{snapshot}/eval.parquet is not a readable parquet file: .*; {REBUILD}"):
        load_snapshot(snapshot, "numeric-stats/1")
    rc, err = _train(snapshot, capsys)
    assert rc == 1 and len(err) == 1 and f"{snapshot}/eval.parquet is not a readable parquet file" in err[0], err
