"""The compose stack, the Kubernetes manifests, the Dockerfile and infra/README.md agree.

Read-only checks (no Docker or Kubernetes here): the files parse, images are pinned, ports,
secrets, volumes and config paths line up between the broker config, compose and k8s, and
every service the README names exists (and the other way round).
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
INFRA = REPO / "infra"
COMPOSE = INFRA / "compose" / "docker-compose.yml"
K8S = INFRA / "k8s"
CONF = INFRA / "mosquitto" / "mosquitto.conf"
NOT_IN_KUSTOMIZATION = {"secrets.example.yaml", "rayjob-train.yaml"}  # made by hand / created per run


def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def k8s_docs(include_examples: bool = True) -> list[dict]:
    return [d for p in sorted(K8S.glob("*.yaml")) if include_examples or p.name not in NOT_IN_KUSTOMIZATION
            for d in yaml.safe_load_all(p.read_text()) if d]


def k8s_mlflow_container() -> dict:
    """The container of the MLflow tracking server's Deployment."""
    dep = next(d for d in k8s_docs() if d["kind"] == "Deployment" and d["metadata"]["name"] == "mlflow")
    return dep["spec"]["template"]["spec"]["containers"][0]


def k8s_names() -> set[tuple[str, str]]:
    return {(d["kind"], d["metadata"].get("name") or d["metadata"]["generateName"]) for d in k8s_docs()}


def containers(doc: dict):
    """Every container of a manifest (pod templates of workloads and KubeRay objects)."""
    spec = doc.get("spec", {})
    pods = []
    if doc["kind"] in ("Deployment", "StatefulSet", "Job"):
        pods.append(spec["template"]["spec"])
    elif doc["kind"] in ("RayCluster", "RayService"):
        cluster = spec if doc["kind"] == "RayCluster" else spec["rayClusterConfig"]
        pods.append(cluster["headGroupSpec"]["template"]["spec"])
        pods += [g["template"]["spec"] for g in cluster.get("workerGroupSpecs", [])]
    elif doc["kind"] == "RayJob":
        pods.append(spec["submitterPodTemplate"]["spec"])
    for pod in pods:
        for c in pod.get("containers", []):
            yield pod, c


def version() -> str:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]


def test_every_yaml_file_parses():
    files = sorted(INFRA.rglob("*.yaml")) + sorted(INFRA.rglob("*.yml"))
    assert len(files) >= 10, files
    for f in files:
        docs = [d for d in yaml.safe_load_all(f.read_text()) if d is not None]
        assert docs and all(isinstance(d, dict) for d in docs), f"{f} holds no mapping documents"
    for d in k8s_docs():
        assert {"apiVersion", "kind", "metadata"} <= set(d), d.get("metadata")


def test_kustomization_lists_every_manifest_and_the_broker_config():
    kust = yaml.safe_load((INFRA / "kustomization.yaml").read_text())
    listed = set(kust["resources"])
    for r in listed:
        assert (INFRA / r).is_file(), f"kustomization lists {r}, which does not exist"
    expected = {f"k8s/{p.name}" for p in K8S.glob("*.yaml") if p.name not in NOT_IN_KUSTOMIZATION}
    assert listed == expected, f"not listed: {expected - listed}; listed but unexpected: {listed - expected}"
    gen = {g["name"]: g["files"] for g in kust["configMapGenerator"]}
    assert gen["mosquitto-config"] == ["mosquitto/mosquitto.conf", "mosquitto/acl"]
    # the broker mounts that ConfigMap where mosquitto.conf expects its ACL
    sts = next(d for d in k8s_docs() if d["kind"] == "StatefulSet" and d["metadata"]["name"] == "mosquitto")
    vols = {v["name"]: v for v in sts["spec"]["template"]["spec"]["volumes"]}
    assert vols["config"]["configMap"]["name"] == "mosquitto-config"
    images = {i["name"]: i["newTag"] for i in kust["images"]}
    assert images == {"flywheel-stack": version(), "flywheel-stack-cuda": version()}


def test_images_are_pinned_and_the_stack_image_matches_the_version():
    images = [s.get("image") for s in compose()["services"].values()]
    images += [c["image"] for d in k8s_docs() for _pod, c in containers(d)]
    defaults = {re.sub(r"\$\{[A-Z_]+:-([^}]+)\}", r"\1", i) for i in images if i}
    for image in defaults:
        name, _, tag = image.rpartition(":")
        assert name and tag and tag != "latest", f"image {image!r} is not pinned to a tag"
        if name.startswith("flywheel-stack"):
            assert tag == version(), f"{image}: the stack image tag should be the package version {version()}"
    assert {"flywheel-stack:" + version(), "flywheel-stack-cuda:" + version()} <= defaults


