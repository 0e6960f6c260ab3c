"""Fine-tune: LoRA on a small open model, evaluated, gated and registered in MLflow.

    from finetune import TrainConfig, train_and_register
    outcome = train_and_register("lake/datasets/ds-1", TrainConfig(), "sqlite:///.flywheel/mlflow.db")

Modules: ``model`` (base model, device, LoRA), ``config`` (TrainConfig), ``data`` (snapshot,
batch plan), ``core`` (the training loop), ``launch`` / ``ray_launch`` (plain and Ray Train
launchers), ``checkpoint``, ``evaluate``, ``gate``, ``tracking`` (MLflow), ``pyfunc``,
``registry`` (aliases, rollback, model download), ``families`` (lora | gbdt: check and score
either), ``gbdt`` (the tree family: challenger with ``train.family=gbdt``, else the reference),
``turn`` (one whole turn), ``cli``.
Heavy libraries load lazily; importing this package is cheap.
"""

from finetune.config import TrainConfig
from finetune.turn import TurnOutcome, governed_base_model, train_and_register

__all__ = ["TrainConfig", "TurnOutcome", "train_and_register", "governed_base_model", "load_snapshot",
           "evaluate_adapter_report", "majority_baseline", "fetch_adapter", "aliases", "abandon_run",
           "version_threshold", "RegistryError", "cpu_precision_note",
           "evaluate_gbdt_report", "fetch_reference_model", "pick_device", "frame_decision_cost",
           "init_keys", "evaluate_model_report", "model_family", "lineage_record", "get_version",
           "set_alias"]

#: Names the facade loads on first use (their modules pull in torch, pandas or MLflow).
_LAZY = {"load_snapshot": "finetune.data", "evaluate_adapter_report": "finetune.evaluate",
         "majority_baseline": "finetune.evaluate", "fetch_adapter": "finetune.registry",
         "aliases": "finetune.registry", "abandon_run": "finetune.registry", "version_threshold": "finetune.registry",
         "RegistryError": "finetune.registry", "evaluate_gbdt_report": "finetune.gbdt",
         "fetch_reference_model": "finetune.gbdt", "pick_device": "finetune.model",
         "cpu_precision_note": "finetune.model",
         "frame_decision_cost": "finetune.evaluate", "init_keys": "finetune.signing",
         "evaluate_model_report": "finetune.families", "model_family": "finetune.families",
         "lineage_record": "finetune.bom", "get_version": "finetune.registry",
         "set_alias": "finetune.registry"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'finetune' has no attribute {name!r}")
