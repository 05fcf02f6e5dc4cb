"""Replica groups (src.replicas): R runs trained side by side (or in turn) equal the runs alone, to
the digit, and are tracked as R ordinary MLflow runs; what they cannot carry is refused in one line."""

from __future__ import annotations

import mlflow
import numpy as np
import pandas as pd
import pytest
import tensorflow as tf
from omegaconf import OmegaConf

from src import config, data, experiment, metrics, replicas, shared_compilation, tracking, training
from src.engine import Engine
from src.errors import UserError
from tests.conftest import breaking_after_first_chunk


def histories(cfg, cores: int = 1) -> list[pd.DataFrame]:
    """Each replica's per-loop metrics (one frame for a run alone), alike replicas in `cores` loops."""
    return group_histories(config.members(cfg), cores)


def group_histories(members, cores: int = 1) -> list[pd.DataFrame]:
    """Each member's per-loop metrics, trained as one group."""
    group = replicas.Group(members, replicas.each_dataset(members), cores)
    kept = [metrics.RegretHistory(group.interactions_per_loop(index)) for index in range(group.size)]
    for chunks in group.run():
        for index, chunk in chunks.items():
            kept[index].add(chunk)
    return [history.frame() for history in kept]


@pytest.mark.parametrize("overrides", [["agent=linucb"], ["agent=lints"], ["agent=linucb", "agent.discount=0.9"],
                                       ["agent=lints", "env.movie_selection=most_rated", "training.batch_size=3"],
                                       ["env=movielens_per_arm", "env.num_actions=5", "agent=lints"],
                                       ["env=movielens_per_arm", "env.num_actions=4", "env.arm_features=interaction", "agent=linucb"]])
@pytest.mark.parametrize("cores", [1, 2])
def test_each_replica_equals_its_run_alone_to_the_digit(make_config, overrides, cores):
    """In one compiled loop, or (2 cores) a loop of 2 and a run alone in threads side by side."""
    cfg = make_config(*overrides, "training.replicas=3", "training.seed=4")
    assert config.shares_ops(cfg)
    group = histories(cfg, cores)
    for replica, replica_history in enumerate(group):
        alone = histories(make_config(*overrides, f"training.seed={4 + replica}"))[0]
        pd.testing.assert_frame_equal(replica_history, alone, check_exact=True)
    # Replicas are independent runs, not copies of one.
    assert group[0][metrics.CUMULATIVE_REGRET].iloc[-1] != group[1][metrics.CUMULATIVE_REGRET].iloc[-1]


@pytest.mark.parametrize("overrides", [["agent=epsilon_greedy"], ["agent=dropout_ts"], ["agent=random"],
                                       ["env=movielens_per_arm", "env.num_actions=5", "env.drift=rotate", "agent=lints"],
                                       ["env=movielens_switch"],
                                       ["env.delay=geometric", "env.delay_loops=2"], ["agent.window=40"],
                                       ["agent=epsilon_greedy", "training.jit_compile=true"]])
def test_replicas_that_share_no_ops_train_in_turn_each_equal_to_its_run_alone(make_config, overrides):
    cfg = make_config(*overrides, "training.replicas=2", "training.seed=7")
    assert not config.shares_ops(cfg)
    group = histories(cfg, cores=2)  # in threads side by side
    for replica, replica_history in enumerate(group):
        alone = histories(make_config(*overrides, f"training.seed={7 + replica}"))[0]
        pd.testing.assert_frame_equal(replica_history, alone, check_exact=True)
    assert not group[0].equals(group[1])


@pytest.mark.parametrize("overrides", [["agent=epsilon_greedy"], ["agent=dropout_ts"], ["agent=neural_boltzmann"],
                                       ["agent=random"], ["agent=epsilon_greedy", "env=movielens_per_arm",
                                                          "env.num_actions=5"],
                                       ["agent=ranking", "env=movielens_ranking", "env.num_actions=6",
                                        "env.slate_size=3"],
                                       ["agent=epsilon_greedy", "env=movielens_ratings", "env.num_movies=null", "env.num_actions=4"]])
