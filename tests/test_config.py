"""src.config: composing conf/, the group-choice and type checks, and errors naming their YAML."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
import tensorflow as tf
from tf_agents.specs import tensor_spec
from tf_agents.trajectories import time_step as ts

from src import config, data
from src.agents import build_agent
from src.errors import UserError
from src.paths import PROJECT_ROOT


def test_compose_gives_the_cli_config_with_overrides():
    cfg = config.compose(["agent=lints", "agent.alpha=2"])
    assert cfg.agent.name == "lints" and cfg.agent.alpha == 2
    assert cfg.data.name == "movielens" and cfg.env.name == "movielens"
    assert "hydra" not in cfg
    assert config.compose(["hparams_search=linucb"], with_hydra=True).hydra.sweeper.study_name == "linucb"
    assert config.compose(config_name="predict").run_id is None


@pytest.mark.parametrize("command", ["predict", "evaluate", "retrain", "pipeline"])
def test_a_commands_help_is_its_usage_and_its_options_file(command):
    result = subprocess.run([sys.executable, "-m", f"src.{command}", "--help"], cwd=PROJECT_ROOT, capture_output=True,
                            text=True, timeout=120)
    options = (config.CONFIG_DIR / f"{command}.yaml").read_text()
    assert result.returncode == 0 and result.stdout.startswith(f"usage: python -m src.{command} ")
    assert options in result.stdout and not result.stderr.strip()


# Found by a hostile try: each was a traceback, or (pipeline) a failure after a champion was trained.
@pytest.mark.parametrize("command, overrides, message", [
    ("evaluate", ["confidence=abc"], "confidence must be a finite number, got 'abc'"),
    ("evaluate", ["confidence=null"], "confidence must be a finite number, got None"),
    ("evaluate", ["bootstrap.seed=abc"], "bootstrap.seed must be a finite number, got 'abc'"),
    ("pipeline", ["feedback.drop=abc"], "feedback.drop must be a finite number, got 'abc'"),
    ("pipeline", ["challenger=null"], "challenger must be a list, got None"),
    ("serve", ["port=abc"], "port must be a finite number, got 'abc'"),
])
def test_a_commands_option_keeps_the_type_of_its_default(command, overrides, message):
    with pytest.raises(UserError) as refused:
        config.compose_command(overrides, command, "usage")
    assert str(refused.value) == message


def test_a_commands_options_take_fractions_and_their_groups_keys():
    assert config.compose_command(["rate=0.5", "duration=1.5"], "traffic", "usage").rate == 0.5
    assert config.compose_command(["window=5000", "bootstrap.samples=100000"], "retrain", "usage").window == 5000
    assert config.compose_command(["data=obd"], "evaluate", "usage").data.name == "obd"


def test_the_time_choices_checked_before_tensorflow_loads_are_the_environments():
    from src.envs import base, movielens

    assert config.TIME_CHOICES == {"drift": movielens.DRIFTS, "delay": base.DELAYS, "arrivals": base.ARRIVAL_ORDERS}
    with pytest.raises(UserError, match="env.drift must be one of none, rotate, switch, got 'wobble'"):
        config.check_run(config.compose(["env.drift=wobble"]))


@pytest.mark.parametrize("kind", ["fixed", "geometric", "heavy"])
def test_the_longest_delay_sized_before_tensorflow_loads_is_the_environments(kind):
    """The pending ring's size is checked before TensorFlow loads from config's copy of the default."""
    from src.envs import base

    assert base.FeedbackDelay(kind, 3).longest == config.DEFAULT_LONGEST_DELAYS[kind] * 3


def test_evaluate_takes_one_estimator_by_name_and_pipeline_checks_the_services_exploration():
    from src import evaluate, pipeline

    assert list(evaluate.parse(["target_agent=lints", "logs_run_id=x", "estimators=dm"]).estimators) == ["dm"]
    with pytest.raises(UserError, match="bootstrap.seed must be an integer >= 0, got -5"):
        evaluate.parse(["target_agent=lints", "logs_run_id=x", "bootstrap.seed=-5"])
    with pytest.raises(UserError, match="exploration must be one of none, epsilon, softmax"):
        pipeline.parse(["exploration=none2"])


@pytest.mark.parametrize("arguments", [["--help"], ["prepare", "--help"], ["work", "hparams_search=linucb", "-h"]])
def test_the_sweep_commands_help_is_its_usage(arguments):
    result = subprocess.run([sys.executable, "-m", "src.sweep", *arguments], cwd=PROJECT_ROOT, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.startswith("usage: python -m src.sweep {prepare")
    assert "multirun.sh" in result.stdout and not result.stderr.strip()


def test_project_root_resolver_places_files_at_the_root_whatever_the_cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = config.compose(["hparams_search=linucb"], with_hydra=True)
    assert cfg.hydra.sweeper.storage == f"sqlite:///{PROJECT_ROOT}/optuna.db"


@pytest.mark.parametrize("overrides", [["agent=nope"], ["agent=linucb,nope"], ["+env=nope"]])
def test_an_unknown_group_option_lists_the_choices(overrides):
    group = "env" if "env" in overrides[0] else "agent"
    choices = ", ".join(sorted(path.stem for path in (config.CONFIG_DIR / group).glob("*.yaml")))
    with pytest.raises(UserError, match=re.escape(f"unknown {group} 'nope'; choose one of: {choices}")):
        config.check_group_choices(overrides)


def test_known_options_keys_and_hydras_own_groups_pass_the_choice_check():
    config.check_group_choices(["agent=linucb,lints", "hparams_search=null", "agent.alpha=3", "-m",
                                "env.rank_k=choice(2, 3)", "hydra/sweeper=optuna", "hydra/launcher=basic"])


@pytest.mark.parametrize("override, message", [
    ("agent.alpha=abc", "agent.alpha must be a number, got 'abc' (conf/agent/linucb.yaml)"),
    ("env.rank_k=2.5", "env.rank_k must be an integer, got 2.5 (conf/env/movielens.yaml)"),
    ("training.threads.intra_op=x", "training.threads.intra_op must be an integer, got 'x' (conf/training/default.yaml)"),
    ("tracking.save_policy=maybe", "tracking.save_policy must be true or false, got 'maybe'"),
    ("agent.alpha=inf", "agent.alpha must be a finite number of at most 1e+06 in size, got inf"),
    ("agent.alpha=1e308", "agent.alpha must be a finite number of at most 1e+06 in size, got 1e+308"),
    ("training.seed=4294967296", "training.seed must be an integer of at most 2147483647 in size, got 4294967296"),
    ("agent.layers=3", "agent.layers must be a list, got 3 (conf/agent/epsilon_greedy.yaml)"),
    ("data.sha256=null", "data.sha256 must be a mapping, got None (conf/data/movielens.yaml)"),
    ("+agent.alpah=3", "agent.alpah is not a setting here; the settings are: name, per_arm, slate, action_mask, alpha"),
    ("+foo=1", "foo is not a setting here; the settings are: tracking, sweep, objective, offline"),
    ("+tracking.uri_=x", "tracking.uri_ is not a setting here; the settings are: uri, experiment"),
    ("agent.alpha=1e-300", "agent.alpha must be 0 or at least 1.18e-38 in size (the agents compute in float32)"),
])
def test_values_keep_the_type_of_their_default(override, message):
    agent = ["agent=epsilon_greedy"] if override.startswith("agent.layers") else []
    cfg = config.compose([*agent, override])
    with pytest.raises(UserError, match=re.escape(message)):
        config.check_types(cfg)


@pytest.mark.parametrize("args, message", [
    (["agent.alpah=3"], "agent.alpah is not a setting here; the settings are: name, per_arm, slate, action_mask, alpha"),
    (["env=movielens_ratings", "env.drift=switch"], "env.drift is not a setting here; the settings are: name, "
                                                    "num_actions, num_movies"),
    (["agent.alpah=3", "agent.alpah=4"], "agent.alpah is not a setting here"),
    (["env=movielens_ratings", "agent.alpah=3", "env.drift=x"], "Could not override 'agent.alpah'"),
    (["agent.alpah=${oops}"], "Could not override 'agent.alpah'"),
])
def test_a_key_without_a_plus_its_yaml_lacks_is_refused_naming_the_settings(args, message):
    """Not Hydra's advice to add it with +key=value, which would only earn this refusal."""
    with pytest.raises(UserError, match=re.escape(message)):
        config.check_command_line(args)


