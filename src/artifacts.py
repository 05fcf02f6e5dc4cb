"""What a training run left in MLflow that later commands read: its config and its policy."""

from __future__ import annotations

from pathlib import Path

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.models import Model
from omegaconf import DictConfig, OmegaConf

from src.errors import UserError


def fetch_policy(run_id: str | None, model_uri: str | None, scratch: Path) -> tuple[str, Path]:
    """The id of the run that trained the policy a run id or a model URI names, and the policy
    downloaded into `scratch`."""
    if run_id is not None:
        run_id = str(run_id)
        check_run(run_id)
        try:
            return run_id, Path(mlflow.artifacts.download_artifacts(
                run_id=run_id, artifact_path="policy", dst_path=str(scratch)))
        except (MlflowException, OSError):
            raise UserError(f"run {run_id} has no saved policy (artifact policy/); "
                            f"train with tracking.save_policy=true") from None
    uri = str(model_uri)
    try:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(scratch)))
    except (MlflowException, OSError) as error:
        raise UserError(f"cannot fetch model_uri={uri}: {str(error).splitlines()[0]}") from None
    if (local / "MLmodel").is_file():
        logged_model = Model.load(str(local))
        artifacts = logged_model.flavors.get("python_function", {}).get("artifacts") or {}
        if "policy" not in artifacts or logged_model.run_id is None:
            raise UserError(f"model_uri={uri} is not a policy model logged by src.train")
        return logged_model.run_id, local / artifacts["policy"]["path"]
    if (local / "saved_model.pb").is_file() and uri.startswith("runs:/"):
        return uri.split("/")[1], local
    raise UserError(f"model_uri={uri} holds neither a policy model nor a saved policy")


def check_run(run_id: str) -> None:
    try:
        mlflow.MlflowClient().get_run(run_id)
    except MlflowException:
        raise UserError(f"no run {run_id} in the tracking store {mlflow.get_tracking_uri()} "
                        f"(pass tracking.uri= if it is elsewhere)") from None


def logged_config(run_id: str, scratch: Path) -> DictConfig:
    try:
        path = mlflow.artifacts.download_artifacts(
            run_id=run_id, artifact_path="config.yaml", dst_path=str(scratch))
    except (MlflowException, OSError):
        raise UserError(f"run {run_id} has no config.yaml; was it logged by src.train?") from None
    return OmegaConf.load(path)
