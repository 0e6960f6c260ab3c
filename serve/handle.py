"""Deploy the serve app on Ray and hold a handle to it: the API the flywheel loop calls.

::

    from serve import ServeConfig, start_serving
    h = start_serving("sqlite:///.flywheel/mlflow.db", "fault-detector", "champion", ServeConfig())
    h.url              # http://127.0.0.1:PORT
    h.version()        # "3"
    h.refresh()        # check the alias now, hot-swap if it moved; returns the serving version
    h.wait_for_version("4", timeout_s=60)
    h.shutdown()

``start_serving`` connects to Ray (``ray_address``, or the Ray already initialised by the
caller, or a local one), starts Ray Serve's HTTP proxy on a free port if Serve is not
running yet, deploys the app and returns once ``/health`` answers.

With ``ServeConfig(ingress="direct")`` the handle's URL is the replica's own HTTP port
(Ray Serve's direct ingress) instead of the proxy: one hop less per request.  Ray reads
that switch from the environment of its processes, so it must be set before the cluster
starts: :func:`prepare_local_ray` does it for a Ray this process is about to start, and
``start_serving`` refuses with a clear message on a cluster started without it.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from pathlib import Path

from serve.client import ServeClient, ServeHTTPError
from serve.config import ServeConfig
from serve.source import AdapterSource, ServeError

log = logging.getLogger(__name__)

# What Ray Serve's direct ingress needs in the environment Ray's processes inherit.  The
# drain period is how long a stopping replica keeps its port open so that an external load
# balancer can notice (Ray's default 30 s); nothing sits in front of a replica on a cluster
# flywheel starts itself, and in-flight requests still finish before it stops.
DIRECT_INGRESS_ENV = {"RAY_SERVE_ENABLE_DIRECT_INGRESS": "1",
                      "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "1"}


def prepare_local_ray(config: ServeConfig) -> None:
    """Call before this process starts a local Ray: sets what ``config.ingress`` needs.

    (Variables the user already set win: e.g. a longer drain period behind a load balancer.)
    """
    if config.ingress == "direct":
        for key, value in DIRECT_INGRESS_ENV.items():
            os.environ.setdefault(key, value)


def _cluster_has_direct_ingress() -> bool:
    """Whether Ray Serve on the connected cluster runs with direct ingress (asked of a worker)."""
    import ray

    @ray.remote(num_cpus=0)
    def probe() -> bool:
        from ray.serve._private import constants

        return bool(constants.RAY_SERVE_ENABLE_DIRECT_INGRESS)

    return ray.get(probe.remote(), timeout=120)


def check_ingress(config: ServeConfig) -> None:
    """Raise ServeError, naming what to do, if the connected Ray cannot serve ``config.ingress``."""
    if config.ingress == "direct" and not _cluster_has_direct_ingress():
        local = os.environ.get("RAY_SERVE_ENABLE_DIRECT_INGRESS")
        why = (f" (this environment sets RAY_SERVE_ENABLE_DIRECT_INGRESS={local!r}, which a Ray started here "
               "inherits; unset it or set it to 1)") if local not in (None, "1") else ""
        raise ServeError("serve.ingress=direct needs a Ray cluster started with RAY_SERVE_ENABLE_DIRECT_INGRESS=1 "
                         "(e.g. `RAY_SERVE_ENABLE_DIRECT_INGRESS=1 ray start --head`); this one runs without it"
                         f"{why}. Use serve.ingress=proxy here, or let flywheel start its own Ray")


def direct_ingress_url(app_name: str, prefix: str, bind_host: str, timeout_s: float = 60.0) -> str:
    """The URL of the app's replica under direct ingress (waits until the replica has bound its port).

    Ray Serve's controller lists each app's replica ports as target groups (Ray 2.60);
    there is no higher-level API for them.
    """
    import ray
    from ray.serve.context import _get_global_client

    controller = _get_global_client()._controller  # noqa: SLF001 - see docstring
    deadline = time.monotonic() + timeout_s
    while True:
        groups = ray.get(controller.get_target_groups.remote(app_name))
        targets = [t for g in groups if g.app_name == app_name and g.ingress_deployment_name
                   and getattr(g.protocol, "value", g.protocol) == "HTTP" for t in g.targets]
        if targets:
            host = targets[0].ip if bind_host in ("0.0.0.0", "::") else bind_host
            return f"http://{host}:{targets[0].port}{prefix}"
        if time.monotonic() > deadline:
            raise ServeError(f"Ray Serve lists no direct-ingress port for app {app_name!r} after {timeout_s:.0f}s")
        time.sleep(0.2)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def absolute_tracking_uri(uri: str) -> str:
    """Replicas may run in another working directory: make relative SQLite/file URIs absolute."""
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return "sqlite:///" + str(Path(uri[len("sqlite:///"):]).resolve())
    if "://" not in uri:
        return str(Path(uri).resolve())
    return uri


class ServingHandle:
    """A deployed serve app: its URL, version, refresh and shutdown."""

    def __init__(self, url: str, app_name: str, tracking_uri: str, model_name: str, alias: str,
                 config: ServeConfig, proxy_url: str | None = None):
        self.url = url
        self.proxy_url = proxy_url or url   # Ray Serve's proxy: reaches the app whatever the ingress
        self.app_name = app_name
        self.tracking_uri, self.model_name, self.alias, self.config = tracking_uri, model_name, alias, config
        self.client = ServeClient(url, timeout_s=120.0, resolve=self.current_url, token=config.api_token or None)

    def current_url(self) -> str:
        """Where the app answers now: a restarted replica binds a new port under direct ingress."""
        resolve = self.url_resolver()
        if resolve is not None:
            self.url = resolve()
        return self.url

    def url_resolver(self):
        """A picklable ``current_url`` for a bridge in another process: None where the URL never
        moves (Serve's proxy), else the lookup of the replica's direct-ingress port."""
        if self.config.ingress != "direct":
            return None
        import functools

        return functools.partial(direct_ingress_url, self.app_name, self.config.route_prefix.rstrip("/"),
                                 self.config.http_host, timeout_s=self.config.health_timeout_s)

    def status(self) -> dict:
        """The app's /version answer: versions per adapter, refusals, swaps, replica."""
        return self.client.version()

    def version(self) -> str | None:
        try:
            return self.client.version().get("version")
        except ServeHTTPError:
            return None

    def refresh(self) -> str:
        """Check the registry now; hot-swap moved aliases; return the version serving ``default``.

        A refused candidate is not an exception: the old version keeps serving and
        ``status()["refusals"]`` says why.
        """
        info = self.client.refresh()
        refusal = info.get("refusals", {}).get("default")
        if refusal:
            log.warning("serve kept version %s: %s", info.get("version"), refusal["reason"])
        return info.get("version")

    def wait_for_version(self, version: str, timeout_s: float = 60.0) -> None:
        """Block until the app serves ``version`` (refreshing as it waits); raise TimeoutError otherwise."""
        deadline = time.monotonic() + timeout_s
        current = None
        while True:
            try:
                current = self.refresh()
            except ServeHTTPError as exc:
                log.debug("refresh failed while waiting: %s", exc)
            if current == str(version):
                return
            if time.monotonic() > deadline:
                refusal = (self.status().get("refusals") or {}).get("default")
                why = f"; last refusal: {refusal['reason']}" if refusal else ""
                raise TimeoutError(f"serve still runs version {current} after {timeout_s:.0f}s, "
                                   f"waiting for {version}{why}")
            time.sleep(0.5)

    def wait_for_adapter(self, adapter: str, version: str, timeout_s: float = 60.0) -> None:
        """Block until the app serves ``version`` under ``adapter`` (e.g. ``shadow``), refreshing as it
        waits; raise TimeoutError with the app's last refusal otherwise."""
        deadline = time.monotonic() + timeout_s
        current = None
        while True:
            try:
                info = self.client.refresh()
                current = ((info.get("adapters") or {}).get(adapter) or {}).get("version")
            except ServeHTTPError as exc:
                log.debug("refresh failed while waiting: %s", exc)
                info = {}
            if current is not None and str(current) == str(version):
                return
            if time.monotonic() > deadline:
                refusal = (info.get("refusals") or {}).get(adapter)
                why = f"; last refusal: {refusal['reason']}" if refusal else ""
                raise TimeoutError(f"serve's adapter {adapter!r} runs version {current} after {timeout_s:.0f}s, "
                                   f"waiting for {version}{why}")
            time.sleep(0.5)

    def shutdown(self) -> None:
        """Delete this app (Ray Serve itself and other apps keep running); nothing to do where
        the Ray it ran on is gone (a stop signal to the whole process group ends a local Ray's
        GCS too: asking Serve would wait a minute for it)."""
        from flywheel.base.rayinit import ray_answers

        self.client.close()
        if not ray_answers():
            log.info("serve app %s: its Ray is gone, and the app with it", self.app_name)
            return
        try:
            delete_app(self.app_name)
        except Exception as exc:  # noqa: BLE001 - shutting down twice or after Ray went away is fine
            log.debug("serve app %s delete: %s", self.app_name, exc)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.shutdown()


# Ray Serve's own waits (``serve.run``, ``serve.delete``) look at the app's status once a second,
# so a start or a stop ended on the next whole second after the app was ready or gone: about half
# a second lost each on average.  These two wait the same way, looking every CHECK_S.
CHECK_S = 0.05


def app_status(app_name: str):
    """``(status, message)`` of one Serve application (``ApplicationStatus.NOT_STARTED`` when there is
    none), asked the way ``serve.run`` waits: the controller's status of that one app.

    ``serve.status()`` builds the details of every application, deployment and proxy (about 28 ms and
    20 ms of this process's CPU a call on 2 cores, against 4 ms and 1.4 ms): polled every CHECK_S
    while a replica starts, it took a third of a core from that start. A Ray without that client call
    gets ``serve.status()``'s answer."""
    from ray import serve as ray_serve
    from ray.serve.schema import ApplicationStatus

    try:
        from ray.serve.context import _get_global_client

        info = _get_global_client().get_serve_status(app_name).app_status
        return info.status, info.message
    except (ImportError, AttributeError):
        app = ray_serve.status().applications.get(app_name)
        return (ApplicationStatus.NOT_STARTED, "") if app is None else (app.status, app.message)


def wait_until_running(app_name: str, deadline: float) -> None:
    """Return once the app is RUNNING; raise with Serve's message if its deployment failed, or
    TimeoutError at ``deadline`` (``time.monotonic()``)."""
    from ray.serve.schema import ApplicationStatus

    while True:
        status, message = app_status(app_name)
        if status == ApplicationStatus.NOT_STARTED:
            raise RuntimeError(f"Serve has no application {app_name!r} (deleted while it started?)")
        if status == ApplicationStatus.RUNNING:
            return
        if status == ApplicationStatus.DEPLOY_FAILED:
            raise RuntimeError(f"Deploying application {app_name} failed: {message}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"the serve app {app_name!r} is still {status.value} when its time to start "
                               "ran out; the replica's log says why, or give it longer (serve.health_timeout_s)")
        time.sleep(CHECK_S)


def check_app_name(app_name: str, tracking_uri: str, model_name: str) -> None:
    """Refuse to deploy over a running application of the same name that serves something else.

    Serve replaces an application deployed under a name that runs already: on a shared cluster a
    second campaign or ``flywheel serve`` with the default ``serve.app_name`` would take over the
    first one's endpoint without a word, and the first campaign's plant would take its orders
    from the other's model. The same model of the same registry is this command's own app, left by
    a run that did not end (a crash, kill -9): that one is replaced, as a restart should."""
    from ray import serve as ray_serve
    from ray.serve.schema import ApplicationStatus

    from flywheel.base.mqtt import redact_url

    app = ray_serve.status().applications.get(app_name)
    if app is None or app.status == ApplicationStatus.DEPLOY_FAILED:   # nothing serves there to take over
        return
    try:
        owner = ray_serve.get_app_handle(app_name).owner.remote().result(timeout_s=30)
    except Exception:  # noqa: BLE001 - not a flywheel app (no such method), or one that does not answer
        owner = None
    if owner == {"tracking_uri": tracking_uri, "model_name": model_name}:
        log.info("serve app %s: replacing the one a previous run of %s left running", app_name, model_name)
        return
    what = (f"it serves {owner['model_name']} from {redact_url(owner['tracking_uri'])}" if owner
            else "not one of this stack's, or it does not answer")
    raise ServeError(f"Ray Serve already runs an application named {app_name!r} ({what}): deploying under "
                     "that name would replace it. Give this one its own serve.app_name and serve.route_prefix "
                     f"(e.g. serve.app_name={model_name}-2 serve.route_prefix=/{model_name}-2), or stop the other")


def delete_app(app_name: str, timeout_s: float = 60.0) -> None:
    """Delete a Serve app and return once it is gone (its replicas stopped: about 0.4 s for an idle
    replica with ``serve.drain_check_s`` at 0.1; ``serve.delete`` returned after a whole second)."""
    from ray import serve as ray_serve
    from ray.serve.schema import ApplicationStatus

    ray_serve.delete(app_name, _blocking=False)
    deadline = time.monotonic() + timeout_s
    while app_status(app_name)[0] != ApplicationStatus.NOT_STARTED:   # RUNNING, then DELETING, then absent
        if time.monotonic() > deadline:
            raise TimeoutError(f"the serve app {app_name!r} is still there {timeout_s:.0f} s after its delete")
        time.sleep(CHECK_S)


def _ensure_serve_http(config: ServeConfig) -> int:
    """Start Ray Serve's HTTP proxy if needed; return the port it listens on."""
    from ray import serve as ray_serve
    from ray.serve.context import _get_global_client
    import ray

    client = _get_global_client(raise_if_no_controller_running=False)
    if client is None:
        if config.http_port:
            try:
                ray_serve.start(http_options={"host": config.http_host, "port": config.http_port})
            except Exception as exc:  # noqa: BLE001 - Ray wraps the proxy's bind error in its task error
                if "Failed to bind to address" not in str(exc):
                    raise
                ray_serve.shutdown()   # no half-started controller left for the next start to find
                raise ServeError(f"Ray Serve's proxy cannot listen on {config.http_host}:{config.http_port} "
                                 "(in use): choose another serve.http_port, or leave it unset for a free one") from None
            return config.http_port
        # A port found free here can be taken before the proxy binds it (Ray's own processes pick
        # ports from the same range while they start): then start again on another one.
        for attempt in range(3):
            port = free_port(config.http_host)
            try:
                ray_serve.start(http_options={"host": config.http_host, "port": port})
                return port
            except Exception as exc:  # noqa: BLE001 - Ray wraps the proxy's bind error in its task error
                if "Failed to bind to address" not in str(exc) or attempt == 2:
                    raise
                log.warning("Ray Serve's proxy could not bind port %d (taken meanwhile); trying another", port)
                ray_serve.shutdown()
    port = ray.get(client._controller.get_http_config.remote()).port
    if config.http_port and config.http_port != port:
        log.warning("Ray Serve already listens on port %d on this cluster; http_port=%d is ignored",
                    port, config.http_port)
    return port


def _deployment_messages(app_name: str) -> str:
    """The replicas' own error (Ray's exception only says the deployment failed)."""
    from ray import serve as ray_serve

    try:
        app = ray_serve.status().applications.get(app_name)
        msgs = [d.message for d in app.deployments.values() if d.message] if app else []
    except Exception:  # noqa: BLE001 - this is only a better error message
        return ""
    # The replica's traceback is long; its last line names the problem.
    lines = [m.strip().splitlines()[-1] for m in msgs if m.strip()]
    return (" - " + " | ".join(lines)) if lines else ""


def serve_http_host(bind_host: str, nodes: list[dict] | None = None, client_mode: bool | None = None) -> str:
    """The host this process reaches Serve's HTTP proxy at.

    A proxy bound to a wildcard address runs on every node, so a driver on a cluster node
    uses its own loopback.  A Ray Client driver (``ray://head:10001``) is on no node: it uses
    the head node's address (Serve's proxy always runs there).
    """
    if bind_host not in ("0.0.0.0", "::"):
        return bind_host
    if client_mode is None:
        import ray

        client_mode = ray.util.client.ray.is_connected()
    if client_mode:
        if nodes is None:
            import ray

            nodes = ray.nodes()
        for node in nodes:
            if node.get("Alive") and "node:__internal_head__" in node.get("Resources", {}):
                return node["NodeManagerAddress"]
    return "127.0.0.1"


def _check_local_replicas(config: ServeConfig, cpus: int) -> None:
    """Refuse replicas that reserve more CPUs than the local Ray about to start offers, or a GPU this
    machine does not have: Ray never places them (the app waited until its time to start ran out,
    minutes), and a replica on serve.device=cuda failed only once Ray and Serve had started."""
    held = config.num_replicas * config.num_cpus_per_replica
    if held > cpus:
        raise ServeError(f"serve.num_replicas={config.num_replicas} at serve.num_cpus_per_replica="
                         f"{config.num_cpus_per_replica:g} reserve {held:g} CPUs, more than the {cpus} of the local "
                         "Ray: lower them, or serve on a Ray cluster (--ray-address)")
    if config.device == "cuda" or config.num_gpus_per_replica > 0:
        import torch

        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
        wanted = config.num_replicas * config.num_gpus_per_replica
        if gpus == 0 or wanted > gpus:
            raise ServeError(f"serve.device={config.device}, serve.num_gpus_per_replica="
                             f"{config.num_gpus_per_replica:g} x {config.num_replicas} replica(s), but this machine "
                             f"has {gpus} CUDA GPU(s): use serve.device=auto and serve.num_gpus_per_replica=0, or "
                             "serve on a Ray cluster with GPU nodes (--ray-address)")


def start_serving(tracking_uri: str, model_name: str = "fault-detector", alias: str = "champion",
                  config: ServeConfig | None = None, ray_address: str | None = None) -> ServingHandle:
    """Deploy the fault detector for ``model_name@alias`` and return once it is healthy."""
    import ray
    from ray import serve as ray_serve

    from flywheel.base.rayinit import init_ray, starts_local_ray
    from serve.app import bind_app

    config = config or ServeConfig()
    if config.require_signature and not config.signing_public_key:
        raise ServeError("serve.require_signature is on but serve.signing_public_key is empty: give the signer's "
                         "public key (flywheel keys init writes <workdir>/keys/signing.pub), or set "
                         "serve.require_signature=false")
    if config.require_signature and not os.path.isfile(config.signing_public_key):
        raise ServeError(f"serve.signing_public_key {config.signing_public_key!r} is not a file: give the signer's "
                         "public key (flywheel keys init writes <workdir>/keys/signing.pub)")
    tracking_uri = absolute_tracking_uri(tracking_uri)
    # Fail fast, in the caller's process, with a clear message when there is nothing to serve.
    source = AdapterSource(tracking_uri, model_name)
    resolved = source.resolve(alias)
    source.check_featuriser(resolved)   # the replica checks the adapter's own record again when it loads
    log.info("serving %s@%s = version %s", model_name, alias, resolved.version)
    if not ray.is_initialized():
        if starts_local_ray(ray_address):   # a Ray of its own: Ray's CPU count
            _check_local_replicas(config, os.cpu_count() or 1)
        if ray_address in (None, "", "local"):
            prepare_local_ray(config)
        init_ray(address=ray_address, include_dashboard=False, configure_logging=False)
    check_ingress(config)
    port = _ensure_serve_http(config)
    check_app_name(config.app_name, tracking_uri, model_name)
    app = bind_app(tracking_uri, model_name, alias, config)
    deadline = time.monotonic() + config.health_timeout_s
    try:
        ray_serve.run_many([ray_serve.RunTarget(app, name=config.app_name, route_prefix=config.route_prefix,
                                                logging_config={"enable_access_log": config.access_log})],
                           wait_for_applications_running=False)
        wait_until_running(config.app_name, deadline)
    except Exception as exc:  # noqa: BLE001 - Ray wraps replica start errors in several types
        why = _deployment_messages(config.app_name)
        try:   # not left behind on a cluster, placing replicas and holding CPUs for a start that failed
            delete_app(config.app_name, timeout_s=30)
        except Exception as gone:  # noqa: BLE001 - the error above is the one to report
            log.debug("serve app %s delete after a failed start: %s", config.app_name, gone)
        raise ServeError(f"the serve app for {model_name}@{alias} did not start: {exc}{why}") from None
    prefix = config.route_prefix.rstrip("/")
    host = serve_http_host(config.http_host)
    proxy_url = f"http://{host}:{port}{prefix}"
    url = proxy_url
    if config.ingress == "direct":
        try:
            url = direct_ingress_url(config.app_name, prefix, config.http_host, timeout_s=config.health_timeout_s)
        except ServeError:
            delete_app(config.app_name)
            raise
    handle = ServingHandle(url, config.app_name, tracking_uri, model_name, alias, config, proxy_url=proxy_url)
    while True:
        try:
            handle.client.health()
            return handle
        except ServeHTTPError as exc:
            if time.monotonic() > deadline:
                handle.shutdown()
                raise ServeError(f"the serve app at {handle.url} is not healthy after "
                                 f"{config.health_timeout_s:.0f}s: {exc}") from None
            time.sleep(0.2)
