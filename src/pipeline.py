"""The closed loop in one command: serve the champion exploring, drive simulated traffic, run a
retraining round after every `decisions_per_round` decisions, and stop cleanly.

    uv run python -m src.pipeline rounds=2 data.dir=/path/to/ml-100k

Each piece is its own command, run here as a child process (docs/closed-loop.md): `src.serve`
for the whole loop, then per round `src.traffic` (the true regret of what was served) and
`src.retrain` (the gate's estimates, the truth and the decision). Without `<model_name>@champion`
in the registry, the first champion is `champion_agent` trained with `training=quick`. The
rounds' table and figure go to `out` and to a run of experiment `pipeline` (bandits.role=pipeline).
On Ctrl-C or SIGTERM the children are stopped the same way and waited for (a round's run ends
KILLED, the traffic keeps its result); what the service acknowledged is already in its decision log.
"""

from __future__ import annotations

import json
import logging
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from datetime import datetime
from pathlib import Path

from omegaconf import DictConfig

from src import config
from src.cli import Terminated, exit_on_user_error, run_and_exit, stop_on_termination_signals, writable_folder
from src.errors import UserError, require
from src.paths import PROJECT_ROOT
from src.serving.exploration import MODES

log = logging.getLogger(__name__)

USAGE = "usage: python -m src.pipeline [rounds=N] [data.dir=PATH] [decisions_per_round=N] [rate=R]"
EXPERIMENT = "pipeline"
# How long the service may take to load TensorFlow and the model on a busy machine, and how
# long after a promotion it may take to serve the new version (its reload_s is 2 here).
SERVICE_START_S, FOLLOW_S = 600, 120
# How long a child asked to stop may take to record what it was doing before it is killed.
STOP_S = 60


def parse(overrides: list[str]) -> DictConfig:
    cfg = config.compose_command(overrides, "pipeline", USAGE)
    for key in ("rounds", "decisions_per_round"):
        require(isinstance(cfg[key], int) and cfg[key] >= 1, key, cfg[key], "an integer >= 1")
    require(0 < cfg.rate <= config.MOST_REQUESTS_PER_S, "rate", cfg.rate, f"> 0 and at most {config.MOST_REQUESTS_PER_S}")
    require(isinstance(cfg.seed, int) and 0 <= cfg.seed <= config.LARGEST_INTEGER - cfg.rounds, "seed", cfg.seed,
            f"an integer from 0 to {config.LARGEST_INTEGER} - rounds")
    require(0 <= cfg.feedback.delay_s <= config.LONGEST_TRAFFIC_S, "feedback.delay_s", cfg.feedback.delay_s,
            f">= 0 and at most {config.LONGEST_TRAFFIC_S} seconds")
    require(0 <= cfg.feedback.drop < 1, "feedback.drop", cfg.feedback.drop, "in [0, 1)")
    require(cfg.exploration in MODES, "exploration", cfg.exploration, f"one of {', '.join(MODES)} (conf/serve.yaml)")
    require(cfg.decisions_per_round / cfg.rate <= config.LONGEST_TRAFFIC_S, "rate", cfg.rate,
            f"such that a round's traffic, decisions_per_round / rate, takes at most {config.LONGEST_TRAFFIC_S:,} s")
    # The challenger's keys, agent and its hyperparameters, refused now rather than after the service
    # started and a round's traffic ran (src.retrain checks its own options' ranges as each round starts).
    config.check_group_choices(list(cfg.challenger))
    challenger = config.compose_command(retrain_options(cfg), "retrain", "challenger= takes src.retrain's options, "
                                                                         "conf/retrain.yaml")
    config.check_agent_ranges(challenger.agent)
    return cfg


def traffic_options(cfg: DictConfig, url: str, out: Path, round_number: int) -> list[str]:
    return [f"url={url}", f"rate={cfg.rate}", f"duration={cfg.decisions_per_round / cfg.rate}",
            f"feedback.delay_s={cfg.feedback.delay_s}", f"feedback.drop={cfg.feedback.drop}", f"out={out}",
            f"seed={cfg.seed + round_number - 1}"]


def retrain_options(cfg: DictConfig) -> list[str]:
    return [f"model_name={cfg.model_name}", *cfg.challenger]


