"""src.evaluate on the Open Bandit Dataset (data=obd), on logs written in its layout from a planted
click model whose values are known: the other logging policy scored against its on-policy value,
policies learnt from the logs, and bad input refused in one line."""

from __future__ import annotations

import mlflow
import numpy as np
import pandas as pd
import pytest

from src import config, data, evaluate
from src.data import obd
from src.errors import UserError

ITEMS = 6
ALPHA, BETA = np.array([8.0, 2.0, 5.0, 1.0, 3.0, 1.0]), np.array([2.0, 8.0, 5.0, 9.0, 3.0, 1.0])
GOOD, BAD = 0.8, 0.1  # a user's click chance on their category's item, and on any other


def click_chance(categories: np.ndarray, items: np.ndarray) -> np.ndarray:
    """User category c likes item c (items 0-2); the rest are clicked at BAD."""
    return np.where(items == categories, GOOD, BAD)


def write_logs(folder, rounds: int = 8000, seed: int = 0) -> dict[str, float]:
    """Both behaviors' logs on campaign `all`, and prior_bts.yaml; return each policy's exact value."""
    rng = np.random.default_rng(seed)
    bts = obd.bernoulli_ts_positions(ALPHA, BETA, 200_000, seed=1)
    values = {}
    for behavior in obd.BEHAVIORS:
        categories = rng.integers(3, size=rounds)
        positions = rng.integers(3, size=rounds)
        if behavior == "random":
            items = rng.integers(ITEMS, size=rounds)
            propensities = np.full(rounds, 1 / ITEMS)
        else:  # Thompson sampling as the logger ran it: a fresh Beta draw ranks the items each round
            ranked = np.argsort(-rng.beta(ALPHA, BETA, size=(rounds, ITEMS)), axis=1)
            items = ranked[np.arange(rounds), positions]
            propensities = bts[items, positions]
        clicks = rng.random(rounds) < click_chance(categories, items)
        frame = pd.DataFrame({
            "timestamp": pd.date_range("2019-11-24", periods=rounds, freq="s").astype(str),
            "item_id": items, "position": positions + 1, "click": clicks.astype(int), "propensity_score": propensities,
            "user_feature_0": np.array(["a1", "b2", "c3"])[categories],
            **{f"user_feature_{i}": rng.choice(["x", "y"], size=rounds) for i in (1, 2, 3)},
            **{f"user-item_affinity_{item}": rng.random(rounds) for item in range(ITEMS)}})
        (folder / behavior / "all").mkdir(parents=True)
        frame.to_csv(folder / behavior / "all" / "all.csv")
        chances = np.array([click_chance(np.full(ITEMS, c), np.arange(ITEMS)) for c in range(3)])  # [category, item]
        values[behavior] = float(np.mean(chances @ (bts if behavior == "bts" else np.full((ITEMS, 3), 1 / ITEMS))))
    (folder / "prior_bts.yaml").write_text(f"all:\n  alpha: {ALPHA.tolist()}\n  beta: {BETA.tolist()}\n")
    return values


@pytest.fixture(scope="module")
def obd_logs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("obd")
    return folder, write_logs(folder)


def run(folder, tmp_path, *overrides: str):
    return evaluate.evaluate(evaluate.parse(["data=obd", f"data.dir={folder}", "data.bts_draws=200000",
                                             f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}", *overrides]))


def test_the_other_logging_policy_is_scored_against_its_on_policy_value(obd_logs, tmp_path):
    folder, values = obd_logs
    result = run(folder, tmp_path, "target_policy=bts")
    own = obd.load(folder, "all", "bts").rewards
    assert result.true_value == pytest.approx(own.mean())
    # The on-policy value is itself an estimate of the exact one, and says so with its interval.
    assert abs(own.mean() - values["bts"]) < 4 * own.std() / np.sqrt(len(own))
    assert "95% t-interval" in result.truth_label
    rows = result.table.set_index("estimator")
    ipw_error = (rows.ci_high.ipw - rows.ci_low.ipw) / (2 * 1.96)
    for name in ("ipw", "dr", "snipw"):
        assert abs(rows.estimate[name] - values["bts"]) < 4 * ipw_error, name
    assert rows.relative_error.ipw == pytest.approx((rows.estimate.ipw - own.mean()) / own.mean())
    store = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    logged = store.get_run(result.run_id)
    assert logged.info.status == "FINISHED" and logged.data.tags["ope.target_policy"] == "bts"
    assert store.get_experiment(logged.info.experiment_id).name == "open_bandit_dataset"
    assert logged.data.metrics["ope/true_value"] == pytest.approx(own.mean())
    assert logged.data.metrics["ope/ipw"] == pytest.approx(rows.estimate.ipw)


@pytest.mark.parametrize("learner", ["ipw_learner", "linucb"])
def test_a_policy_learnt_from_the_logs_is_scored_on_the_rest(obd_logs, tmp_path, learner):
    """The planted best item per user category is learnable: the learnt ranking (best item at the
    first position) is worth (GOOD + 2 BAD) / 3, far above the uniform logger's value."""
    folder, values = obd_logs
    result = run(folder, tmp_path, f"target_agent={learner}", "train_share=0.5")
    learnt = (GOOD + 2 * BAD) / 3
    assert np.isnan(result.true_value) and "unknown" in result.truth_label and result.rounds == 4000
    rows = result.table.set_index("estimator")
    for name in ("ipw", "dr"):
        spread = (rows.ci_high[name] - rows.ci_low[name]) / (2 * 1.96)
        assert abs(rows.estimate[name] - learnt) < 4 * spread, name
        assert rows.ci_low[name] > values["random"], name
    assert "error" not in evaluate.report(result).splitlines()[-12]


@pytest.mark.parametrize("overrides, message", [
    (["data=obd", "target_policy=bts"], "data.dir must be the Open Bandit Dataset folder"),
    (["data=obd", "data.dir=/nowhere", "target_policy=bts"], "data.dir=/nowhere is not a directory"),
    (["data=obd", "data.dir=/nowhere", "target_run_id=abc"], "give exactly one of target_policy= and target_agent= with data=obd"),
    (["data=obd", "data.dir=/nowhere", "target_policy=bts", "logs_run_id=abc"], "drop logs_run_id="),
    (["data=movielens", "target_policy=bts"], "data=movielens: src.evaluate reads MovieLens where the logs' run read it"),
    (["target_policy=bts", "logs_run_id=abc"], "give exactly one of target_run_id=, target_model_uri= and target_agent="),
])
def test_bad_input_is_one_line_before_anything_is_read(overrides, message, tmp_path):
    with pytest.raises(UserError) as refused:
        evaluate.parse([*overrides, f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}"])
    assert message in str(refused.value) and "\n" not in str(refused.value)


def test_a_behavior_scored_as_its_own_target_and_training_on_obd_are_refused(obd_logs, tmp_path):
    folder, _ = obd_logs
    with pytest.raises(UserError, match="target_policy must be the other logging policy than data.behavior=random"):
        run(folder, tmp_path, "target_policy=random")
    with pytest.raises(UserError, match="data=obd holds logged clicks, not ratings"):
        data.load(config.compose(["data=obd", f"data.dir={folder}"]).data)
