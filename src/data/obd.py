"""The Open Bandit Dataset (Saito, Aihara, Matsutani and Narita, NeurIPS 2021 Datasets and
Benchmarks): real logged bandit feedback from ZOZOTOWN, two logging policies on the same traffic,
`random` (uniform) and `bts` (Bernoulli Thompson sampling), on the campaigns `all` (80 items),
`men` (34) and `women` (46), three positions per impression.

Layout: `<behavior>/<campaign>/<campaign>.csv` (timestamp, item_id, position 1-3, click,
propensity_score, user_feature_0..3 as hashed categories, user-item_affinity_0..) and
`prior_bts.yaml` (the Beta priors of the `bts` policy, per campaign). A round here is one
impression: the context is the user's features one-hot beside their affinities to every item,
as Open Bandit Pipeline's `OpenBanditDataset.pre_process` makes it, the action the item shown,
the reward the click, the propensity the logging policy's chance of that item at that position.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from omegaconf import OmegaConf

from src import config
from src.errors import UserError, require

BEHAVIORS = ("random", "bts")
POSITIONS = 3
USER_FEATURES = [f"user_feature_{i}" for i in range(4)]
AFFINITY_PREFIX = "user-item_affinity_"
COLUMNS = ("item_id", "position", "click", "propensity_score", *USER_FEATURES)


@dataclass(frozen=True)
class LoggedFeedback:
    """One behavior's log on one campaign."""

    contexts: np.ndarray  # [n, d] float64: one-hot user features, then the affinities
    actions: np.ndarray  # [n] the item shown, 0 .. items - 1
    positions: np.ndarray  # [n] 0-based
    rewards: np.ndarray  # [n] click, 0 or 1
    propensities: np.ndarray  # [n] the logging policy's chance of that item at that position
    num_items: int


def campaigns(directory: Path, behavior: str) -> list[str]:
    folder = directory / behavior
    return sorted(path.name for path in folder.iterdir() if (path / f"{path.name}.csv").is_file()) \
        if folder.is_dir() else []


def load(directory: Path, campaign: str, behavior: str) -> LoggedFeedback:
    """The log of `behavior` on `campaign` under an OBD folder; one-line errors for a folder
    without it (the campaigns found listed) or a file in another layout."""
    require(behavior in BEHAVIORS, "data.behavior", behavior, f"one of {', '.join(BEHAVIORS)}")
    path = directory / behavior / campaign / f"{campaign}.csv"
    if not path.is_file():
        found = campaigns(directory, behavior)
        raise UserError(f"{directory} has no campaign {campaign!r} for behavior {behavior!r}"
                        + (f"; it has: {', '.join(found)}" if found else f" (no {behavior}/<campaign>/<campaign>.csv)"))
    frame = pd.read_csv(path, index_col=0)
    missing = [column for column in COLUMNS if column not in frame]
    affinities = frame.filter(like=AFFINITY_PREFIX)
    if missing or affinities.empty:
        raise UserError(f"{path} is not in the Open Bandit Dataset's layout: it lacks "
                        f"{', '.join(missing) or 'the user-item_affinity_ columns'}")
    # One-hot over the categories the campaign's log holds, in sorted order, as pandas' get_dummies.
    users = pd.get_dummies(frame[USER_FEATURES].astype(str), dtype=float).to_numpy()
    return LoggedFeedback(contexts=np.hstack([users, affinities.to_numpy(float)]),
                          actions=frame.item_id.to_numpy(np.int64),
                          positions=frame.position.to_numpy(np.int64) - 1,
                          rewards=frame.click.to_numpy(float),
                          propensities=frame.propensity_score.to_numpy(float),
                          num_items=affinities.shape[1])


def bts_priors(directory: Path, campaign: str) -> tuple[np.ndarray, np.ndarray]:
    """(alpha, beta) per item of the Bernoulli TS policy that logged the `bts` files."""
    path = directory / "prior_bts.yaml"
    if not path.is_file():
        raise UserError(f"{directory} has no prior_bts.yaml (the bts policy's Beta priors)")
    priors = OmegaConf.to_container(OmegaConf.load(path))
    if campaign not in priors:
        raise UserError(f"{path} has no priors for campaign {campaign!r}; it has: {', '.join(priors)}")
    return np.asarray(priors[campaign]["alpha"], float), np.asarray(priors[campaign]["beta"], float)


def bernoulli_ts_positions(alpha: np.ndarray, beta: np.ndarray, draws: int, seed: int) -> np.ndarray:
    """[items, positions] the chance Bernoulli TS shows each item at each position: the share of
    `draws` Beta samples in which it ranks there (as Open Bandit Pipeline's
    `BernoulliTS.compute_batch_action_dist` estimates it), in blocks of 10,000 draws."""
    rng = np.random.default_rng(seed)
    counts = np.zeros((len(alpha), POSITIONS))
    for start in range(0, draws, 10_000):
        size = min(10_000, draws - start)
        ranked = np.argsort(-rng.beta(alpha, beta, size=(size, len(alpha))), axis=1)[:, :POSITIONS]
        for position in range(POSITIONS):
            counts[:, position] += np.bincount(ranked[:, position], minlength=len(alpha))
    return counts / draws


def not_ratings(**_) -> None:
    """`data=obd` where ratings are needed (training): refused, naming what reads it."""
    raise UserError(config.LOGGED_FEEDBACK["obd"])