def test_replicas_xla_compiles_train_in_turn_on_one_compilation_each_equal_to_its_run_alone(make_config, overrides):
    cfg = make_config(*overrides, "training.jit_compile=true", "training.replicas=3", "training.seed=5")
    assert config.shares_compilation(cfg) and not config.shares_ops(cfg)
    members = config.members(cfg)
    group = replicas.Group(members, replicas.each_dataset(members), cores=1)
    assert group.describe() == "3 in turn on one compilation"
    trained = group_histories(members)
    for replica, replica_history in enumerate(trained):
        alone_cfg = make_config(*overrides, "training.jit_compile=true", f"training.seed={5 + replica}")
        alone = experiment.assemble(alone_cfg, data.load(alone_cfg.data))
        history = metrics.RegretHistory(alone.interactions_per_loop)
        for chunk in alone.run(alone_cfg.training.loops, alone_cfg.training.chunk_loops):
            history.add(chunk)
        pd.testing.assert_frame_equal(replica_history, history.frame(), check_exact=True)
    assert not trained[0].equals(trained[1])


def test_a_replica_on_one_compilation_leaves_the_policy_its_run_alone_leaves(make_config):
    overrides = ["agent=neural_boltzmann", "training.jit_compile=true"]
    cfg = make_config(*overrides, "training.replicas=2", "training.seed=1")
    members = config.members(cfg)
    group = replicas.Group(members, replicas.each_dataset(members), cores=1)
    for _ in group.run():
        pass
    alone_cfg = make_config(*overrides, "training.seed=2")
    alone = experiment.assemble(alone_cfg, data.load(alone_cfg.data))
    for _ in alone.run(alone_cfg.training.loops, alone_cfg.training.chunk_loops):
        pass
    time_step = alone.environment.reset()
    scores = [policy.distribution(time_step).action.logits.numpy() for policy in (group.policy(1), alone.agent.policy)]
    np.testing.assert_array_equal(*scores)
    assert not np.array_equal(group.policy(0).distribution(time_step).action.logits.numpy(), scores[1])