def test_every_secret_reference_exists_with_its_key():
    secrets = {d["metadata"]["name"]: set(d["stringData"]) for d in k8s_docs() if d["kind"] == "Secret"}
    refs = []
    for d in k8s_docs():
        for pod, c in containers(d):
            for e in c.get("env", []):
                ref = e.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    refs.append((ref["name"], ref["key"]))
            for v in pod.get("volumes", []):
                if "secret" in v:
                    keys = [i["key"] for i in v["secret"].get("items", [])]
                    refs += [(v["secret"]["secretName"], k) for k in keys] or [(v["secret"]["secretName"], None)]
    assert refs
    for name, key in refs:
        assert name in secrets, f"Secret {name!r} is used but not described in k8s/secrets.example.yaml"
        assert key is None or key in secrets[name], f"Secret {name!r} has no key {key!r}"
    # the MQTT secret has one password per user of the ACL that a k8s workload logs in as
    assert {"sim", "ingest", "serve", "operator"} <= secrets["flywheel-mqtt"]


def test_every_pvc_claim_exists():
    claims = {d["metadata"]["name"] for d in k8s_docs() if d["kind"] == "PersistentVolumeClaim"}
    for d in k8s_docs():
        for pod, _c in containers(d):
            for v in pod.get("volumes", []):
                if "persistentVolumeClaim" in v:
                    assert v["persistentVolumeClaim"]["claimName"] in claims


def test_compose_variables_are_in_env_example():
    # comments mention ${VAR} to explain the escaping; only YAML content counts
    text = "\n".join(re.sub(r"(^|\s)#.*$", "", ln) for ln in COMPOSE.read_text().splitlines()).replace("$$", "")
    used = set(re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::[-?][^}]*)?\}", text))
    with_default = set(re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*):-", text))
    example = (INFRA / "compose" / ".env.example").read_text()
    documented = set(re.findall(r"^#?\s*([A-Z_][A-Z0-9_]*)=", example, flags=re.M))
    missing = used - documented - with_default
    assert not missing, f"compose uses {sorted(missing)} but infra/compose/.env.example does not mention them"
    assert "DATASET_ID" in with_default  # per-run variable with a default, not a secret


def test_broker_ports_agree():
    conf = CONF.read_text()
    listeners = re.findall(r"^listener (\d+)(?: (\S+))?$", conf, flags=re.M)
    assert listeners == [("1883", "127.0.0.1"), ("8883", "")], listeners
    assert compose()["services"]["mosquitto"]["ports"] == ["8883:8883"]
    svc = next(d for d in k8s_docs() if d["kind"] == "Service" and d["metadata"]["name"] == "mosquitto")
    assert [p["port"] for p in svc["spec"]["ports"]] == [8883]


def _mount_points_compose(service: str) -> list[str]:
    return [v.split(":")[1] for v in compose()["services"][service]["volumes"]]


def test_broker_config_paths_are_mounted_in_compose_and_k8s():
    paths = re.findall(r"^(?:password_file|acl_file|cafile|certfile|keyfile|persistence_location) (\S+)$",
                       CONF.read_text(), flags=re.M)
    assert len(paths) == 6, paths
    sts = next(d for d in k8s_docs() if d["kind"] == "StatefulSet" and d["metadata"]["name"] == "mosquitto")
    k8s_mounts = [m["mountPath"] for m in sts["spec"]["template"]["spec"]["containers"][0]["volumeMounts"]]
    for mounts, where in ((_mount_points_compose("mosquitto"), "compose"), (k8s_mounts, "k8s")):
        for p in paths:
            assert any(p == m or p.startswith(m.rstrip("/") + "/") for m in mounts), \
                f"{where}: the broker reads {p} but nothing is mounted there ({mounts})"
    # in compose the config files are the repository's own
    sources = [v.split(":")[0] for v in compose()["services"]["mosquitto"]["volumes"]]
    assert "../mosquitto/mosquitto.conf" in sources and "../mosquitto/acl" in sources


def test_mlflow_port_agrees_everywhere():
    cmd = compose()["services"]["mlflow"]["command"]
    port = cmd[cmd.index("--port") + 1]
    assert compose()["services"]["mlflow"]["ports"] == [f"127.0.0.1:{port}:{port}"]
    svc = next(d for d in k8s_docs() if d["kind"] == "Service" and d["metadata"]["name"] == "mlflow")
    assert svc["spec"]["ports"][0]["port"] == int(port)
    kcmd = k8s_mlflow_container()["command"]
    assert kcmd[kcmd.index("--port") + 1] == port
    for c in (cmd, kcmd):
        assert "--serve-artifacts" in c and c[c.index("--artifacts-destination") + 1] == "s3://mlflow-artifacts"
        assert "mlflow:5000" in c[c.index("--allowed-hosts") + 1].split(",")
    bucket_cmd = compose()["services"]["buckets"]["command"]
    assert "mlflow-artifacts" in bucket_cmd


