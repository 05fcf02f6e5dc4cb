"""Contextual-bandit recommender experiments on MovieLens 100K.

Importing the package sets the process environment TensorFlow and MLflow read when they
load, so it must come before either (any `src.*` import does that). TensorFlow itself is
loaded only by the modules that need it, through `src.tf_runtime`.
"""

import os
import warnings

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")  # TF-Agents needs the Keras 2 API (tf-keras)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
# A run must fail fast, not retry for minutes, when the tracking server is unreachable.
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")
# Served models pin their packages explicitly; uv.lock would only add the index's addresses.
os.environ.setdefault("MLFLOW_LOG_UV_FILES", "false")
# Logging a model copies its files around; a progress bar per copy says nothing to a user.
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

for _pattern in (
    r".*Gym has been unmaintained.*",
    r".*distutils.*",
    r".*is.* with a literal.*",
    r".*pkg_resources is deprecated.*",
    r".*`tf.keras` optimizer.*",
):
    warnings.filterwarnings("ignore", message=_pattern)
warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"(gym|tf_agents|tensorflow_probability|google\.protobuf)")
warnings.filterwarnings("ignore", category=SyntaxWarning, module=r"tf_agents")
# Hydra's Optuna sweeper still builds Optuna 2's distribution classes; Optuna maps them.
warnings.filterwarnings("ignore", category=FutureWarning, message=r".*Distribution has been deprecated")
