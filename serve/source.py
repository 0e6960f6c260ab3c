"""Where served adapters come from: the MLflow registry, through ``finetune.registry``.

A *ref* names an adapter: an alias (``champion``), a version number (``3``), or either
prefixed by another registered model (``pump-detector@champion``).  This module turns a
ref into a registered version and a local adapter directory; it hides MLflow from the
serving code (and keeps MLflow's import out of module import time).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from flywheel.base.errors import FlywheelError
from flywheel.base.mqtt import redact_url

log = logging.getLogger(__name__)


class ServeError(FlywheelError, RuntimeError):
    """Serving cannot start or an adapter cannot be served; the message says why and the fix."""


@dataclass(frozen=True)
class Resolved:
    model_name: str
    ref: str
    version: str
    run_id: str | None
    featuriser: str | None = None   # the version's flywheel.featuriser tag, when it has one
    family: str | None = None       # the version's flywheel.family tag (lora, gbdt), when it has one


def split_ref(ref: str, default_model: str) -> tuple[str, str]:
    """``'champion'`` -> (default_model, 'champion'); ``'other@3'`` -> ('other', '3')."""
    ref = str(ref).strip()
    if not ref:
        raise ServeError("an adapter ref is empty; use an alias (champion), a version (3) or model@ref")
    if "@" in ref:
        model, _, r = ref.rpartition("@")
        if not model or not r:
            raise ServeError(f"adapter ref {ref!r} should look like model-name@alias or model-name@version")
        return model, r
    return default_model, ref


class AdapterSource:
    """Resolves refs and fetches adapter directories from one MLflow tracking URI."""

    def __init__(self, tracking_uri: str, model_name: str):
        self.tracking_uri = tracking_uri
        self.model_name = model_name

    def resolve(self, ref: str) -> Resolved:
        registry = _registry()
        model, r = split_ref(ref, self.model_name)
        try:
            info = registry.get_version(self.tracking_uri, model, r)
        except Exception as exc:  # noqa: BLE001 - MLflow raises many types; all mean "not resolvable"
            raise ServeError(f"cannot resolve {model}@{r} in the MLflow registry at {redact_url(self.tracking_uri)}: "
                             f"{exc}. Register a model first (flywheel train) or check --mlflow-uri") from None
        tags = getattr(info, "tags", None) or {}
        return Resolved(model, r, str(info.version), getattr(info, "run_id", None),
                        tags.get(registry.FEATURISER_TAG), tags.get(registry.FAMILY_TAG))

    def check_featuriser(self, resolved: Resolved) -> None:
        """Refuse, before anything loads, a version whose recorded family or featuriser this release does
        not know, or whose featuriser cannot feed its family (trees read numbers, LoRA reads text)."""
        from finetune.families import FAMILIES, featuriser_fits

        what = f"{resolved.model_name} v{resolved.version}"
        family = resolved.family or "lora"
        if family not in FAMILIES:
            raise ServeError(f"{what} cannot be served: its tag flywheel.family is {family!r}, not a family this "
                             f"release serves ({', '.join(FAMILIES)}); serve it with a release that knows it")
        if resolved.featuriser:
            why = featuriser_fits(family, resolved.featuriser)
            if why is not None:
                raise ServeError(f"{what} cannot be served: its tags say family {family!r} with featuriser "
                                 f"{resolved.featuriser!r}: {why}; retrain it, or register it again with the "
                                 "featuriser its model was trained with") from None

    def fetch(self, resolved: Resolved, dst_dir: str | None = None) -> str:
        """The adapter's local directory; ModelError (not ServeError) when the adapter itself is unusable."""
        from finetune.model import ModelError

        registry = _registry()
        try:
            return registry.fetch_adapter(self.tracking_uri, resolved.model_name, resolved.version, dst_dir)
        except ModelError:
            raise
        except Exception as exc:  # noqa: BLE001
            raise ServeError(f"cannot fetch the adapter of {resolved.model_name} version {resolved.version}: "
                             f"{exc}") from None


    def verify(self, resolved: Resolved, adapter_dir: str, public_key: str) -> None:
        """Refuse a version whose signature is missing, foreign or does not match its files: raises
        ``finetune.model.ModelError`` (never retried: artifacts are immutable) naming the reason,
        or, for a version with no signature yet, :class:`ServeError` (checked again at the next
        registry poll: ``finetune.signing.sign_registered`` may sign it later)."""
        from finetune.model import ModelError
        from finetune.signing import SignatureError, UnsignedError, verify_version

        try:
            verify_version(self.tracking_uri, resolved.model_name, resolved.version, adapter_dir, public_key)
        except UnsignedError as exc:
            raise ServeError(f"refused, signature check failed: {exc}; checked again at each registry poll") from None
        except SignatureError as exc:
            raise ModelError(f"refused, signature check failed: {exc}") from None


    def check_governance(self, resolved: Resolved, policy) -> None:
        """Refuse a version whose recorded base model (tags ``flywheel.base_model_id`` and
        ``flywheel.base_model_licence``) the governance policy does not allow: raises
        :class:`ServeError` naming the base model and the fix.  Tags can change (a base model
        recorded afterwards, a licence corrected), so the app checks such a version again at
        every registry poll, as it does an unsigned one; nothing of it is fetched meanwhile."""
        from flywheel.base.governance import BASE_MODEL_ID_TAG, BASE_MODEL_LICENCE_TAG, GovernanceError

        if not policy.active:
            return
        tags = _registry().get_version(self.tracking_uri, resolved.model_name, resolved.version).tags or {}
        if tags.get("flywheel.family", "lora") == "gbdt":   # trees build on no base model
            return
        try:
            policy.check(tags.get(BASE_MODEL_ID_TAG), tags.get(BASE_MODEL_LICENCE_TAG),
                         f"{resolved.model_name} version {resolved.version}")
        except GovernanceError as exc:
            raise ServeError(f"refused by the governance policy: {exc}; its tags are checked again at each "
                             "registry poll") from None


def _registry():
    from finetune import registry

    return registry