@pytest.mark.parametrize("overrides, message", [
    (["agent=linucb", "agent.alpha=-1"], "agent.alpha must be > 0, got -1 (conf/agent/linucb.yaml)"),
    (["agent=lints", "agent.tikhonov_weight=0"], "agent.tikhonov_weight must be > 0, got 0 (conf/agent/lints.yaml)"),
    (["agent=epsilon_greedy", "agent.epsilon=1.5"], "agent.epsilon must be in [0, 1], got 1.5"),
    (["agent=dropout_ts", "agent.dropout_offset=1"], "agent.dropout_offset must be > 1, got 1"),
    (["agent=neural_boltzmann", "agent.temperature=0"], "agent.temperature must be > 0, got 0"),
    (["agent=neural_linucb", "agent.encoding_network_num_train_steps=-1"],
     "agent.encoding_network_num_train_steps must be an integer >= 0, got -1"),
    (["agent=linucb", "agent.discount=1.5"], "agent.discount must be in (0, 1] (1: no discount), got 1.5"),
])
def test_an_agents_hyperparameter_out_of_range_is_refused_by_the_config_checks(overrides, message):
    """Before TensorFlow and the data load, not when the agent is built."""
    with pytest.raises(UserError, match=re.escape(message)):
        config.check_run(config.compose(overrides))


