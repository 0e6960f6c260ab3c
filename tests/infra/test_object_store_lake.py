"""The lake on an object store: an S3 API server on loopback stands in for MinIO.

moto's server speaks the S3 REST API over HTTP on a free port, as MinIO does in the compose
stack and the cluster.  The tests pin the lake URI forms infra/README.md documents:

* ``s3://bucket/lake?endpoint_override=host:port&scheme=http`` - everything in the URI;
* ``s3://bucket/lake`` with ``AWS_ENDPOINT_URL_S3=http://host:port`` - endpoint from the
  environment (what the compose file and k8s manifests set), credentials always from
  ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY``, never in the URI.
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

BUCKET = "flywheel-lake"


@pytest.fixture(scope="module")
def s3_endpoint():
    try:
        from moto.server import ThreadedMotoServer
    except ImportError:
        pytest.fail("moto[server] is missing: the object-store lake test needs `pip install 'moto[server]'` "
                    "(an S3 API server on loopback standing in for MinIO)")
    from flywheel.base.broker import free_port

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"127.0.0.1:{port}"
    fs = pafs.S3FileSystem(endpoint_override=endpoint, scheme="http", access_key="test", secret_key="test",
                           region="us-east-1", allow_bucket_creation=True)
    fs.create_dir(BUCKET)  # the MinIO init job does this in the deployments
    yield endpoint
    server.stop()


@pytest.fixture
def s3_env(monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)


def _table() -> pa.Table:
    return pa.table({"event_id": ["a", "b"], "ts": [1.0, 2.0],
                     "readings": pa.array([[("torque_nm", 40.0)], [("torque_nm", 41.5)]],
                                          type=pa.map_(pa.string(), pa.float64()))})


def test_pyarrow_writes_and_reads_parquet_on_the_s3_endpoint(s3_endpoint):
    fs = pafs.S3FileSystem(endpoint_override=s3_endpoint, scheme="http", access_key="test",
                           secret_key="test", region="us-east-1")
    path = f"{BUCKET}/probe/raw/telemetry/date=2026-01-01/part-0.parquet"
    pq.write_table(_table(), path, filesystem=fs)
    info = fs.get_file_info(path)
    assert info.type == pafs.FileType.File and info.size > 0
    assert pq.read_table(path, filesystem=fs).equals(_table())


def test_stack_lake_on_s3_uri_with_endpoint_options(s3_endpoint, s3_env):
    from ingest.lake import Lake

    lake = Lake.open(f"s3://{BUCKET}/uri-form?endpoint_override={s3_endpoint}&scheme=http")
    assert not lake.local and lake.root == f"{BUCKET}/uri-form"
    path = lake.path("raw", "telemetry", "date=2026-01-01", "c0-1.parquet")
    lake.write_table(_table(), path)
    assert lake.exists(path)
    assert pq.read_table(path, filesystem=lake.fs).column("event_id").to_pylist() == ["a", "b"]


def test_stack_lake_on_plain_s3_uri_with_endpoint_from_environment(s3_endpoint, s3_env, monkeypatch):
    from ingest.lake import Lake

    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", f"http://{s3_endpoint}")
    lake = Lake.open(f"s3://{BUCKET}/env-form")
    path = lake.path("raw", "events", "date=2026-01-01", "c0-1.parquet")
    lake.write_table(_table(), path)
    # another client with the explicit endpoint sees the same object: it really is on the server
    fs = pafs.S3FileSystem(endpoint_override=s3_endpoint, scheme="http", access_key="test",
                           secret_key="test", region="us-east-1")
    assert pq.read_table(path, filesystem=fs).num_rows == 2



def test_a_snapshot_built_on_an_s3_lake_is_read_for_training_from_its_uri(s3_endpoint, s3_env, tmp_path):
    """One snapshot reader: the builder's snapshot on object storage is what training loads."""
    import sys
    from pathlib import Path

    from finetune import load_snapshot
    from flywheel.base.features import WindowConfig
    from ingest import BuildConfig, build_snapshot

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "ingest"))
    from ingest_plantgen import Incident, day_start, stream, write_lake

    t0 = day_start()
    uri = f"s3://{BUCKET}/snap-form?endpoint_override={s3_endpoint}&scheme=http"
    write_lake(uri, stream([("L1", "p0", "pump"), ("L1", "p1", "pump")], t0, 8 * 3600,
                           incidents=[Incident("p0", t0 + 3 * 3600, "failure", "BRG")]))
    snap = build_snapshot(uri, BuildConfig(window=WindowConfig(length=6, stride_s=300, horizon_s=1800),
                                           engine="local"))
    assert snap.path == f"s3://{BUCKET}/snap-form/datasets/{snap.dataset_id}?endpoint_override={s3_endpoint}" \
                        "&scheme=http"
    loaded = load_snapshot(snap.path)
    assert loaded.dataset_id == snap.dataset_id and loaded.content_hash == snap.manifest["content_hash"]
    assert len(loaded.train) == sum(snap.manifest["counts"]["train"].values()) > 0
    assert set(loaded.train["label"]) == {"ok", "BRG"} and loaded.train["text"].str.startswith("pump.").all()


def test_make_buckets_tool_is_idempotent(s3_endpoint, s3_env):
    """infra/minio/make_buckets.py, run by the compose stack and the k8s Job before MLflow starts."""
    import subprocess
    import sys
    from pathlib import Path

    tool = Path(__file__).resolve().parents[2] / "infra" / "minio" / "make_buckets.py"
    first = subprocess.run([sys.executable, str(tool), "--endpoint", f"http://{s3_endpoint}",
                            "mlflow-artifacts-t", "lake-t"], capture_output=True, text=True, timeout=60)
    assert first.returncode == 0, first.stderr
    assert "created ['mlflow-artifacts-t', 'lake-t']" in first.stdout
    again = subprocess.run([sys.executable, str(tool), "--endpoint", f"http://{s3_endpoint}", "lake-t"],
                           capture_output=True, text=True, timeout=60)
    assert again.returncode == 0 and "created none" in again.stdout, again.stdout + again.stderr
    fs = pafs.S3FileSystem(endpoint_override=s3_endpoint, scheme="http", access_key="test", secret_key="test",
                           region="us-east-1")
    assert fs.get_file_info("lake-t").type == pafs.FileType.Directory
    bad = subprocess.run([sys.executable, str(tool), "--endpoint", f"http://{s3_endpoint}", "Bad/Name"],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 1 and "not valid" in bad.stderr
