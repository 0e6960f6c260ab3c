"""Secrets stay out of logs and files: broker URLs redact passwords, ${ENV} references resolve.

The deployment files (infra/compose, infra/k8s) pass passwords as environment variables and
reference them as ``${VAR}``; these tests pin the behaviour they rely on.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import pytest

from flywheel.base.config import ConfigError, load
from flywheel.base.mqtt import BrokerURL, connect, make_client

SECRET = "s3cr3t-Pa55"


@pytest.mark.parametrize("url", [
    f"mqtt://sim:{SECRET}@broker.plant:1883",
    f"mqtts://serve:{SECRET}@broker.plant:8883?ca=/certs/ca.pem",
    f"mqtt://ingest:{SECRET}@10.0.0.5",
])
def test_password_never_appears_in_str_repr_or_redacted(url):
    parsed = BrokerURL.parse(url)
    assert parsed.password == SECRET
    for text in (parsed.redacted(), str(parsed), repr(parsed), f"{parsed}", "%s" % (parsed,)):
        assert SECRET not in text, text
    assert ":***@" in parsed.redacted()


def test_logging_a_broker_url_does_not_leak(caplog):
    parsed = BrokerURL.parse(f"mqtt://sim:{SECRET}@broker.plant:1883")
    with caplog.at_level(logging.INFO):
        logging.getLogger("flywheel.test").info("connecting to %s (%r)", parsed, parsed)
    assert SECRET not in caplog.text and "sim:***@broker.plant:1883" in caplog.text


def test_bad_url_error_does_not_echo_the_password():
    with pytest.raises(ConfigError) as exc:
        BrokerURL.parse(f"http://sim:{SECRET}@broker.plant:1883")
    assert SECRET not in str(exc.value) and "mqtt://" in str(exc.value)


def test_env_reference_in_the_password_resolves(monkeypatch):
    monkeypatch.setenv("MQTT_SERVE_PASSWORD", SECRET)
    parsed = BrokerURL.parse("mqtts://serve:${MQTT_SERVE_PASSWORD}@mosquitto:8883?ca=/certs/ca.pem")
    assert (parsed.username, parsed.password, parsed.host, parsed.port, parsed.tls) == \
        ("serve", SECRET, "mosquitto", 8883, True)
    assert parsed.ca_file == "/certs/ca.pem"
    assert SECRET not in repr(parsed)


def test_missing_env_reference_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("MQTT_NOPE_PASSWORD", raising=False)
    with pytest.raises(ConfigError, match="MQTT_NOPE_PASSWORD"):
        BrokerURL.parse("mqtt://sim:${MQTT_NOPE_PASSWORD}@mosquitto:1883")


@dataclass
class _DeployConfig:
    broker: str = "mqtt://127.0.0.1:1883"
    mlflow_uri: str = ""
    lake: str = ""


def test_config_files_resolve_env_references(tmp_path, monkeypatch):
    monkeypatch.setenv("MQTT_SIM_PASSWORD", SECRET)
    monkeypatch.setenv("PGPASSWORD_MLFLOW", "pg-pw")
    monkeypatch.delenv("LAKE_BUCKET", raising=False)
    cfg_file = tmp_path / "deploy.yaml"
    cfg_file.write_text(
        "broker: mqtt://sim:${MQTT_SIM_PASSWORD}@mosquitto:1883\n"
        "mlflow_uri: postgresql://mlflow:${PGPASSWORD_MLFLOW}@postgres:5432/mlflow\n"
        "lake: s3://${LAKE_BUCKET:-flywheel}/lake\n")
    cfg = load(_DeployConfig, cfg_file)
    assert cfg.broker == f"mqtt://sim:{SECRET}@mosquitto:1883"
    assert cfg.mlflow_uri == "postgresql://mlflow:pg-pw@postgres:5432/mlflow"
    assert cfg.lake == "s3://flywheel/lake"
    # overrides resolve too
    assert load(_DeployConfig, cfg_file, ["lake=s3://${MQTT_SIM_PASSWORD}"]).lake == f"s3://{SECRET}"
    monkeypatch.delenv("PGPASSWORD_MLFLOW")
    with pytest.raises(ConfigError, match="PGPASSWORD_MLFLOW"):
        load(_DeployConfig, cfg_file)


def test_env_password_logs_into_the_secured_broker(secured_broker, monkeypatch):
    """End to end: the URL form the deployment files use, against the production broker."""
    monkeypatch.setenv("MQTT_INGEST_PASSWORD", secured_broker.passwords["ingest"])
    url = f"mqtt://ingest:${{MQTT_INGEST_PASSWORD}}@127.0.0.1:{secured_broker.plain_port}"
    client = make_client(url, prefix="env-pw")
    connect(client, url, timeout=5)
    client.disconnect()
    client.loop_stop()


@pytest.mark.parametrize("url", ["http://alice:pa55@mlflow.internal:5000", "postgresql://mlflow:pa55@db/mlflow",
                                 "mqtts://sim:pa55@broker:8883?ca=/etc/ca.pem", "s3://key:pa55@bucket/lake"])
def test_any_url_is_redacted_before_it_reaches_a_message(url):
    from flywheel.base.mqtt import redact_url

    out = redact_url(url)
    assert "pa55" not in out and ":***@" in out
    assert redact_url("sqlite:///tmp/mlflow.db") == "sqlite:///tmp/mlflow.db"
    assert redact_url("http://[bad") == "<unparseable URL>"


def test_resolved_url_carries_the_env_password_and_round_trips(monkeypatch):
    """What a campaign hands its actors: the variable resolved once, every option kept."""
    monkeypatch.setenv("MQTT_CAMPAIGN_PASSWORD", "p@ss:w/rd%1")
    parsed = BrokerURL.parse("mqtts://campaign:${MQTT_CAMPAIGN_PASSWORD}@broker.plant:8883"
                             "?ca=/certs/ca.pem&protocol=3.1.1")
    url = parsed.resolved_url()
    assert "${" not in url and "p@ss:w/rd%1" not in url          # quoted, not raw
    monkeypatch.delenv("MQTT_CAMPAIGN_PASSWORD")
    again = BrokerURL.parse(url)                                   # no variable needed any more
    assert again == parsed and again.password == "p@ss:w/rd%1"
    assert BrokerURL.parse("mqtt://127.0.0.1:1883").resolved_url() == "mqtt://127.0.0.1:1883"


def test_mlflow_credentials_leave_the_uri_for_mlflows_own_variables(no_mlflow_credentials, monkeypatch):
    """MLflow prints its tracking URI ("View run at ..."): the credentials must not be in it."""
    import os

    from flywheel.base.tracking import plain_uri

    monkeypatch.delenv("MLFLOW_TRACKING_USERNAME", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_PASSWORD", raising=False)
    assert plain_uri(f"https://flywheel:{SECRET}@mlflow.plant:5000/prefix?x=1") == \
        "https://mlflow.plant:5000/prefix?x=1"
    assert (os.environ["MLFLOW_TRACKING_USERNAME"], os.environ["MLFLOW_TRACKING_PASSWORD"]) == ("flywheel", SECRET)
    # variables set by the deployment win over the URI; URIs without credentials pass unchanged
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "from-env")
    assert plain_uri("http://other:pw@127.0.0.1:5000") == "http://127.0.0.1:5000"
    assert os.environ["MLFLOW_TRACKING_PASSWORD"] == "from-env"
    for uri in ("sqlite:///tmp/mlflow.db", "http://127.0.0.1:5000", "databricks"):
        assert plain_uri(uri) == uri


def test_mlflow_refusals_become_one_clear_line_without_the_password():
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import PERMISSION_DENIED, RESOURCE_DOES_NOT_EXIST, UNAUTHENTICATED

    from flywheel.base.tracking import TrackingAuthError, auth_error, error_message

    uri = f"http://flywheel:{SECRET}@mlflow.plant:5000"
    denied = auth_error(MlflowException("401", error_code=UNAUTHENTICATED), uri)
    assert isinstance(denied, TrackingAuthError) and isinstance(denied, PermissionError)
    assert "UNAUTHENTICATED" in str(denied) and "flywheel:***@mlflow.plant:5000" in str(denied)
    assert "MLFLOW_TRACKING_PASSWORD" in str(denied) and SECRET not in str(denied)
    assert "no permission" in str(auth_error(MlflowException("403", error_code=PERMISSION_DENIED), uri))
    # "not found" stays "not found": only refusals are turned into credential errors
    assert auth_error(MlflowException("gone", error_code=RESOURCE_DOES_NOT_EXIST), uri) is None
    # whatever MLflow error reaches the CLI loses any password a URL in it carried
    line = error_message(MlflowException(f"API request to {uri}/api/2.0/x failed", error_code=UNAUTHENTICATED))
    assert line.startswith("MLflow error:") and SECRET not in line and "MLFLOW_TRACKING_USERNAME" in line
    assert error_message(ValueError("not MLflow's")) is None

