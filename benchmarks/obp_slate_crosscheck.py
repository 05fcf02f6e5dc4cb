"""Cross-check of src.evaluation.slates against Open Bandit Pipeline's slate estimators and its
Plackett-Luce propensities, on one random log.

Run with the environment benchmarks/obp_crosscheck.py describes (obp 0.5.7 without its
dependencies, in /tmp/obp):

    /tmp/obp/bin/python benchmarks/obp_slate_crosscheck.py

A log of slates drawn by Plackett-Luce (random logits per round), a Plackett-Luce target, random
slot rewards and a random q. It prints sips, iips, rips and cascade_dr from both (obp's
`estimators_slate`, fed our probabilities and q), and the largest difference between our
Plackett-Luce position marginals and prefixes and those obp's synthetic slate dataset computes
by enumerating every slate (`_calc_pscore_given_policy_logit`); all agree to ~1e-12 (obp
0.5.7), else it exits non-zero. obp has no pseudo-inverse estimator.
"""

from __future__ import annotations

import itertools
import sys
import types
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def load_obp_slate_modules():
    """obp's slate estimators and synthetic slate dataset, without the packages' __init__s
    (PyTorch) and with a stand-in for tqdm, which the dataset only wraps loops in."""
    sys.path.insert(0, str(ROOT))
    from benchmarks.obp_crosscheck import load_obp_estimators

    load_obp_estimators()  # registers the bare obp and obp.ope packages
    tqdm = types.ModuleType("tqdm")
    tqdm.tqdm = lambda iterable, **_: iterable
    sys.modules.setdefault("tqdm", tqdm)
    dataset = types.ModuleType("obp.dataset")
    dataset.__path__ = [str(Path(sys.modules["obp"].__path__[0]) / "dataset")]
    sys.modules["obp.dataset"] = dataset
    from obp.dataset import synthetic_slate
    from obp.ope import estimators_slate

    return estimators_slate, synthetic_slate


def main() -> None:
    estimators_slate, synthetic_slate = load_obp_slate_modules()
    from src.evaluation import slates

    rng = np.random.default_rng(0)
    rounds, candidates, size = 3000, 6, 3
    logits, target_logits = rng.normal(size=(rounds, candidates)), 1.5 * rng.normal(size=(rounds, candidates))
    shown = np.argsort(-(logits + rng.gumbel(size=logits.shape)), axis=1)[:, :size]
    logging, target = slates.plackett_luce(logits, shown), slates.plackett_luce(target_logits, shown)
    rewards, q = rng.normal(size=(rounds, size)), rng.normal(size=(rounds, size, candidates))
    log = slates.SlateLog(np.zeros((rounds, 1)), np.zeros((rounds, candidates, 1)), shown, rewards, logging)

    flat = dict(slate_id=np.repeat(np.arange(rounds), size), position=np.tile(np.arange(size), rounds),
                reward=rewards.ravel(), action=shown.ravel())
    obp_inputs = {
        "sips": (estimators_slate.SlateStandardIPS(len_list=size),
                 dict(pscore=np.repeat(logging.slate, size), evaluation_policy_pscore=np.repeat(target.slate, size))),
        "iips": (estimators_slate.SlateIndependentIPS(len_list=size),
                 dict(pscore_item_position=logging.position.ravel(),
                      evaluation_policy_pscore_item_position=target.position.ravel())),
        "rips": (estimators_slate.SlateRewardInteractionIPS(len_list=size),
                 dict(pscore_cascade=logging.prefix.ravel(), evaluation_policy_pscore_cascade=target.prefix.ravel())),
        "cascade_dr": (estimators_slate.SlateCascadeDoublyRobust(len_list=size, n_unique_action=candidates),
                       dict(pscore_cascade=logging.prefix.ravel(),
                            evaluation_policy_pscore_cascade=target.prefix.ravel(), q_hat=q.ravel(),
                            evaluation_policy_action_dist=target.conditional.ravel())),
    }
    differences = []
    for name, (obp, inputs) in obp_inputs.items():
        ours = slates.SLATE_ESTIMATORS[name]().estimate(log, target, q)
        theirs = obp.estimate_policy_value(**flat, **inputs)
        differences.append(abs(ours - theirs))
        print(f"{name:12s} ours {ours:.12f}  obp {theirs:.12f}  difference {differences[-1]:.1e}")

    # obp's propensities of every slate, by enumeration, on the first rounds' logits.
    every = np.array(list(itertools.permutations(range(candidates), size)))
    dataset = types.SimpleNamespace(n_unique_action=candidates, len_list=size)
    propensity_gap = 0.0
    for i in range(200):
        enumerated = synthetic_slate.SyntheticSlateBanditDataset._calc_pscore_given_policy_logit(
            dataset, every, logits[i])
        for k in range(size):
            position = enumerated[every[:, k] == shown[i, k]].sum()
            prefix = enumerated[(every[:, :k + 1] == shown[i, :k + 1]).all(axis=1)].sum()
            propensity_gap = max(propensity_gap, abs(position - logging.position[i, k]) / position,
                                 abs(prefix - logging.prefix[i, k]) / prefix)
    print(f"Plackett-Luce position marginals and prefixes against obp's enumeration, 200 rounds: largest "
          f"relative difference {propensity_gap:.1e}")
    print(f"max abs difference of the estimates {max(differences):.1e}")
    if max(differences) > 1e-10 or propensity_gap > 1e-10:
        raise SystemExit("ours and obp disagree")


if __name__ == "__main__":
    main()
