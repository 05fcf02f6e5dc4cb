"""A study's outcome in its MLflow parent run: trial counts, the best trial's value, parameters
and run, Optuna's plots, an offline study's off-policy selection (`src.campaigns.selection`),
and the best trial's model registered as `<study>-best@champion`."""

from __future__ import annotations

import logging
import tempfile

import mlflow
import optuna
import pandas as pd
from matplotlib.ticker import MaxNLocator
from mlflow.entities import RunStatus
from omegaconf import DictConfig, OmegaConf

from src import comparison, config, metrics, plots, tracking
from src.campaigns import selection
from src.campaigns.study import directions, load_study, target
from src.campaigns.trials import COMPLETE, FAIL, PARENT_RUN_ATTR, PRUNED, RUN_ATTR, RUNNING
from src.errors import UserError

log = logging.getLogger(__name__)


def shown_params(params: dict) -> str:
    """Sampled values as a person reads them: 2.288, not 2.2881136684755243 (runs log them whole)."""
    return " ".join(f"{name}={comparison.shown(str(value), digits=4)}" for name, value in params.items())


def summarise_if_done(cfg: DictConfig, study: optuna.Study,
                      interrupted: bool = False) -> optuna.trial.FrozenTrial | None:
    """Summarise unless trials still run on other workers (the last of them will); return
    the best trial when summarised."""
    others = len(study.get_trials(states=(RUNNING,)))
    if others:
        log.info("%d trials still running on other workers; the last to finish summarises", others)
        return None
    return summarise(cfg, failed=interrupted)


def summarise(cfg: DictConfig, failed: bool = False) -> optuna.trial.FrozenTrial | None:
    """Log the study's best trial and Optuna's plots to the parent run; return the best trial."""
    study = load_study(cfg)
    log.info("Summarising study '%s' into its MLflow parent run", study.study_name)
    tracking.connect(cfg.tracking.uri, cfg.tracking.experiment)
    parent_id = study.user_attrs.get(PARENT_RUN_ATTR)
    if parent_id is None:
        raise UserError(f"study '{study.study_name}' has no MLflow parent run; run `python -m src.sweep prepare` first")
    client = mlflow.MlflowClient()
    states = [t.state for t in study.trials]
    complete = states.count(COMPLETE)
    for name, state in (("complete", COMPLETE), ("failed", FAIL), ("pruned", PRUNED)):
        client.log_metric(parent_id, f"sweep/trials_{name}", states.count(state), step=len(states))
    best = None
    done = complete >= target(cfg, study)  # a grid with failed points is not done
    if complete:
        best = study.best_trial
        client.log_metric(parent_id, f"best/{cfg.objective}", metrics.rounded(best.value), step=len(states))
        client.set_tag(parent_id, "best.trial", str(best.number))
        for name, value in best.params.items():
            client.set_tag(parent_id, f"best.{name}", str(value))
        best_run = best.user_attrs.get(RUN_ATTR)
        if best_run:
            client.set_tag(parent_id, "best.run_id", best_run)
        if best_run and done and not failed:
            register_best_model(cfg, best_run)
        log_plots(client, parent_id, study)
        log.info("Best of %d trials: %s = %.6g with %s (trial %d, run %s)", len(states), cfg.objective,
                 best.value, shown_params(best.params), best.number, best_run)
        if config.is_offline(cfg):
            selection.report(client, parent_id, study, cfg.objective, best)
        if not done or failed:
            # A partial study's best is not the campaign's answer: @champion must not move to it.
            log.warning("Study '%s' is not complete (%d of %d trials%s): its best trial is not registered; "
                        "run the sweep again to complete it", study.study_name, complete, target(cfg, study),
                        ", interrupted" if failed else "")
    status = RunStatus.FINISHED if done and not failed else RunStatus.FAILED
    client.set_terminated(parent_id, RunStatus.to_string(status))
    return best


