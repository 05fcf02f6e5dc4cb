"""Cross-check of src.evaluation.estimators against Open Bandit Pipeline's estimators on random logs.

obp cannot be a dependency here: it requires PyTorch (gigabytes, for its policy learners) and
pins an old stack. Its estimators need neither, so this script loads `obp.ope.estimators`
alone from an environment holding obp without its dependencies:

    uv venv /tmp/obp && VIRTUAL_ENV=/tmp/obp uv pip install --no-deps obp==0.5.7
    VIRTUAL_ENV=/tmp/obp uv pip install numpy scikit-learn scipy pandas
    /tmp/obp/bin/python benchmarks/obp_crosscheck.py

It prints each estimator's value from both on the same stochastic target, logs and reward
model, and for the tuned ones (obp's estimators_tuning) the hyperparameter each chose; they agree
to machine precision and choose alike (obp 0.5.7), else it exits non-zero.
"""

from __future__ import annotations

import sys
import types
from pathlib import Path

import numpy as np


def load_obp_estimators():
    """obp's estimator modules (fixed and tuned) without the package's __init__, which imports
    PyTorch; obp's utilities name `torch.tensor` only in type hints."""
    import importlib.util

    root = Path(importlib.util.find_spec("obp").submodule_search_locations[0])
    torch = types.ModuleType("torch")
    torch.tensor = torch.Tensor = object
    sys.modules.setdefault("torch", torch)
    for name, path in (("obp", root), ("obp.ope", root / "ope")):
        package = types.ModuleType(name)
        package.__path__ = [str(path)]
        sys.modules[name] = package
    from obp.ope import estimators, estimators_tuning

    return estimators, estimators_tuning


def main() -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from src.evaluation import estimators as ours

    estimators, tuning = load_obp_estimators()
    rng = np.random.default_rng(0)
    rounds, users, actions = 5000, 50, 6
    user = rng.integers(users, size=rounds)
    logging_policy = rng.dirichlet(np.ones(actions), size=users)
    action = np.array([rng.choice(actions, p=logging_policy[u]) for u in user])
    reward = rng.normal(size=(users, actions))[user, action] + 0.1 * rng.normal(size=rounds)
    pscore = logging_policy[user, action]
    target = rng.dirichlet(np.full(actions, 0.5), size=users)[user]
    reward_model = rng.normal(size=(rounds, actions))
    terms = ours.terms(ours.Feedback(np.zeros((rounds, 1)), action, reward, pscore), target, reward_model)

    logged = dict(reward=reward, action=action, pscore=pscore, action_dist=target[:, :, None],
                  position=np.zeros(rounds, int))
    modelled = dict(logged, estimated_rewards_by_reg_model=reward_model[:, :, None])
    # (label, ours, obp's estimator, whether obp's takes the reward model)
    fixed = [
        ("dm", ours.DirectMethod(), estimators.DirectMethod(), True),
        ("ipw", ours.InverseProbabilityWeighting(), estimators.InverseProbabilityWeighting(), False),
        ("snipw", ours.SelfNormalizedInverseProbabilityWeighting(),
         estimators.SelfNormalizedInverseProbabilityWeighting(), False),
        ("dr", ours.DoublyRobust(), estimators.DoublyRobust(), True),
        ("switch_dr tau=3", ours.SwitchDoublyRobust(tau=3.0), estimators.SwitchDoublyRobust(lambda_=3.0), True),
        ("sndr", ours.SelfNormalizedDoublyRobust(), estimators.SelfNormalizedDoublyRobust(), True),
        *((f"dr_os λ={value:g}", ours.DoublyRobustWithShrinkage(lambda_=value),
           estimators.DoublyRobustWithShrinkage(lambda_=value), True) for value in (0.0, 1.0, 10.0, 100.0, np.inf)),
        *((f"sg_ipw λ={value:g}", ours.SubGaussianInverseProbabilityWeighting(lambda_=value),
           estimators.SubGaussianInverseProbabilityWeighting(lambda_=value), False)
          for value in (0.0, 0.1, 0.5, 1.0)),
    ]
    differences, mismatched = [], []
    for label, mine, obp, uses_model in fixed:
        value = obp.estimate_policy_value(**(modelled if uses_model else logged))
        differences.append(abs(mine.estimate(terms) - value))
        print(f"{label:24s} ours {mine.estimate(terms):.12f}  obp {value:.12f}  difference {differences[-1]:.1e}")
    # The tuned ones with their default candidates (conf/estimator_params.yaml's), by both rules.
    for mine_class, obp_class in ((ours.SwitchDoublyRobustTuned, tuning.SwitchDoublyRobustTuning),
                                  (ours.DoublyRobustWithShrinkageTuned, tuning.DoublyRobustWithShrinkageTuning)):
        for rule in ("slope", "mse"):
            mine = mine_class(rule=rule)
            obp = obp_class(lambdas=list(mine.candidates), tuning_method=rule)
            value = obp.estimate_policy_value(**modelled)
            differences.append(abs(mine.estimate(terms) - value))
            if mine.selected(terms) != obp.best_hyperparam:
                mismatched.append(f"{mine.name} {rule}")
            print(f"{mine.name + ' ' + rule:24s} ours {mine.estimate(terms):.12f}  obp {value:.12f}  difference "
                  f"{differences[-1]:.1e}  chose {mine.hyperparameter}={mine.selected(terms):g}, obp "
                  f"{obp.best_hyperparam:g}")
    print(f"max abs difference {max(differences):.1e}; hyperparameters chosen differently: {mismatched or 'none'}")
    if max(differences) > 1e-10 or mismatched:
        raise SystemExit("ours and obp disagree")


if __name__ == "__main__":
    main()
