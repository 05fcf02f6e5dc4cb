"""Off-policy evaluation on real logged feedback: the Open Bandit Dataset, Open Bandit Pipeline's
protocol (Saito et al., NeurIPS 2021 Datasets and Benchmarks, Sec. 5).

    uv run python -m benchmarks.obd_ope --obd-dir /path/to/obd --out /tmp/obd
    uv run python -m benchmarks.obd_ope --obd-dir /path/to/obd --out /tmp/obd --obp-python /tmp/obp/bin/python

Two policies logged the same traffic at once: uniform `random` and Bernoulli Thompson sampling
`bts`. Each policy's value is known on-policy, the mean click of its own log; each estimator
estimates it off-policy from the other's log, and its relative error is |estimate - on-policy| /
on-policy. The target's chance of each item at each position: uniform (1 / items) for random,
and for bts the share of `--draws` samples of its published Beta priors that rank the item there
(src.data.obd.bernoulli_ts_positions, as obp's `compute_batch_action_dist`). Every estimator of
src.evaluation.estimators runs on it with its reward model (a ridge per item on the one-hot user
features and affinities) cross-fitted as conf/evaluate.yaml says; the relative error's 95%
interval is a percentile bootstrap over the log's rounds (`--samples`, estimates re-made on each
resample with the same reward estimates). With `--obp-python`, obp 0.5.7's estimators (loaded as
in benchmarks/obp_crosscheck.py) take the same inputs in that interpreter and their estimates
stand beside ours. Each direction is an MLflow run in experiment `open_bandit_dataset` (where
`src.evaluate data=obd` logs too): per estimator its estimate, relative error and interval, and
obp's estimate; the table and the figure as artifacts.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

# What each of our estimators is called in obp 0.5.7, where it has it.
OBP_NAMES = {"dm": "DirectMethod", "ipw": "InverseProbabilityWeighting",
             "snipw": "SelfNormalizedInverseProbabilityWeighting", "dr": "DoublyRobust",
             "sndr": "SelfNormalizedDoublyRobust", "switch_dr": "SwitchDoublyRobust",
             "dr_os": "DoublyRobustWithShrinkage", "sg_ipw": "SubGaussianInverseProbabilityWeighting"}


def obp_side(inputs: Path) -> None:
    """In obp's interpreter: its estimators' values on the saved inputs, as JSON on stdout."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from obp_crosscheck import load_obp_estimators

    estimators, _ = load_obp_estimators()
    saved = np.load(inputs)
    values = {}
    for name, hyperparameters in json.loads(str(saved["hyperparameters"])).items():
        estimator = getattr(estimators, OBP_NAMES[name])(**hyperparameters)
        values[name] = float(estimator.estimate_policy_value(
            reward=saved["reward"], action=saved["action"], position=saved["position"], pscore=saved["pscore"],
            action_dist=saved["action_dist"], estimated_rewards_by_reg_model=saved["q"]))
    print(json.dumps(values))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--obd-dir", type=Path, required=True, help="the Open Bandit Dataset folder")
    parser.add_argument("--out", type=Path, help="folder for results.csv and the figure")
    parser.add_argument("--campaign", default="all")
    parser.add_argument("--draws", type=int, default=100_000, help="Beta samples for the bts policy's probabilities")
    parser.add_argument("--samples", type=int, default=200, help="bootstrap resamples")
    parser.add_argument("--obp-python", help="an interpreter with obp 0.5.7 (benchmarks/obp_crosscheck.py)")
    parser.add_argument("--tracking-uri", help="the MLflow store (default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)")
    parser.add_argument("--obp-side", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.obp_side:
        obp_side(args.obp_side)
        return
    if args.out is None:
        parser.error("--out is required")
    study(args)


def study(args) -> None:
    import pandas as pd

    from src import config
    from src.data import obd
    from src.evaluation import estimators, real_logs

    evaluate_cfg = config.compose([], config_name="evaluate")
    logs = {behavior: obd.load(args.obd_dir, args.campaign, behavior) for behavior in obd.BEHAVIORS}
    items = logs["random"].num_items
    alpha, beta = obd.bts_priors(args.obd_dir, args.campaign)
    targets = {"random": np.full((items, obd.POSITIONS), 1 / items),
               "bts": obd.bernoulli_ts_positions(alpha, beta, args.draws, seed=12345)}
    chosen = {name: estimator().for_actions(items) for name, estimator in estimators.ESTIMATORS.items()}
    rows, beside = [], []
    rng = np.random.default_rng(0)
    for target, logger in (("bts", "random"), ("random", "bts")):
        log, truth = logs[logger], float(logs[target].rewards.mean())
        feedback = estimators.Feedback(log.contexts, log.actions, log.rewards, log.propensities)
        probabilities = targets[target][:, log.positions].T  # [n, items]: the target at each round's position
        q = estimators.cross_fitted_rewards(feedback, items, evaluate_cfg.reward_model_ridge,
                                            evaluate_cfg.reward_model_folds)
        terms = estimators.terms(feedback, probabilities, q)
        resamples = [rng.integers(len(feedback), size=len(feedback)) for _ in range(args.samples)]
        for name, estimator in chosen.items():
            estimate = estimator.estimate(terms)
            errors = np.array([abs(estimator.estimate(terms.take(rows_)) - truth) / truth for rows_ in resamples])
            rows.append({"target": target, "logs": logger, "estimator": name, "on_policy": truth,
                         "estimate": estimate, "relative_error": abs(estimate - truth) / truth,
                         "ci_low": np.quantile(errors, 0.025), "ci_high": np.quantile(errors, 0.975)})
        if args.obp_python:
            beside += obp_estimates(args, log, targets[target], q, chosen, target, logger)
    table = pd.DataFrame(rows)
    if beside:
        table = table.merge(pd.DataFrame(beside), on=["target", "logs", "estimator"], how="left")
        table["difference"] = table.estimate - table.obp_estimate
    args.out.mkdir(parents=True, exist_ok=True)
    table.to_csv(args.out / "results.csv", index=False)
    chart = figure(table)
    chart.savefig(args.out / "relative_error.png", dpi=110)
    run_ids = log_runs(args, table, chart)
    for (target, logger), part in table.groupby(["target", "logs"], sort=False):
        print(f"\n{target}'s value from {logger}'s {len(logs[logger].rewards):,} rounds; on-policy "
              f"{part.on_policy.iloc[0]:.5f} (mean click of its own log)\n")
        print(part.drop(columns=["target", "logs", "on_policy"]).to_string(index=False, float_format="{:.5f}".format,
                                                                           formatters={"difference": "{:.1e}".format}))
    print(f"\nTable and figure in {args.out}; MLflow runs {', '.join(run_ids)} in experiment {real_logs.EXPERIMENT}")


def log_runs(args, table, chart) -> list[str]:
    """One MLflow run per direction (target from logs), its estimators' figures as metrics."""
    import mlflow

    from src import tracking
    from src.evaluation import estimators, real_logs

    experiment_id = tracking.connect(args.tracking_uri, real_logs.EXPERIMENT)
    run_ids = []
    for (target, logger), part in table.groupby(["target", "logs"], sort=False):
        tags = {tracking.ROLE_TAG: "evaluation", "ope.logs": f"obd/{logger}/{args.campaign}",
                "ope.target_policy": target, "mlflow.note.content":
                f"benchmarks.obd_ope: {target}'s value estimated from {logger}'s logs against its on-policy value."}
        with mlflow.start_run(experiment_id=experiment_id, run_name=f"obd_ope__{target}__from__{logger}",
                              tags=tags) as active:
            mlflow.log_params({"campaign": args.campaign, "draws": args.draws, "samples": args.samples,
                               "target": target, "logs": logger})
            mlflow.log_metric(estimators.TRUE_VALUE, float(part.on_policy.iloc[0]))
            for row in part.itertuples():
                name = estimators.metric_name(row.estimator)
                values = {name: row.estimate, f"{name}_relative_error": row.relative_error,
                          f"{name}_relative_error_ci_low": row.ci_low, f"{name}_relative_error_ci_high": row.ci_high,
                          f"{name}_obp": getattr(row, "obp_estimate", float("nan"))}
                mlflow.log_metrics({key: float(value) for key, value in values.items() if np.isfinite(value)})
            mlflow.log_table(part, "results.json")
            mlflow.log_figure(chart, "relative_error.png")
            run_ids.append(active.info.run_id)
    return run_ids


def obp_estimates(args, log, by_position: np.ndarray, q, chosen, target, logger) -> list[dict]:
    """obp's estimates on the same inputs (the target's [items, positions] probabilities), run in
    `args.obp_python`."""
    hyperparameters = {name: obp_hyperparameters(estimator) for name, estimator in chosen.items() if name in OBP_NAMES}
    # obp's action_dist is [n, items, positions] and reads each round's position from it.
    action_dist = np.broadcast_to(by_position[None], (len(log.actions), *by_position.shape)).copy()
    q3 = np.repeat(q[:, :, None], by_position.shape[1], axis=2)
    with tempfile.TemporaryDirectory() as scratch:
        inputs = Path(scratch) / "inputs.npz"
        np.savez(inputs, reward=log.rewards, action=log.actions, position=log.positions, pscore=log.propensities,
                 action_dist=action_dist, q=q3, hyperparameters=json.dumps(hyperparameters))
        done = subprocess.run([args.obp_python, __file__, "--obd-dir", str(args.obd_dir), "--obp-side", str(inputs)],
                              capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"obp's side failed in {args.obp_python}: {done.stderr.strip().splitlines()[-1]}")
    return [{"target": target, "logs": logger, "estimator": name, "obp_estimate": value}
            for name, value in json.loads(done.stdout).items()]


def obp_hyperparameters(estimator) -> dict:
    """Our estimator's hyperparameters under obp's names: its switching threshold tau is obp's lambda_."""
    values = {name: value for name, value in vars(estimator).items() if name in ("tau", "lambda_")}
    return {"lambda_" if name == "tau" else name: float(value) for name, value in values.items()}


def figure(table):
    from matplotlib.figure import Figure

    chart = Figure(figsize=(9, 4), layout="constrained")
    for axis, ((target, logger), part) in zip(chart.subplots(1, 2, sharey=True), table.groupby(["target", "logs"],
                                                                                            sort=False)):
        positions = np.arange(len(part))
        # The point need not lie inside the interval: |error| is not linear in the resampled estimate.
        axis.hlines(positions, part.ci_low, part.ci_high, color="tab:blue", alpha=0.5)
        axis.plot(part.relative_error, positions, "o", color="tab:blue")
        axis.set_yticks(positions, part.estimator)
        axis.invert_yaxis()
        axis.set(title=f"{target} from {logger}'s logs", xlabel="relative error (95% bootstrap)")
        axis.grid(alpha=0.3, axis="x")
    chart.suptitle("Off-policy estimates on the Open Bandit Dataset against the on-policy value")
    return chart


if __name__ == "__main__":
    main()
