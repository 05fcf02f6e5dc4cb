"""Cross-check of src.evaluation.estimators against Open Bandit Pipeline's estimators on random logs.

obp cannot be a dependency here: it requires PyTorch (gigabytes, for its policy learners) and
pins an old stack. Its estimators need neither, so this script loads `obp.ope.estimators`
alone from an environment holding obp without its dependencies:

    uv venv /tmp/obp && VIRTUAL_ENV=/tmp/obp uv pip install --no-deps obp==0.5.7
    VIRTUAL_ENV=/tmp/obp uv pip install numpy scikit-learn scipy pandas
    /tmp/obp/bin/python benchmarks/obp_crosscheck.py

It prints each estimator's value from both on the same stochastic target, logs and reward
model; they agree to machine precision (obp 0.5.7).
"""

from __future__ import annotations

import sys
import types
from pathlib import Path

import numpy as np


def load_obp_estimators():
    """obp's estimator module without the package's __init__, which imports PyTorch; obp's
    utilities name `torch.tensor` only in type hints."""
    import importlib.util

    root = Path(importlib.util.find_spec("obp").submodule_search_locations[0])
    torch = types.ModuleType("torch")
    torch.tensor = torch.Tensor = object
    sys.modules.setdefault("torch", torch)
    for name, path in (("obp", root), ("obp.ope", root / "ope")):
        package = types.ModuleType(name)
        package.__path__ = [str(path)]
        sys.modules[name] = package
    from obp.ope import estimators

    return estimators


def main() -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from src.evaluation import estimators as ours

    estimators = load_obp_estimators()
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
    theirs = {
        "dm": estimators.DirectMethod().estimate_policy_value(
            action_dist=target[:, :, None], estimated_rewards_by_reg_model=reward_model[:, :, None],
            position=logged["position"]),
        "ipw": estimators.InverseProbabilityWeighting().estimate_policy_value(**logged),
        "snipw": estimators.SelfNormalizedInverseProbabilityWeighting().estimate_policy_value(**logged),
        "dr": estimators.DoublyRobust().estimate_policy_value(
            **logged, estimated_rewards_by_reg_model=reward_model[:, :, None]),
        "switch_dr": estimators.SwitchDoublyRobust(lambda_=3.0).estimate_policy_value(
            **logged, estimated_rewards_by_reg_model=reward_model[:, :, None]),
    }
    for estimator in ours.configured(theirs, {"switch_dr": {"tau": 3.0}}, "estimator_params"):
        mine, value = estimator.estimate(terms), theirs[estimator.name]
        print(f"{estimator.name:10s} ours {mine:.12f}  obp {value:.12f}  difference {abs(mine - value):.1e}")


if __name__ == "__main__":
    main()
