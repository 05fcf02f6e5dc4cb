"""Compare agents fairly: a metric's history, mean and confidence band over seeds.

    uv run python -m src.compare                                 # every finished run
    uv run python -m src.compare --agents linucb,epsilon_greedy  # only these agents
    uv run python -m src.compare --parent <run id>               # only one sweep's children
    uv run python -m src.compare --metric train/reward --out reports/reward

Finished training runs are grouped by configuration (a warning counts the runs left out for
their status): the agent plus every config parameter whose value differs between the
selected runs (an agent's own parameters when they differ for that agent). Left out are the
seed and the settings that cannot change what an agent learns (tracking.*, data locations,
thread counts, the sweeper's objective), so the seeds of one configuration form one group.
Environment parameters are thus always in the key: runs on different environments are never
averaged. The exception is a hyperparameter search: unless `--parent` picks one sweep, its
trials form one group per study and agent, over the parameters it searched (every trial
would otherwise be a group of one). `--group-by agent.name` forces a coarser key and is
refused when a group would mix environments or data sets. Runs that repeat a seed of their
configuration are dropped but for the latest, and named in a warning and under the table: they
are no independent draws, and counting them twice would narrow the band on no new evidence.

Within a group, histories are aligned by linear interpolation onto the union of their steps,
restricted to the range every run covers; identical step grids (the usual case) stay exactly
as logged. The band is the Student t-interval of the mean over seeds at each step (95% by
default), clipped to the metric's range (regret is never negative); a group of one run has
none. The final value is the one at the group's last step.

The figure has a panel per environment, data set and run length (regrets of another are other
numbers), its legend beside it, and a log axis where the lines end more than 20x apart (a random
agent beside learning ones). A legend names the agent and, abbreviated, the values that tell the
groups of its panel apart (`epsilon_greedy (eps=0.1)`); the tables keep the full configuration,
every parameter that differs, with numbers to 3 significant digits.

Writes comparison.png, comparison.md (a table per panel) and comparison.csv (one row per group:
final mean ± std, seeds, run ids, dropped repeats) and curves.csv (mean, std, band per step),
logs them to a run tagged `bandits.role=comparison` in the same experiment, which later
comparisons skip, and prints the table.
"""

from __future__ import annotations

import argparse
import logging
from datetime import datetime
from pathlib import Path

from omegaconf import OmegaConf

from src import metrics
from src.cli import exit_on_user_error, writable_folder
from src.config import CONFIG_DIR
from src.errors import require


def parser() -> argparse.ArgumentParser:
    defaults = OmegaConf.load(CONFIG_DIR / "config.yaml").tracking
    names = argparse.ArgumentParser(
        prog="python -m src.compare", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    names.add_argument("--experiment", default=defaults.experiment,
                       help="MLflow experiment (default: tracking.experiment in conf/config.yaml, %(default)s)")
    names.add_argument("--tracking-uri", default=defaults.uri,
                       help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, "
                            "else sqlite:///mlflow.db at the project root)")
    names.add_argument("--agents", type=lambda text: text.split(","), help="comma-separated agent names to keep")
    names.add_argument("--parent", help="keep only the child runs of this parent run id (a sweep)")
    names.add_argument("--metric", default=metrics.CUMULATIVE_REGRET,
                       help="metric history to compare (default: %(default)s)")
    names.add_argument("--group-by", type=lambda text: text.split(","),
                       help="comma-separated parameters that form the groups with the agent, e.g. agent.name "
                            "for the agent alone (default: the agent and every config parameter that differs)")
    names.add_argument("--confidence", type=float, default=0.95, help="level of the t-interval (default: %(default)s)")
    names.add_argument("--out", type=Path, help="output folder (default: outputs/comparison/<time>)")
    return names


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s")
    args = parser().parse_args(argv)
    out = args.out or Path("outputs", "comparison", f"{datetime.now():%Y%m%d-%H%M%S}")
    with exit_on_user_error():
        require(0 < args.confidence < 1, "--confidence", args.confidence, "between 0 and 1")
        if args.out:  # checked before the runs are read; the default folder is made only for a result
            writable_folder(out, "--out")
        # Here: MLflow takes seconds to import, and bad options are refused without it.
        from src.comparison import compare, log_comparison, open_experiment, write

        experiment_id = open_experiment(args.tracking_uri, args.experiment)
        report = compare(experiment_id, args.metric, args.agents, args.parent, args.group_by, args.confidence)
        table = write(report, out, args.metric, args.confidence)
        log_comparison(experiment_id, out, {**{key: value for key, value in vars(args).items() if key != "out"},
                                            "runs": int(report.table["n"].sum())})
    print(table)


if __name__ == "__main__":
    main()