def start(module: str, *args: str, log_to: Path) -> subprocess.Popen:
    """`python -m <module> args`, its output into `log_to`, in a session of its own: Ctrl-C and
    SIGTERM reach it from this command, once (`stop`), not from the terminal too."""
    with open(log_to, "w") as output:
        return subprocess.Popen([sys.executable, "-m", module, *args], cwd=PROJECT_ROOT, stdout=output,
                                stderr=subprocess.STDOUT, start_new_session=True)


def stop(process: subprocess.Popen, signum: int = signal.SIGTERM) -> None:
    """Ask `process` to stop as the command was asked (each stops cleanly on SIGINT or SIGTERM: a
    run ends KILLED, the traffic keeps its result); killed if it has not within STOP_S."""
    process.send_signal(signum)
    try:
        process.wait(timeout=STOP_S)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def child(module: str, *args: str, log_to: Path) -> None:
    """Run `python -m <module> args` to its end, its output into `log_to`; its one error line if
    it fails. Stopped as this command is."""
    log.info("Running %s (log: %s)", module, log_to)
    process = start(module, *args, log_to=log_to)
    try:
        returncode = process.wait()
    except KeyboardInterrupt as interrupt:
        stop(process, interrupt.signum if isinstance(interrupt, Terminated) else signal.SIGINT)
        raise
    if returncode:
        errors = [line for line in log_to.read_text().splitlines() if "ERROR" in line]
        raise UserError(f"{module} failed ({errors[-1].split('] - ')[-1] if errors else f'exit {returncode}'}); "
                        f"see {log_to}")


def ensure_champion(cfg: DictConfig, common: list[str], out: Path) -> str:
    """The version `<model_name>@champion` names, made first from a quick run of `champion_agent`."""
    import mlflow

    client = mlflow.MlflowClient()
    try:
        return client.get_model_version_by_alias(cfg.model_name, "champion").version
    except mlflow.exceptions.MlflowException:
        pass
    child("src.train", f"agent={cfg.champion_agent}", "training=quick", *cfg.champion_overrides,
          f"tracking.experiment={EXPERIMENT}", f"hydra.run.dir={out / 'champion'}", *common,
          log_to=out / "champion.log")
    (run,) = mlflow.search_runs(experiment_names=[EXPERIMENT], output_format="list", max_results=1,
                                filter_string=f"params.`agent.name` = '{cfg.champion_agent}'",
                                order_by=["attributes.start_time DESC"])
    (model,) = mlflow.search_logged_models(experiment_ids=[run.info.experiment_id], output_format="list",
                                           filter_string=f"source_run_id = '{run.info.run_id}' AND name = 'model'")
    version = mlflow.register_model(f"models:/{model.model_id}", cfg.model_name).version
    client.set_registered_model_alias(cfg.model_name, "champion", version)
    log.info("Registered %s's quick run as models:/%s/%s, @champion", cfg.champion_agent, cfg.model_name, version)
    return version


def served_version(base: str) -> str | None:
    try:
        with urllib.request.urlopen(f"{base}/health", timeout=5) as answer:
            return json.loads(answer.read())["model_version"]
    except OSError:
        return None


def wait_for(condition, service: subprocess.Popen, seconds: float, what: str, log_path: Path):
    deadline = time.monotonic() + seconds
    while not (value := condition()):
        if service.poll() is not None:
            raise UserError(f"the service stopped ({what}); see {log_path}")
        if time.monotonic() > deadline:
            raise UserError(f"waited {seconds:.0f} s for {what}; see {log_path}")
        time.sleep(1)
    return value


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def last_round(model_name: str):
    import mlflow

    (run,) = mlflow.search_runs(experiment_names=[EXPERIMENT], output_format="list", max_results=1,
                                filter_string=f"tags.`bandits.role` = 'retrain' AND "
                                              f"tags.`retrain.model_name` = '{model_name}'",
                                order_by=["attributes.start_time DESC"])
    return run


