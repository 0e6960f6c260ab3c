"""MLflow "models from code" entry point for the registered fault detector.

MLflow copies this file into each logged model and runs it when the model loads, so
no pickled Python object is ever stored or unpickled (``finetune.pyfunc.save_pyfunc``).
It is not meant to be imported by the project's own code.
"""

import mlflow.models

from finetune.pyfunc import FaultDetector

mlflow.models.set_model(FaultDetector())
