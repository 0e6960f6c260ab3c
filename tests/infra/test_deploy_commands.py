"""Every `flywheel ...` command in the deployment files is one the real CLI accepts.

There is no Docker engine or Kubernetes here, so the compose stack and the manifests are
checked by reading them: each command in them is parsed by ``flywheel.cli.build_parser()``
(the parser the containers run), broker URLs are parsed by ``flywheel.base.mqtt.BrokerURL`` with
the container's environment, and each ``${VAR}`` a command needs is set in that container.
A command whose stage is not registered in the CLI fails here with the stage's name.
"""

from __future__ import annotations

import contextlib
import io
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
INFRA = REPO / "infra"
COMPOSE = INFRA / "compose" / "docker-compose.yml"
K8S = INFRA / "k8s"
ACL = INFRA / "mosquitto" / "acl"

#: which broker user each component's command must log in as (infra/mosquitto/acl)
ROLE_USER = {"sim": "sim", "ingest": "ingest", "serve": "serve", "run": "campaign", "turn": "campaign"}


@dataclass
class Command:
    where: str                      # file and service/container, for messages
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)   # names set in the container (values: placeholders)
    mounts: list[str] = field(default_factory=list)     # container paths of volume mounts


def compose_interpolate(text: str, values: dict[str, str]) -> str:
    """Docker Compose's interpolation: ``$$`` is a literal ``$``; ``${VAR}``, ``${VAR:-default}``
    and ``${VAR:?error}`` come from the .env file (here: .env.example)."""
    sentinel = "\x00"
    text = text.replace("$$", sentinel)

    def sub(m: re.Match) -> str:
        name, op, arg = m.group(1), m.group(2), m.group(3)
        if values.get(name):
            return values[name]
        if op == ":-":
            return arg or ""
        return values.get(name, "")

    text = re.sub(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:-|:\?)([^}]*))?\}", sub, text)
    return text.replace(sentinel, "$")


def env_example() -> dict[str, str]:
    values = {}
    for line in (INFRA / "compose" / ".env.example").read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#") and "=" in line:
            k, v = line.split("=", 1)
            values[k.strip()] = v.strip()
    return values


def _compose_commands() -> list[Command]:
    raw = yaml.safe_load(COMPOSE.read_text())
    values = env_example()
    out = []
    for name, svc in raw["services"].items():
        cmd = svc.get("command")
        if not isinstance(cmd, list) or not cmd or cmd[0] != "flywheel":
            continue
        env = {k: compose_interpolate(str(v), values) for k, v in (svc.get("environment") or {}).items()}
        mounts = [v.split(":")[1] for v in svc.get("volumes", []) if isinstance(v, str)]
        out.append(Command(f"compose service {name!r}", [compose_interpolate(a, values) for a in cmd], env, mounts))
    return out


def _pod_specs(doc: dict):
    """(label, pod spec) for every pod template in a manifest, KubeRay's included."""
    kind, name = doc.get("kind"), doc.get("metadata", {}).get("name") or doc.get("metadata", {}).get("generateName")
    spec = doc.get("spec", {})
    if kind in ("Deployment", "StatefulSet", "Job"):
        yield f"{kind} {name}", spec["template"]["spec"]
    elif kind in ("RayCluster", "RayService"):
        cluster = spec if kind == "RayCluster" else spec["rayClusterConfig"]
        yield f"{kind} {name} head", cluster["headGroupSpec"]["template"]["spec"]
        for group in cluster.get("workerGroupSpecs", []):
            yield f"{kind} {name} group {group['groupName']}", group["template"]["spec"]


def _k8s_docs() -> list[tuple[Path, dict]]:
    return [(p, d) for p in sorted(K8S.glob("*.yaml")) for d in yaml.safe_load_all(p.read_text()) if d]


def _k8s_commands() -> list[Command]:
    out = []
    for path, doc in _k8s_docs():
        for label, pod in _pod_specs(doc):
            for c in pod.get("containers", []):
                argv = list(c.get("command") or []) + list(c.get("args") or [])
                if not argv or argv[0] != "flywheel":
                    continue
                env = {e["name"]: e.get("value", f"<{e['name']}>") for e in c.get("env", [])}
                mounts = [m["mountPath"] for m in c.get("volumeMounts", [])]
                out.append(Command(f"{path.name}: {label} container {c['name']!r}", argv, env, mounts))
        if doc.get("kind") == "RayJob":
            runtime_env = yaml.safe_load(doc["spec"].get("runtimeEnvYAML") or "{}") or {}
            env = {k: str(v) for k, v in (runtime_env.get("env_vars") or {}).items()}
            argv = [re.sub(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)\}?", lambda m: env.get(m.group(1), m.group(0)), a)
                    for a in shlex.split(doc["spec"]["entrypoint"])]
            name = doc["metadata"].get("name") or doc["metadata"].get("generateName")
            out.append(Command(f"{path.name}: RayJob {name} entrypoint", argv, env, ["/data", "/certs"]))
    return out


COMMANDS = _compose_commands() + _k8s_commands()


def _parse(argv: list[str]):
    from flywheel.cli import build_parser

    parser = build_parser()
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            return parser.parse_args(argv), ""
        except SystemExit:
            return None, err.getvalue().strip()


def test_the_deployment_files_contain_the_stack_services():
    subcommands = {c.argv[1] for c in COMMANDS}
    assert {"sim", "ingest", "serve", "dataset", "train"} <= subcommands, subcommands
    wheres = " ".join(c.where for c in COMMANDS)
    assert "compose" in wheres and ".yaml" in wheres


