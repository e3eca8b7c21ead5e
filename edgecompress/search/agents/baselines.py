"""Baselines the learned agents must beat, given the same number of evaluations.

Uniform: one action for every layer, swept over an even grid across the episodes
(the "prune every layer by x%" or "every layer at b bits" policy). Random: every
action uniform in [0, 1]. Both go through the same environment, so the same budget
wall bounds them.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np

from edgecompress.search.agents.base import Agent


class UniformAgent(Agent):
    """The same action at every step of an episode; episode i takes the i-th grid point."""

    name: ClassVar[str] = "uniform"

    def __init__(self, state_dim: int, action_dim: int, episodes: int, seed: int = 0) -> None:
        super().__init__(state_dim, action_dim, episodes, seed)
        # From the least to the most reduced, so a budget that only a strong reduction
        # meets is still met by the later points; a seed shuffles nothing: the grid is the policy.
        self.grid = np.linspace(1.0, 0.0, max(1, episodes))

    def act(self, state: np.ndarray, episode: int, step: int) -> np.ndarray:
        return np.full(self.action_dim, self.grid[episode % len(self.grid)])


class RandomAgent(Agent):
    """Independent uniform actions at every step (random search)."""

    name: ClassVar[str] = "random"

    def act(self, state: np.ndarray, episode: int, step: int) -> np.ndarray:
        return self.rng.uniform(0.0, 1.0, self.action_dim)
