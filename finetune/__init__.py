"""Fine-tune: LoRA on a small open model, evaluated, gated and registered in MLflow.

    from finetune import TrainConfig, train_and_register
    outcome = train_and_register("lake/datasets/ds-1", TrainConfig(), "sqlite:///.flywheel/mlflow.db")

Modules: ``model`` (base model, device, LoRA), ``config`` (TrainConfig), ``data`` (snapshot,
batch plan), ``core`` (the training loop), ``launch`` / ``ray_launch`` (plain and Ray Train
launchers), ``checkpoint``, ``evaluate``, ``gate``, ``tracking`` (MLflow), ``pyfunc``,
``registry`` (aliases, rollback, adapter download), ``turn`` (one whole turn), ``cli``.
Heavy libraries load lazily; importing this package is cheap.
"""

from finetune.config import TrainConfig
from finetune.turn import TurnOutcome, train_and_register

__all__ = ["TrainConfig", "TurnOutcome", "train_and_register"]
