"""Serving a trained policy: the saved TF-Agents policy loaded for inference (`policy`), the
catalogue that turns its actions into movies and users into observations (`catalogue`), and the
MLflow pyfunc model around both that `mlflow models serve` answers with (`model`).

This is also where a recommendation service and its decision log belong as they come.
"""

from src.serving.catalogue import Catalogue
from src.serving.model import log_policy, save_policy
from src.serving.policy import Policy

__all__ = ["Catalogue", "Policy", "log_policy", "save_policy"]