def test_a_member_stopped_on_one_compilation_trains_no_further(make_config):
    cfg = make_config("agent=epsilon_greedy", "training.jit_compile=true", "training.replicas=2",
                      "training.chunk_loops=10")
    members = config.members(cfg)
    group = replicas.Group(members, replicas.each_dataset(members), cores=1)
    (part, _), = group.parts
    rounds = group.run()
    assert set(next(rounds)) == {0, 1}
    group.stopped.add(1)
    stopped_state = [variable.numpy() for _, variable in part._pairs[1]]
    assert [set(chunks) for chunks in rounds] == [{0}] * (cfg.training.loops // 10 - 1)
    for before, (_, variable) in zip(stopped_state, part._pairs[1]):
        np.testing.assert_array_equal(before, variable.numpy())


def test_runs_whose_traced_loops_differ_compile_a_loop_each(make_config, monkeypatch, caplog):
    """Not expected of runs alike but for their seeds; should it happen, they still train, apart."""
    def differ(host, run):
        raise shared_compilation.Unshareable("their traced loops differ")

    monkeypatch.setattr(shared_compilation, "paired_variables", differ)
    cfg = make_config("agent=random", "training.jit_compile=true", "training.replicas=2", "training.seed=3")
    members = config.members(cfg)
    group = replicas.Group(members, replicas.each_dataset(members), cores=1)
    assert group.describe() == "2 on engines of their own"
    assert "compile a loop each (their traced loops differ)" in caplog.text
    alone = histories(make_config("agent=random", "training.jit_compile=true", "training.seed=4"))[0]
    pd.testing.assert_frame_equal(group_histories(members)[1], alone, check_exact=True)


def test_one_compilation_serves_runs_that_differ_in_their_seeds_only(make_config):
    dataset = data.load(make_config().data)
    first, second, other = (shared_compilation.traced(make_config("agent=epsilon_greedy", "training.jit_compile=true",
                                                                  *overrides), dataset)
                            for overrides in (["training.seed=0"], ["training.seed=1"], ["agent.epsilon=0.2"]))
    pairs = shared_compilation.paired_variables(first, second)
    assert pairs and all(mine is not theirs for mine, theirs in pairs)
    # Initial weights differ by seed: they are variables, copied, not part of the program.
    assert any(not np.array_equal(mine.numpy(), theirs.numpy()) for mine, theirs in pairs)
    with pytest.raises(shared_compilation.Unshareable, match="traced loops differ"):
        shared_compilation.paired_variables(first, other)  # epsilon is a constant of the program


def test_a_program_differs_by_its_ops_whatever_its_nodes_are_called():
    """Names are placed only where a name is: a node named after its program's op does not make
    x + x and x - x one program."""
    def program(op):
        def loop(x):
            tf.constant(0.0, name="Add" if op is tf.raw_ops.Add else "Sub")
            return op(x=x, y=x, name="out")

        traced = tf.function(loop, autograph=False).get_concrete_function(tf.TensorSpec([], tf.float32))
        return shared_compilation.canonical_program(traced.graph.as_graph_def())

    assert program(tf.raw_ops.Add) != program(tf.raw_ops.Sub)
    assert program(tf.raw_ops.Add) == program(tf.raw_ops.Add)


@pytest.mark.parametrize("agent", ["linucb", "lints"])
@pytest.mark.parametrize("env", [[], ["env=movielens_per_arm", "env.num_actions=5"]])
def test_runs_of_other_seeds_alphas_and_ridges_share_one_loop_each_equal_to_its_run_alone(make_config, agent, env):
    runs = [[*env, f"agent={agent}", "training.seed=0", "agent.alpha=0.5"],
            [*env, f"agent={agent}", "training.seed=0", "agent.alpha=4.0", "agent.tikhonov_weight=0.1"],
            [*env, f"agent={agent}", "training.seed=9", "agent.alpha=0.5"],
            [*env, f"agent={agent}", "training.seed=0", "env.rank_k=3"]]  # another shape: trained alone
    members = [make_config(*run) for run in runs]
    group = replicas.Group(members, replicas.each_dataset(members), cores=1)
    assert [len(indices) for _, indices in group.parts] == [3, 1]
    # On 2 cores the 3 alike members are a loop of 2 and a run alone, each part in its thread.
    on_two = replicas.Group(members, replicas.each_dataset(members), cores=2)
    assert [len(indices) for _, indices in on_two.parts] == [2, 1, 1]
    together = group_histories(members)
    for run, history in zip(runs, together):
        pd.testing.assert_frame_equal(history, histories(make_config(*run))[0], check_exact=True)
    assert not together[0].equals(together[1])


def diverging_at_call(monkeypatch, call: int) -> None:
    """The `call`-th chunk checked (members in turn, round after round) diverges."""
    real_check, calls = training.check_finite, iter(range(1, 10**6))
    monkeypatch.setattr(training, "check_finite",
                        lambda rows, loss: real_check(rows, loss * np.nan if next(calls) == call else loss))


def test_a_member_that_diverges_or_is_stopped_ends_alone_the_others_finish(make_config, tracking_uri, monkeypatch):
    members = [make_config(f"training.seed={seed}") for seed in range(3)]
    training_cfg = members[0].training
    chunk_interactions = training_cfg.chunk_loops * training_cfg.batch_size * training_cfg.steps_per_loop

    def stop_after_two_chunks(step, value, run_id):
        if step >= 2 * chunk_interactions:
            raise tracking.RunStopped(f"stopped at {step}")

    diverging_at_call(monkeypatch, 3)  # the third member's first chunk
    trained = replicas.train_members(members, [{}] * 3, [None, stop_after_two_chunks, None])
    found = group_runs(tracking_uri)
    assert list(found["status"]) == ["FINISHED", "KILLED", "FAILED"]
    assert trained[0].stopped is None and isinstance(trained[1].stopped, tracking.RunStopped)
    assert "diverged" in str(trained[2].stopped)
    client = mlflow.MlflowClient()
    logged = [len(client.get_metric_history(run_id, metrics.CUMULATIVE_REGRET)) for run_id in found.run_id]
    assert logged == [members[0].training.loops, 2 * members[0].training.chunk_loops, members[0].training.chunk_loops]
    assert all("metrics.csv" in {item.path for item in client.list_artifacts(run_id)} for run_id in found.run_id)
    # The one that finished is its run alone.
    alone = histories(make_config("training.seed=0"))[0]
    assert trained[0].final[metrics.CUMULATIVE_REGRET] == alone[metrics.CUMULATIVE_REGRET].iloc[-1]


def test_a_replica_that_diverges_fails_the_command_after_the_others_finish(make_config, tracking_uri, monkeypatch):
    diverging_at_call(monkeypatch, 2)
    with pytest.raises(UserError, match=r"1 of the group's 2 runs stopped, the others finished: run \w+ \(seed 1\)"):
        replicas.train_group(make_config("training.replicas=2"))
    assert list(group_runs(tracking_uri)["status"]) == ["FINISHED", "FAILED"]


@pytest.mark.parametrize("overrides", [["agent=linucb"], ["agent=lints"],
                                       ["agent=linucb", "env=movielens_per_arm", "env.num_actions=5"]])
def test_a_replicas_policy_is_the_one_its_run_alone_leaves(make_config, overrides):
    cfg = make_config(*overrides, "training.replicas=2", "training.seed=1")
    group = replicas.SharedOps(config.members(cfg), data.load(cfg.data))
    for _ in group.run(cfg.training.loops, cfg.training.chunk_loops):
        pass
    alone_cfg = make_config(*overrides, "training.seed=2")
    alone = experiment.assemble(alone_cfg, data.load(alone_cfg.data))
    for _ in alone.run(alone_cfg.training.loops, alone_cfg.training.chunk_loops):
        pass
    policy = group.policy(1)
    time_step = alone.environment.reset()
    ours, theirs = policy.action(time_step), alone.agent.policy.action(time_step)
    np.testing.assert_array_equal(ours.action.numpy(), theirs.action.numpy())
    np.testing.assert_array_equal(ours.info.predicted_rewards_mean.numpy(), theirs.info.predicted_rewards_mean.numpy())
    other = group.policy(0)
    assert not np.array_equal(other.action(time_step).info.predicted_rewards_mean.numpy(),
                              theirs.info.predicted_rewards_mean.numpy())


def group_runs(tracking_uri: str) -> pd.DataFrame:
    mlflow.set_tracking_uri(tracking_uri)
    return mlflow.search_runs(experiment_names=["movielens-bandits"], order_by=["params.`training.seed`"])


def test_a_group_is_tracked_as_ordinary_runs_one_per_seed(make_config, tracking_uri):
    cfg = make_config("training.replicas=3", "training.seed=2", "tracking.log_every=1")
    finals = replicas.train_group(cfg)
    found = group_runs(tracking_uri)
    assert list(found["status"]) == ["FINISHED"] * 3
    assert list(found["params.training.seed"]) == ["2", "3", "4"]
    assert set(found["params.training.replicas"]) == {"1"}  # each run's config reproduces it alone
    assert found["tags.bandits.replica_group"].nunique() == 1
    assert list(found["tags.bandits.replica"]) == ["0/3", "1/3", "2/3"]
    assert [name.split("·")[-1] for name in found["tags.mlflow.runName"]] == ["s2", "s3", "s4"]
    client = mlflow.MlflowClient()
    for (final, run_id), (_, run) in zip(finals, found.iterrows()):
        assert run_id == run.run_id
        assert run[f"metrics.{metrics.CUMULATIVE_REGRET}"] == pytest.approx(final[metrics.CUMULATIVE_REGRET])
        assert len(client.get_metric_history(run_id, metrics.CUMULATIVE_REGRET)) == cfg.training.loops
        assert {"config.yaml", "metrics.csv", "regret.png"} <= {item.path for item in client.list_artifacts(run_id)}
    # The run alone of the middle seed ends where its replica did.
    alone = histories(make_config("training.seed=3"))[0]
    assert alone[metrics.CUMULATIVE_REGRET].iloc[-1] == pytest.approx(finals[1][0][metrics.CUMULATIVE_REGRET])


@pytest.mark.parametrize("interruption, status", [(RuntimeError("boom"), "FAILED"), (KeyboardInterrupt(), "KILLED")])
def test_a_group_that_breaks_marks_every_run_and_keeps_what_they_logged(make_config, tracking_uri, monkeypatch,
                                                                        interruption, status):
    monkeypatch.setattr(Engine, "run_replicas", breaking_after_first_chunk(Engine.run_replicas, interruption))
    with pytest.raises(type(interruption)):
        replicas.train_group(make_config("training.replicas=2", "tracking.log_every=1"))
    found = group_runs(tracking_uri)
    assert list(found["status"]) == [status] * 2
    client = mlflow.MlflowClient()
    for run_id in found.run_id:
        assert len(client.get_metric_history(run_id, metrics.CUMULATIVE_REGRET)) == 20  # the first chunk
        assert "metrics.csv" in {item.path for item in client.list_artifacts(run_id)}


@pytest.mark.parametrize("override, message", [
    (["training.replicas=0"], "an integer >= 1"),
    (["training.replicas=-3"], "an integer >= 1"),
    (["training.replicas=2", "tracking.log_interactions=true"], "tracking.log_interactions"),
    (["training.replicas=2", "objective=ope/dr", "offline.logs_run_id=abc"], "offline learning"),
    (["training.replicas=100000", "env.num_movies=1682", "env.rank_k=100"], "half of this machine's"),
])
def test_what_replicas_cannot_carry_is_refused_in_one_line(override, message):
    with pytest.raises(UserError, match="training.replicas") as error:
        config.check_run(config.compose(override))
    assert message in str(error.value) and "\n" not in str(error.value)


def test_replicas_on_the_command_line_are_refused_before_tensorflow_loads(run_cli, data_overrides, tracking_uri):
    result = run_cli("src.train", *data_overrides, f"tracking.uri={tracking_uri}", "training.replicas=2",
                     "tracking.log_interactions=true")
    assert result.returncode == 2, result.stderr[-2000:]
    assert "training.replicas" in result.stderr and "Loading TensorFlow" not in result.stderr
    assert "Traceback" not in result.stderr


def test_the_cli_trains_a_group(run_cli, data_overrides, tracking_uri):
    from tests.conftest import SMALL

    result = run_cli("src.train", *data_overrides, *SMALL, f"tracking.uri={tracking_uri}", "training.replicas=2",
                     "agent=epsilon_greedy", "tracking.save_policy=true")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Training 2 runs together (2 on engines of their own), epsilon_greedy" in result.stderr and result.stderr.count("finished: run") == 2
    found = group_runs(tracking_uri)
    assert list(found["status"]) == ["FINISHED"] * 2
    for run_id in found.run_id:  # each replica's own policy, as a run alone saves it
        assert "policy" in {item.path for item in mlflow.MlflowClient().list_artifacts(run_id)}


def test_a_replicated_statistics_scores_each_replicas_users_against_its_own_arms():
    from src.agents.linear import ArmStatistics

    group = ArmStatistics(num_arms=3, dim=2, tikhonov_weight=1.0, replicas=2)
    rows = tf.constant([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [2.0, 0.0]], tf.float64)
    # Replica 0 rewards arm 1 (rows 0-1), replica 1 arm 2 (rows 2-3).
    group.update(rows, group.global_arms(tf.constant([1, 1, 2, 2])), tf.constant([1.0, 1.0, 3.0, 3.0], tf.float64))
    mean, _ = group.every_arm(tf.constant([[1.0, 1.0], [1.0, 1.0]], tf.float32))
    best = np.argmax(mean.numpy(), axis=1)
    assert list(best) == [1, 2]


def test_a_large_group_writes_its_histories_one_at_a_time_and_finishes(make_config, tracking_uri):
    # 20 runs logging every loop: a writer each would hold more connections than MLflow's pool has.
    replicas.train_group(make_config("training.replicas=20", "tracking.log_every=1", "training.loops=40"))
    found = group_runs(tracking_uri)
    assert list(found["status"]) == ["FINISHED"] * 20
    client = mlflow.MlflowClient()
    assert all(len(client.get_metric_history(run_id, metrics.CUMULATIVE_REGRET)) == 40 for run_id in found.run_id)
    # Where it came from, as a run of its own says it; and the group's rate beside its own share.
    assert set(found["tags.mlflow.source.name"].dropna()) and set(found["tags.mlflow.user"].dropna())
    rates = found[f"metrics.{metrics.GROUP_INTERACTIONS_PER_S}"] / found[f"metrics.{metrics.INTERACTIONS_PER_S}"]
    assert np.allclose(rates, 20, rtol=1e-4)


def test_a_replica_whose_artifacts_the_store_refuses_fails_alone_and_keeps_them_on_disk(
        make_config, tracking_uri, monkeypatch, tmp_path):
    real_log_tables, calls = replicas.training.log_tables, []

    def refuses_the_second(*args):
        calls.append(1)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        real_log_tables(*args)

    monkeypatch.setattr(replicas.training, "log_tables", refuses_the_second)
    monkeypatch.setattr(replicas.training, "UNLOGGED", tmp_path / "unlogged")
    with pytest.raises(UserError, match="1 of the group's runs could not write") as error:
        replicas.train_group(make_config("training.replicas=3"))
    found = group_runs(tracking_uri)
    assert list(found["status"]) == ["FINISHED", "FAILED", "FINISHED"]
    assert str(tmp_path / "unlogged" / found.run_id.iloc[1]) in str(error.value)
    assert (tmp_path / "unlogged" / found.run_id.iloc[1] / "metrics.csv").is_file()
    assert "metrics.csv" in {item.path for item in mlflow.MlflowClient().list_artifacts(found.run_id.iloc[2])}


def test_a_config_logged_before_replicas_still_passes_the_checks():
    cfg = config.compose([])
    OmegaConf.set_struct(cfg, False)
    del cfg.training["replicas"]
    config.check_run(cfg)


def test_the_last_replicas_seed_must_be_a_seed():
    with pytest.raises(UserError, match="last replica's seed"):
        config.check_run(config.compose(["training.seed=2147483647", "training.replicas=2"]))


def test_a_campaign_refuses_replicas_before_its_study_is_made(data_overrides, tmp_path):
    from src.campaigns import study

    cfg = study.compose_sweep(["hparams_search=linucb", *data_overrides, "training.replicas=2",
                               f"hydra.sweeper.storage=sqlite:///{tmp_path / 'optuna.db'}",
                               f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}"])
    with pytest.raises(UserError, match="training.replicas must be 1 in a campaign"):
        study.prepare(cfg)
    assert not (tmp_path / "optuna.db").exists() and not (tmp_path / "mlflow.db").exists()


# Found by a hostile try: a group on every movie of the data (env.num_movies null) was sized as
# None x rank x rank, a traceback.
@pytest.mark.parametrize("env", ["movielens_per_arm", "movielens_ratings", "movielens_timeline"])
def test_a_group_over_every_movie_of_the_data_is_sized_before_the_data_loads(env):
    config.check_run(config.compose([f"env={env}", "training.replicas=3"]))
    with pytest.raises(UserError, match="half of this machine's"):
        config.check_run(config.compose([f"env={env}", "training.replicas=5000000"]))