def one_round(number: int, cfg: DictConfig, base: str, common: list[str], out: Path, service, service_log) -> dict:
    """Traffic, then a retraining round: the round's row of the table."""
    folder = out / f"round{number}"
    try:
        child("src.traffic", *traffic_options(cfg, base, folder, number), *common,
              log_to=out / f"round{number}-traffic.log")
    except UserError:
        if service.poll() is not None:
            raise UserError(f"the service stopped during round {number}'s traffic (exit {service.returncode}); "
                            f"see {service_log}") from None
        raise
    traffic = json.loads((folder / "traffic.json").read_text())
    served = traffic["versions"]
    interactions = sum(version["interactions"] for version in served.values())
    regret = sum(version["true_regret"] * version["interactions"] for version in served.values()) / interactions
    child("src.retrain", *retrain_options(cfg), *common, log_to=out / f"round{number}-retrain.log")
    run = last_round(cfg.model_name)
    tags, values = run.data.tags, run.data.metrics
    promoted = tags.get("retrain.promoted_version")
    if promoted:
        wait_for(lambda: served_version(base) == promoted, service, FOLLOW_S, f"version {promoted} to be served",
                 service_log)
    row = {"round": number, "served_versions": ",".join(served), "decisions": interactions,
           "true_regret_served": regret, "decision": tags["retrain.decision"], "reason": tags["retrain.reason"],
           "promoted_version": promoted or ""}
    row.update({name: values.get(name) for name in sorted(values)
                if name.startswith(("champion/", "challenger/", "gate/")) and not name.endswith(("_low", "_high"))})
    log.info("Round %d: true regret served %.4f; %s", number, regret, row["reason"])  # the reason starts with the decision
    return row


def run_loop(cfg: DictConfig) -> Path:
    import mlflow
    import pandas as pd

    from src import plots, tracking

    out = writable_folder(Path(cfg.out) if cfg.out else
                          PROJECT_ROOT / "outputs" / "pipeline" / f"{datetime.now():%Y-%m-%d_%H-%M-%S}", "out")
    uri = tracking.tracking_uri(cfg.tracking.uri)
    experiment_id = tracking.connect(uri, EXPERIMENT)
    common = [f"tracking.uri={uri}", *([f"data.dir={cfg.data.dir}"] if cfg.data.dir else [])]
    ensure_champion(cfg, common, out)
    port, service_log = free_port(), out / "service.log"
    base = f"http://127.0.0.1:{port}"
    log.info("Starting the service at %s (log: %s)", base, service_log)
    service = start("src.serve", f"model=models:/{cfg.model_name}@champion", f"port={port}", "reload_s=2",
                    f"exploration={cfg.exploration}", f"tracking.uri={uri}", log_to=service_log)
    rows = []
    try:
        wait_for(lambda: served_version(base), service, SERVICE_START_S, "the service to answer", service_log)
        for number in range(1, cfg.rounds + 1):
            rows.append(one_round(number, cfg, base, common, out, service, service_log))
    finally:
        stop(service)  # SIGTERM: the service stops cleanly, its log already durable
        if rows:  # stopped or failed too: the rounds done so far are kept
            table = pd.DataFrame(rows)
            table.to_csv(out / "rounds.csv", index=False)
            plots.rounds_figure(table).savefig(out / "rounds.png", dpi=120)
    with mlflow.start_run(experiment_id=experiment_id, run_name=f"pipeline·{cfg.rounds}rounds",
                          tags={tracking.ROLE_TAG: "pipeline"}) as active:
        mlflow.log_params({"rounds": cfg.rounds, "decisions_per_round": cfg.decisions_per_round, "rate": cfg.rate,
                           "seed": cfg.seed, "challenger": " ".join(cfg.challenger), "model_name": cfg.model_name})
        mlflow.log_artifacts(str(out))
    print(table.drop(columns="reason").to_string(index=False, float_format="{:.4f}".format))
    log.info("Rounds in %s; %s", out / "rounds.csv", tracking.where_to_see(active.info.run_id, experiment_id))
    return out


def main(argv: list[str]) -> None:
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s")
    stop_on_termination_signals()  # SIGTERM as Ctrl-C: the children stop, none is left behind
    with exit_on_user_error():
        run_loop(parse(argv))


if __name__ == "__main__":
    run_and_exit(lambda: main(sys.argv[1:]))
