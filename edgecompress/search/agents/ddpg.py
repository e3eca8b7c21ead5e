"""DDPG actor-critic over per-layer actions, as AMC (He et al. 2018) and HAQ (Wang et al. 2019).

What follows their published agents: random warm-up episodes fill the replay buffer;
afterwards the actor's action is perturbed by a truncated normal whose width decays
each episode (sigma = init_sigma * decay ** (episode - warmup)); every step of an
episode is stored with the episode's final reward, and the critic learns from that
reward minus a moving average of recent rewards (the variance-reducing baseline).
Discount 1: the whole episode is one decision whose value arrives at its end.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from edgecompress.search.agents.base import Agent, Transition, truncated_normal


@dataclass(frozen=True)
class DDPGConfig:
    hidden: int = 300
    actor_lr: float = 1e-4
    critic_lr: float = 1e-3
    tau: float = 0.01
    discount: float = 1.0
    batch_size: int = 64
    buffer_size: int = 2000
    warmup: int | None = None  # None: a quarter of the episodes, at most 100 (AMC's warm-up)
    init_sigma: float = 0.5
    sigma_decay: float = 0.95
    moving_alpha: float = 0.5


class _Actor(nn.Module):
    def __init__(self, state_dim: int, action_dim: int, hidden: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(state_dim, hidden),
            nn.ReLU(),
            nn.Linear(hidden, hidden),
            nn.ReLU(),
            nn.Linear(hidden, action_dim),
            nn.Sigmoid(),
        )

    def forward(self, state: torch.Tensor) -> torch.Tensor:
        return self.net(state)


class _Critic(nn.Module):
    def __init__(self, state_dim: int, action_dim: int, hidden: int) -> None:
        super().__init__()
        self.state_in = nn.Linear(state_dim, hidden)
        self.action_in = nn.Linear(action_dim, hidden)
        self.head = nn.Sequential(nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 1))

    def forward(self, state: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        return self.head(self.state_in(state) + self.action_in(action))


class _ReplayBuffer:
    """A ring buffer of (state, action, reward, next state, not-done) rows."""

    def __init__(self, capacity: int, state_dim: int, action_dim: int) -> None:
        self.capacity = capacity
        self.states = np.zeros((capacity, state_dim), np.float32)
        self.actions = np.zeros((capacity, action_dim), np.float32)
        self.rewards = np.zeros(capacity, np.float32)
        self.next_states = np.zeros((capacity, state_dim), np.float32)
        self.not_done = np.zeros(capacity, np.float32)
        self.size = 0
        self.cursor = 0

    def add(self, t: Transition, reward: float) -> None:
        i = self.cursor
        self.states[i], self.actions[i], self.next_states[i] = t.state, t.action, t.next_state
        self.rewards[i], self.not_done[i] = reward, 0.0 if t.done else 1.0
        self.cursor = (i + 1) % self.capacity
        self.size = min(self.size + 1, self.capacity)

    def sample(self, rng: np.random.Generator, n: int) -> tuple[np.ndarray, ...]:
        index = rng.integers(0, self.size, size=n)
        return (
            self.states[index],
            self.actions[index],
            self.rewards[index],
            self.next_states[index],
            self.not_done[index],
        )


def _soft_update(target: nn.Module, source: nn.Module, tau: float) -> None:
    with torch.no_grad():
        for t, s in zip(target.parameters(), source.parameters(), strict=True):
            t.mul_(1.0 - tau).add_(s, alpha=tau)


class DDPGAgent(Agent):
    """Actor-critic search with truncated-normal exploration and a moving-average baseline."""

    name: ClassVar[str] = "ddpg"

    def __init__(
        self,
        state_dim: int,
        action_dim: int,
        episodes: int,
        seed: int = 0,
        config: DDPGConfig | None = None,
    ) -> None:
        super().__init__(state_dim, action_dim, episodes, seed)
        self.config = config or DDPGConfig()
        c = self.config
        self.warmup = c.warmup if c.warmup is not None else min(100, max(1, episodes // 4))
        # Networks are initialised from their own seeded stream, leaving the caller's
        # global torch RNG as it was: the same seed gives the same agent in any program.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.actor = _Actor(state_dim, action_dim, c.hidden)
            self.actor_target = _Actor(state_dim, action_dim, c.hidden)
            self.critic = _Critic(state_dim, action_dim, c.hidden)
            self.critic_target = _Critic(state_dim, action_dim, c.hidden)
        self.actor_target.load_state_dict(self.actor.state_dict())
        self.critic_target.load_state_dict(self.critic.state_dict())
        self.actor_optim = torch.optim.Adam(self.actor.parameters(), lr=c.actor_lr)
        self.critic_optim = torch.optim.Adam(self.critic.parameters(), lr=c.critic_lr)
        self.buffer = _ReplayBuffer(c.buffer_size, state_dim, action_dim)
        self.moving_average: float | None = None
        self.updates = 0

    def sigma(self, episode: int) -> float:
        """Exploration width for an episode after the warm-up."""
        return self.config.init_sigma * self.config.sigma_decay ** max(0, episode - self.warmup)

    def act(self, state: np.ndarray, episode: int, step: int) -> np.ndarray:
        if episode < self.warmup:
            return self.rng.uniform(0.0, 1.0, self.action_dim)
        with torch.no_grad():
            mean = self.actor(torch.as_tensor(state, dtype=torch.float32)[None])[0].numpy()
        return truncated_normal(self.rng, mean, self.sigma(episode))

    def greedy(self, state: np.ndarray) -> np.ndarray:
        """The actor's action without exploration."""
        with torch.no_grad():
            return self.actor(torch.as_tensor(state, dtype=torch.float32)[None])[0].numpy()

    def observe(self, transitions: list[Transition], reward: float, episode: int) -> None:
        for t in transitions:
            self.buffer.add(t, reward)
        if episode < self.warmup - 1:
            return
        # One thread: these networks are tiny, and on a shared machine torch's thread pool
        # made an update four times slower than a single thread does.
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            for _ in transitions:
                self._update()
        finally:
            torch.set_num_threads(threads)

    def _update(self) -> None:
        c = self.config
        states, actions, rewards, next_states, not_done = self.buffer.sample(self.rng, c.batch_size)
        mean = float(rewards.mean())
        if self.moving_average is None:
            self.moving_average = mean
        else:
            self.moving_average += c.moving_alpha * (mean - self.moving_average)
        s, a = torch.from_numpy(states), torch.from_numpy(actions)
        s2 = torch.from_numpy(next_states)
        r = torch.from_numpy(rewards - np.float32(self.moving_average))[:, None]
        mask = torch.from_numpy(not_done)[:, None]
        with torch.no_grad():
            target = r + c.discount * mask * self.critic_target(s2, self.actor_target(s2))
        critic_loss = nn.functional.mse_loss(self.critic(s, a), target)
        self.critic_optim.zero_grad()
        critic_loss.backward()
        self.critic_optim.step()
        actor_loss = -self.critic(s, self.actor(s)).mean()
        self.actor_optim.zero_grad()
        actor_loss.backward()
        self.actor_optim.step()
        _soft_update(self.actor_target, self.actor, c.tau)
        _soft_update(self.critic_target, self.critic, c.tau)
        self.updates += 1

    def describe(self) -> dict[str, Any]:
        c = self.config
        return {
            **super().describe(),
            "warmup": self.warmup,
            "init_sigma": c.init_sigma,
            "sigma_decay": c.sigma_decay,
            "moving_alpha": c.moving_alpha,
            "discount": c.discount,
        }