def test_mlflow_database_password_is_never_on_a_command_line():
    env = compose()["services"]["mlflow"]["environment"]
    assert env["MLFLOW_BACKEND_STORE_URI"].startswith("postgresql://mlflow:${POSTGRES_PASSWORD}@postgres:5432/")
    kenv = [e["name"] for e in k8s_mlflow_container()["env"]]
    # k8s expands $(POSTGRES_PASSWORD) only if it is defined earlier in the list
    assert kenv.index("POSTGRES_PASSWORD") < kenv.index("MLFLOW_BACKEND_STORE_URI")
    for d in k8s_docs():
        for _pod, c in containers(d):
            assert "POSTGRES_PASSWORD" not in " ".join(c.get("command", []) + c.get("args", []))


def test_the_mlflow_server_runs_without_mlflows_job_runner():
    """As the tests start it (test_mlflow_server.py checks that no job runner then starts)."""
    assert compose()["services"]["mlflow"]["environment"]["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] == "false"
    kenv = {e["name"]: e.get("value") for e in k8s_mlflow_container()["env"]}
    assert kenv["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] == "false"


def test_every_ray_node_and_client_carries_the_auth_token():
    services = compose()["services"]
    for name in ("ray-head", "ray-worker", "ray-gpu-worker", "ingest", "serve", "dataset", "train"):
        env = services[name]["environment"]
        assert env.get("RAY_AUTH_MODE") == "token" and env.get("RAY_AUTH_TOKEN"), name
    for d in k8s_docs():
        if d["kind"] in ("RayCluster", "RayService", "RayJob"):
            for _pod, c in containers(d):
                names = {e["name"] for e in c.get("env", [])}
                assert {"RAY_AUTH_MODE", "RAY_AUTH_TOKEN"} <= names, (d["metadata"], c["name"])


def test_gpu_workers_ask_for_gpus():
    gpu = compose()["services"]["ray-gpu-worker"]
    assert gpu["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
    rc = next(d for d in k8s_docs() if d["kind"] == "RayCluster")
    group = next(g for g in rc["spec"]["workerGroupSpecs"] if g["groupName"] == "gpu")
    c = group["template"]["spec"]["containers"][0]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1 and "cuda" in c["image"]
    assert rc["spec"]["enableInTreeAutoscaling"] is True and group["minReplicas"] == 0


def test_dockerfile_copies_every_package_and_the_ignore_file_lets_them_in():
    dockerfile = (INFRA / "docker" / "Dockerfile").read_text()
    ignore = (INFRA / "docker" / "Dockerfile.dockerignore").read_text().splitlines()
    copies = re.findall(r"^COPY (\S+)(?: \S+)+$", dockerfile, flags=re.M)
    packages = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]["include"]
    for pkg in packages:
        name = pkg.rstrip("*")
        assert name in copies, f"the Dockerfile does not copy package {name}/"
    for src in copies:
        for part in src.split():
            assert (REPO / part).exists(), f"Dockerfile copies {part}, which does not exist"
            assert f"!{part}" in ignore or f"!{part}/**" in ignore, \
                f"{part} is excluded by Dockerfile.dockerignore, so COPY would fail"
    assert "USER flywheel" in dockerfile and "psycopg" in dockerfile and "boto3" in dockerfile


def _readme_table() -> list[tuple[str, str]]:
    text = (INFRA / "README.md").read_text()
    section = text.split("## Services and objects", 1)[1]
    rows = []
    for line in section.splitlines():
        m = re.match(r"^\| `([^`]+)` \| (\w+) `([^`]+)` \|", line)
        if m:
            rows.append((m.group(1), f"{m.group(2)} {m.group(3)}"))
    return rows


def test_readme_names_every_service_and_each_one_exists():
    rows = _readme_table()
    assert len(rows) >= 10
    services = set(compose()["services"])
    objects = {f"{k} {n}" for k, n in k8s_names()}
    for svc, obj in rows:
        assert svc in services, f"infra/README.md names compose service {svc!r}, which does not exist"
        assert obj in objects, f"infra/README.md names {obj!r}, which infra/k8s does not define"
    assert services == {s for s, _o in rows}, f"compose services missing from the README: " \
                                              f"{services - {s for s, _o in rows}}"
    workloads = {o for o in objects if o.split()[0] in ("Deployment", "StatefulSet", "RayCluster",
                                                          "RayService", "RayJob", "Job")}
    assert workloads <= {o for _s, o in rows}, f"k8s workloads missing from the README: {workloads - {o for _s, o in rows}}"


@pytest.mark.parametrize("path", ["infra/README.md", "infra/compose/docker-compose.yml"])
def test_docs_reference_files_that_exist(path):
    text = (REPO / path).read_text()
    for ref in set(re.findall(r"(?<![\w/])infra/[\w./-]+\.(?:py|sh|yml|yaml|conf|md|example)|infra/docker/Dockerfile", text)):
        assert (REPO / ref).exists(), f"{path} mentions {ref}, which does not exist"
