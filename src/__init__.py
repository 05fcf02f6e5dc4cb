"""Contextual-bandit recommender experiments on MovieLens 100K.

Importing the package prepares the process for TensorFlow before anything imports it:
TF-Agents needs the Keras 2 API (tf-keras), and TensorFlow's C++ start-up chatter and
a few known-harmless deprecation warnings would otherwise bury our own log lines.
"""

import contextlib
import os
import sys
import warnings

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
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


@contextlib.contextmanager
def _silenced_stderr():
    """TensorFlow's C++ runtime writes to file descriptor 2 directly and gym prints to
    `sys.stderr` (not always fd 2, e.g. under a test runner), both before any logging setting
    applies; an import error still surfaces once both are restored."""
    sys.stderr.flush()
    saved = os.dup(2)
    with open(os.devnull, "w") as devnull:
        os.dup2(devnull.fileno(), 2)
        try:
            with contextlib.redirect_stderr(devnull):
                yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)


with _silenced_stderr():
    import tensorflow as _tf
    import tensorflow_probability  # noqa: F401  (registers TypeSpecs SavedModels need)
    import tf_agents.agents  # noqa: F401  (imports gym, which prints a notice)

    _tf.config.list_physical_devices()  # probes for CUDA, which logs when there is none

from omegaconf import OmegaConf as _OmegaConf  # noqa: E402

from src.paths import PROJECT_ROOT as _PROJECT_ROOT  # noqa: E402

# Lets configs place files at the project root whatever the cwd (`${project_root:}`).
_OmegaConf.register_new_resolver("project_root", lambda: str(_PROJECT_ROOT), replace=True)