def test_a_builders_error_names_the_yaml_of_its_own_group_only():
    cfg = config.compose(["agent=lints", "agent.alpha=-1"])
    action_spec = tensor_spec.BoundedTensorSpec((), tf.int32, minimum=0, maximum=4)
    with pytest.raises(UserError) as error:
        build_agent(cfg.agent, ts.time_step_spec(tf.TensorSpec([3], tf.float32)), action_spec, seed=0)
    assert str(error.value) == "agent.alpha must be > 0, got -1 (conf/agent/lints.yaml)"
    assert error.value.key == "agent.alpha"
    with pytest.raises(UserError) as error, config.errors_name_source("env", "movielens"):
        raise UserError("training.batch_size must be >= 1, got 0", key="training.batch_size")
    assert str(error.value) == "training.batch_size must be >= 1, got 0"


def test_synthetic_data_needs_no_files_and_checks_its_sizes():
    dataset = data.load(config.compose(["data=synthetic", "data.num_users=40", "data.num_movies=25"]).data)
    assert dataset.num_users == 40 and dataset.num_movies == 25
    assert dataset.ratings.rating.between(1, 5).all()
    with pytest.raises(UserError, match=re.escape("data.rank must be an integer between 1 and "
                                                  "min(data.num_users, data.num_movies), got 30 "
                                                  "(conf/data/synthetic.yaml)")):
        data.load(config.compose(["data=synthetic", "data.num_users=40", "data.num_movies=25", "data.rank=30"]).data)


@pytest.mark.parametrize("command, argv", [("evaluate", ["confidence=abc"]), ("predict", ["top_k=abc"]),
                                           ("pipeline", ["feedback.drop=abc"]), ("retrain", ["window=abc"]),
                                           ("serve", ["port=abc"])])
def test_each_command_refuses_a_bad_option_before_tensorflow_loads(command, argv):
    """TensorFlow takes seconds to load; a typo should not wait for it."""
    probe = (f"import sys\nfrom src import {command}\ntry:\n    {command}.main({argv!r})\n"
             "except SystemExit as exit:\n    print(exit.code, 'tensorflow' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", probe], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=120)
    assert done.stdout.split() == ["2", "False"], done.stdout + done.stderr[-2000:]


@pytest.mark.parametrize("overrides, message", [
    (["env.num_movies=1"], "env.num_movies must be an integer >= 2 (null where allowed: every movie of the data), got 1"),
    (["env=movielens_per_arm", "env.num_movies=10"], "env.num_actions must be an integer between 2 and env.num_movies=10"),
    (["env=movielens_per_arm", "env.num_actions=1"], "env.num_actions must be an integer between 2 and the data's movies"),
])
def test_a_catalogue_too_small_is_refused_before_tensorflow_loads(overrides, message):
    with pytest.raises(UserError) as refused:
        config.check_run(config.compose(overrides))
    assert message in str(refused.value)
