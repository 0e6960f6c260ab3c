"""Undoing a dead turn attempt in the registry, and a version's operating point as a tag."""

from __future__ import annotations

from finetune.registry import (ABORTED_TAG, THRESHOLD_TAG, abandon_run, alias_history, aliases, get_version,
                               register_version, set_alias, version_threshold)


def _version(uri, run_id, tags=None):
    return register_version(uri, "fd", run_id, "model", tags or {}).version


def test_abandon_run_restores_aliases_and_tags_the_versions(mlflow_uri):
    from mlflow import MlflowClient

    client = MlflowClient(mlflow_uri)
    exp = client.create_experiment("x")
    good, dead, other = (client.create_run(exp).info.run_id for _ in range(3))
    v1 = _version(mlflow_uri, good, {THRESHOLD_TAG: repr(0.8125)})
    set_alias(mlflow_uri, "fd", "champion", v1)
    set_alias(mlflow_uri, "fd", "challenger", v1)
    assert version_threshold(mlflow_uri, "fd", v1) == 0.8125
    before = aliases(mlflow_uri, "fd")
    # the dead attempt registered a version, promoted it, and died
    v2 = _version(mlflow_uri, dead)
    set_alias(mlflow_uri, "fd", "challenger", v2)
    set_alias(mlflow_uri, "fd", "champion", v2)
    client.set_registered_model_alias("fd", "staging", v2)
    v3 = _version(mlflow_uri, other)
    assert abandon_run(mlflow_uri, "fd", dead, restore=before, note="turn 1 attempt 1") == [v2]
    assert aliases(mlflow_uri, "fd") == {"champion": v1, "challenger": v1}
    assert alias_history(mlflow_uri, "fd", "champion") == [v1]
    assert get_version(mlflow_uri, "fd", v2).tags[ABORTED_TAG] == "turn 1 attempt 1"
    assert ABORTED_TAG not in get_version(mlflow_uri, "fd", v3).tags
    assert version_threshold(mlflow_uri, "fd", v2) is None
    # idempotent
    assert abandon_run(mlflow_uri, "fd", dead, restore=before) == [v2]
    assert aliases(mlflow_uri, "fd") == {"champion": v1, "challenger": v1}


def test_abandon_run_before_any_champion_removes_the_alias(mlflow_uri):
    from mlflow import MlflowClient

    client = MlflowClient(mlflow_uri)
    assert abandon_run(mlflow_uri, "fd", "no-such-run", restore={}) == []   # no registered model yet
    dead = client.create_run(client.create_experiment("y")).info.run_id
    v1 = _version(mlflow_uri, dead)
    set_alias(mlflow_uri, "fd", "champion", v1)
    assert abandon_run(mlflow_uri, "fd", dead, restore={}) == [v1]
    assert aliases(mlflow_uri, "fd") == {}
    assert alias_history(mlflow_uri, "fd", "champion") == []