def register_best_model(cfg: DictConfig, run_id: str) -> None:
    """Register the best trial's servable model under `<study>-best`, first completing the
    trial's light artifacts with its regret plot and its policy."""
    name = f"{cfg.hydra.sweeper.study_name}-best"
    client = mlflow.MlflowClient()
    if any(v.run_id == run_id for v in client.search_model_versions(f"name = '{name}'")):
        return  # a resumed sweep whose best trial has not changed
    log_regret_plot(run_id)
    with tempfile.TemporaryDirectory() as scratch:
        run_cfg = OmegaConf.load(client.download_artifacts(run_id, "config.yaml", scratch))
    if run_cfg.tracking.save_policy and "policy" not in {artifact.path for artifact in client.list_artifacts(run_id)}:
        retrain_policy(run_id, run_cfg)
    model = logged_model(run_id)
    if model is None:
        log.warning("The best trial's run %s saved no policy to register", run_id)
        return
    version = mlflow.register_model(f"models:/{model.model_id}", name)
    # Two workers ending together may both register it; both then keep the first version.
    versions = sorted(int(v.version) for v in client.search_model_versions(f"name = '{name}'") if v.run_id == run_id)
    for extra in versions[1:]:
        try:
            client.delete_model_version(name, str(extra))
        except mlflow.exceptions.MlflowException:
            pass  # the other worker deleted it first
    kept = str(versions[0] if versions else version.version)
    # The alias follows the best trial as a resumed sweep finds better ones; serve `@champion`.
    set_alias(client, name, "champion", kept)
    client.update_registered_model(name, description=(
        f"The best trial of the Optuna study '{cfg.hydra.sweeper.study_name}' by {cfg.objective} "
        f"({directions(cfg)[0]}); each version is a best trial's policy, trained again from its config."))
    log.info("Registered the best trial's model as models:/%s/%s (alias @champion)", name, kept)


def set_alias(client: mlflow.MlflowClient, name: str, alias: str, version: str, tries: int = 3) -> None:
    """Point `name@alias` at `version`, even while another worker sets it too: MLflow's SQL store
    reads then inserts the alias, so of two workers ending together the slower one's insert can
    break the primary key (PostgreSQL's UniqueViolation); tried again, it finds the row and updates it."""
    for attempt in range(1, tries + 1):
        try:
            client.set_registered_model_alias(name, alias, version)
            return
        except mlflow.exceptions.MlflowException:
            if attempt == tries:
                raise
            log.info("Setting %s@%s lost a race with another worker; trying again", name, alias)


def retrain_policy(run_id: str, run_cfg: DictConfig) -> None:
    """Train the run's config again and log the policy (and servable model) into the run.
    Trials save no policy: a SavedModel costs more than a quick trial's training, and a job's
    result depends only on its config and seed, which the objective's value checks here."""
    from src import data, serving, training  # TensorFlow, only when there is a model to register

    log.info("Training the best trial (run %s) again for its policy", run_id)
    dataset = data.load(run_cfg.data)
    engine, final = training.fit(run_cfg, dataset)
    value = final[run_cfg.objective]
    logged = mlflow.MlflowClient().get_run(run_id).data.metrics[run_cfg.objective]
    if abs(metrics.rounded(value) - logged) > 1e-6 * max(1.0, abs(logged)):
        log.warning("The best trial gave %s = %.6g when trained again, %.6g in the sweep (another CPU type?)",
                    run_cfg.objective, value, logged)
    with mlflow.start_run(run_id=run_id):
        mlflow.set_tag("sweep.policy_from", f"trained again after the sweep: {run_cfg.objective} = {value:.6g}")
        catalogue = serving.Catalogue.of(engine.environment.reward_model, dataset.movies, run_cfg.env)
        serving.log_policy(engine.agent.policy, catalogue)


def log_regret_plot(run_id: str) -> None:
    """Draw a finished run's regret plot from its metrics.csv, unless it has one."""
    client = mlflow.MlflowClient()
    artifacts = {artifact.path for artifact in client.list_artifacts(run_id)}
    if "regret.png" in artifacts or "metrics.csv" not in artifacts:
        return
    with tempfile.TemporaryDirectory() as scratch:
        frame = pd.read_csv(client.download_artifacts(run_id, "metrics.csv", scratch))
        run_cfg = OmegaConf.load(client.download_artifacts(run_id, "config.yaml", scratch))
    random_regret = client.get_run(run_id).data.tags.get(metrics.RANDOM_REGRET_TAG)
    figure = plots.regret_figure(frame, plots.run_title(run_cfg), random_regret and float(random_regret))
    client.log_figure(run_id, figure, "regret.png")


def logged_model(run_id: str):
    experiment = mlflow.MlflowClient().get_run(run_id).info.experiment_id
    models = mlflow.search_logged_models(
        experiment_ids=[experiment], filter_string=f"source_run_id = '{run_id}' AND name = 'model'",
        output_format="list")
    return models[0] if models else None


def log_plots(client: mlflow.MlflowClient, run_id: str, study: optuna.Study) -> None:
    import optuna.visualization.matplotlib as plots

    history = plots.plot_optimization_history(study)
    history.xaxis.set_major_locator(MaxNLocator(integer=True))  # trial numbers, not 2.5
    figures = {"optimization_history.png": history}
    # Importances need at least two finished trials and two parameters to compare.
    if len(study.get_trials(states=(COMPLETE,))) > 1 and len(study.best_trial.params) > 1:
        figures["param_importances.png"] = plots.plot_param_importances(study)
    for name, axes in figures.items():
        client.log_figure(run_id, axes.figure, name)