@pytest.mark.parametrize("cmd", COMMANDS, ids=lambda c: c.where)
def test_command_is_accepted_by_the_real_cli(cmd):
    args, error = _parse(cmd.argv[1:])
    if args is None:
        if "invalid choice" in error:
            from flywheel.cli import COMMAND_MODULES

            pytest.fail(f"`flywheel {cmd.argv[1]}` (used in {cmd.where}) is not registered in the CLI yet: "
                        f"its stage module (one of {', '.join(COMMAND_MODULES)}) has no register() for it.\n"
                        f"argparse said: {error}")
        pytest.fail(f"{cmd.where}: `{shlex.join(cmd.argv)}` is rejected by the CLI:\n{error}")
    assert callable(getattr(args, "func", None)), f"{cmd.where}: `{shlex.join(cmd.argv[:3])}` runs nothing"
    # Positional words that are not key=value overrides must be actions the stage knows
    # (argparse takes any word there; the stage would refuse it only at run time).
    import importlib

    words = [o for o in getattr(args, "overrides", None) or [] if "=" not in o]
    actions = getattr(importlib.import_module(args.func.__module__), "ACTIONS", ())
    assert words[:1] == [] or (len(words) == 1 and words[0] == args.overrides[0] and words[0] in actions), (
        f"{cmd.where}: `flywheel {cmd.argv[1]}` has no action {words[0]!r} (known: {', '.join(actions) or 'none'}); "
        "other positional arguments must be key=value overrides")


@pytest.mark.parametrize("cmd", [c for c in COMMANDS if "--broker" in c.argv], ids=lambda c: c.where)
def test_broker_url_is_tls_with_the_components_own_user_and_an_env_password(cmd, monkeypatch):
    from flywheel.base.mqtt import BrokerURL

    raw = cmd.argv[cmd.argv.index("--broker") + 1]
    m = re.search(r"://([^:@]+):([^@]*)@", raw)
    assert m, f"{cmd.where}: broker URL {raw!r} carries no user and password"
    user, password_ref = m.groups()
    want = ROLE_USER.get(cmd.argv[1])
    assert user == want, f"{cmd.where}: `flywheel {cmd.argv[1]}` must log in as {want!r} (ACL), not {user!r}"
    ref = re.fullmatch(r"\$\{([A-Z0-9_]+)\}", password_ref)
    assert ref, f"{cmd.where}: the password must be an ${{ENV}} reference, not a literal ({password_ref[:2]}...)"
    assert ref.group(1) in cmd.env, f"{cmd.where}: the command needs ${{{ref.group(1)}}} but the container " \
                                    f"does not set it (set: {sorted(cmd.env)})"
    monkeypatch.setenv(ref.group(1), "placeholder")
    url = BrokerURL.parse(raw)
    assert (url.tls, url.host, url.port) == (True, "mosquitto", 8883), f"{cmd.where}: {url}"
    assert url.password == "placeholder" and "placeholder" not in str(url)
    assert url.ca_file and any(url.ca_file.startswith(m.rstrip("/") + "/") for m in cmd.mounts), \
        f"{cmd.where}: CA file {url.ca_file} is not on a mounted volume ({cmd.mounts})"
    acl_users = set(re.findall(r"^user (\S+)$", ACL.read_text(), flags=re.M))
    assert user in acl_users


@pytest.mark.parametrize("cmd", [c for c in COMMANDS if "--mlflow-uri" in c.argv], ids=lambda c: c.where)
def test_mlflow_uri_is_the_tracking_server(cmd):
    assert cmd.argv[cmd.argv.index("--mlflow-uri") + 1] == "http://mlflow:5000", cmd.where


@pytest.mark.parametrize("cmd", [c for c in COMMANDS if "--workdir" in c.argv], ids=lambda c: c.where)
def test_workdir_is_the_shared_data_volume(cmd):
    assert cmd.argv[cmd.argv.index("--workdir") + 1] == "/data", cmd.where
    assert "/data" in cmd.mounts, f"{cmd.where}: --workdir /data but no volume is mounted there"


def test_ray_client_addresses_point_at_the_head():
    compose = yaml.safe_load(COMPOSE.read_text())
    head = compose["services"]["ray-head"]["command"]
    port = next(a.split("=")[1] for a in head if a.startswith("--ray-client-server-port="))
    for cmd in COMMANDS:
        if "--ray-address" not in cmd.argv:
            continue
        addr = cmd.argv[cmd.argv.index("--ray-address") + 1]
        if cmd.where.startswith("compose"):
            assert addr == f"ray://ray-head:{port}", cmd.where
        elif "RayJob" in cmd.where:
            assert addr == "auto", f"{cmd.where}: a RayJob runs on the head: --ray-address auto"
        else:
            assert addr == "ray://flywheel-head-svc:10001", cmd.where
        assert cmd.env.get("RAY_AUTH_MODE", "token") == "token", cmd.where


def test_rayservice_import_path_resolves():
    """The RayService deploys ``import_path`` from serveConfigV2; it must exist in the image's code."""
    import importlib

    docs = [d for _p, d in _k8s_docs() if d.get("kind") == "RayService"]
    assert docs, "infra/k8s has no RayService"
    for doc in docs:
        cfg = yaml.safe_load(doc["spec"]["serveConfigV2"])
        for app in cfg["applications"]:
            module_name, attr = app["import_path"].split(":")
            module = importlib.import_module(module_name)
            assert hasattr(module, attr), (
                f"RayService app {app['name']!r} imports {app['import_path']!r}, but {module_name} has no "
                f"{attr!r}: Ray Serve needs an application builder there, e.g. "
                f"`def {attr}(args: dict) -> Application` binding FaultDetector from the args "
                f"{sorted(app.get('args', {}))}")
            assert callable(getattr(module, attr))
