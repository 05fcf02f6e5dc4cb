"""Serving a trained policy: the saved TF-Agents policy loaded for inference (`policy`), the
catalogue that turns its actions into movies and users into observations (`catalogue`), the
MLflow pyfunc model around both that `mlflow models serve` answers with (`model`), and the
recommendation service (`service`, `exploration`) with its decision log (`decision_log`).

The names below load on first use (PEP 562), not with the package: the decision log, which a
retraining round and the service's option checks open first, needs no TensorFlow.
"""

import importlib

_HOMES = {"Catalogue": "src.serving.catalogue", "Policy": "src.serving.policy",
          "log_policy": "src.serving.model", "save_policy": "src.serving.model"}

__all__ = list(_HOMES)


def __getattr__(name: str):
    if name in _HOMES:
        return getattr(importlib.import_module(_HOMES[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
