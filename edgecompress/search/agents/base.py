"""What every search agent is: one normalized action per environment step, learning per episode.

Environments expose actions in [0, 1]^d and turn them into keep ratios, bit widths or
cluster counts themselves, so one agent serves every stage. The search loop calls
`act` once per step and `observe` once per finished episode with the actions the
environment actually applied (after its budget wall), which is what the agent learns from.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np


@dataclass(frozen=True)
class Transition:
    """One environment step as the agent saw it: state, applied action, next state, last step."""

    state: np.ndarray
    action: np.ndarray
    next_state: np.ndarray
    done: bool


class Agent(ABC):
    """A search strategy over per-step actions in [0, 1]^action_dim."""

    name: ClassVar[str] = "agent"

    def __init__(self, state_dim: int, action_dim: int, episodes: int, seed: int = 0) -> None:
        self.state_dim = int(state_dim)
        self.action_dim = int(action_dim)
        self.episodes = int(episodes)
        self.seed = int(seed)
        self.rng = np.random.default_rng(seed)

    @abstractmethod
    def act(self, state: np.ndarray, episode: int, step: int) -> np.ndarray:
        """The action for this step, each entry in [0, 1]."""

    def observe(self, transitions: list[Transition], reward: float, episode: int) -> None:
        """Learn from a finished episode (its applied actions and final reward)."""
        return None  # baselines learn nothing

    def describe(self) -> dict[str, Any]:
        """The agent's settings, recorded in the run's report."""
        return {"agent": self.name, "episodes": self.episodes, "seed": self.seed}


def truncated_normal(
    rng: np.random.Generator, mean: np.ndarray, sigma: float, low: float = 0.0, high: float = 1.0
) -> np.ndarray:
    """Samples of N(mean, sigma) truncated to [low, high], by rejection (as AMC/HAQ's truncnorm)."""
    mean = np.clip(np.asarray(mean, np.float64), low, high)
    if sigma <= 0:
        return mean.copy()
    out = rng.normal(mean, sigma)
    bad = (out < low) | (out > high)
    for _ in range(1000):
        if not bad.any():
            break
        out[bad] = rng.normal(mean[bad], sigma)
        bad = (out < low) | (out > high)
    return np.clip(out, low, high)
