"""DECORE-style channel agents (Alwani et al., CVPR 2022): one REINFORCE policy per channel.

Each channel of a coupled group has a keep probability sigmoid(w). A training step
samples keep/drop for every channel, masks the dropped ones in a forward pass of the
frozen network (at every layer that produces the group's channels, which is what
removing them does), and rewards each group's agents with
R = (channels the group dropped) x R_acc, where R_acc is the batch mean of +1 per
correct prediction and -penalty per wrong one. The weights w move by REINFORCE,
w += lr * R * (a - p). The trained w are the DECORE importance scores that
compress/pruning.py takes as data; the keep ratio a group proposes is the share of its
channels whose keep probability is at least one half.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from edgecompress.search.agents.base import Agent, Transition


@dataclass(frozen=True)
class DecoreContext:
    """What the channel agents train on: the network, its groups, and training batches."""

    module: nn.Module  # left unchanged: masks are forward hooks removed after each step
    groups: Sequence[Sequence[str]]  # per group: names of modules whose outputs carry its channels
    channels: Sequence[int]  # channels per group
    batches: Callable[[np.random.Generator], Iterator[tuple[torch.Tensor, torch.Tensor]]]


@dataclass(frozen=True)
class DecoreConfig:
    lr: float = 0.01
    wrong_penalty: float = 5.0  # the paper's lambda: a wrong prediction costs this much
    init_weight: float = 3.0  # sigmoid(3) = 0.95: every channel starts almost surely kept
    steps_per_episode: int = 4


class DecoreAgent(Agent):
    """Per-channel keep/drop policies trained by REINFORCE on accuracy x compression."""

    name: ClassVar[str] = "decore"
    needs_context: ClassVar[bool] = True

    def __init__(
        self,
        state_dim: int,
        action_dim: int,
        episodes: int,
        seed: int = 0,
        *,
        context: DecoreContext,
        config: DecoreConfig | None = None,
    ) -> None:
        super().__init__(state_dim, action_dim, episodes, seed)
        self.context = context
        self.config = config or DecoreConfig()
        self.weights = [np.full(int(n), self.config.init_weight) for n in context.channels]
        self._modules = dict(context.module.named_modules())
        missing = [n for g in context.groups for n in g if n not in self._modules]
        if missing:
            raise ValueError(f"DECORE groups name modules the model lacks: {missing[:4]}")
        self._batches: Iterator[tuple[torch.Tensor, torch.Tensor]] | None = None
        self._trained_for = -1

    def probabilities(self) -> list[np.ndarray]:
        return [1.0 / (1.0 + np.exp(-w)) for w in self.weights]

    def scores(self) -> list[np.ndarray]:
        """Per group, per channel importance (the policy weights): higher is more worth keeping."""
        return [w.copy() for w in self.weights]

    def act(self, state: np.ndarray, episode: int, step: int) -> np.ndarray:
        if episode > self._trained_for:
            self.train_policies(self.config.steps_per_episode)
            self._trained_for = episode
        keep = float(np.mean(self.probabilities()[step] >= 0.5))
        return np.full(self.action_dim, keep)

    def observe(self, transitions: list[Transition], reward: float, episode: int) -> None:
        """DECORE learns from its own accuracy x compression reward, not the episode's."""

    def train_policies(self, steps: int) -> None:
        """REINFORCE updates of every channel policy on `steps` training batches."""
        module = self.context.module
        was_training = module.training
        module.eval()
        try:
            for _ in range(steps):
                x, y = self._next_batch()
                self._step(module, x, y)
        finally:
            module.train(was_training)

    def _next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._batches is None:
            self._batches = self.context.batches(self.rng)
        try:
            return next(self._batches)
        except StopIteration:
            self._batches = self.context.batches(self.rng)
            return next(self._batches)

    def _step(self, module: nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
        probs = self.probabilities()
        actions = [(self.rng.random(len(p)) < p).astype(np.float64) for p in probs]
        for a in actions:  # a group never drops every channel: the network would be cut
            if not a.any():
                a[int(np.argmax(self.rng.random(len(a))))] = 1.0
        handles = []
        for names, a in zip(self.context.groups, actions, strict=True):
            mask = torch.as_tensor(a, dtype=torch.float32)
            for name in names:
                handles.append(self._modules[name].register_forward_hook(_masker(mask)))
        try:
            with torch.no_grad():
                correct = (module(x).argmax(1) == y).float()
        finally:
            for h in handles:
                h.remove()
        penalty = self.config.wrong_penalty
        r_acc = float(torch.where(correct > 0, 1.0, -penalty).mean())
        for i, (a, p) in enumerate(zip(actions, probs, strict=True)):
            r = float(np.sum(1.0 - a)) * r_acc
            self.weights[i] = self.weights[i] + self.config.lr * r * (a - p)

    def describe(self) -> dict[str, Any]:
        c = self.config
        return {
            **super().describe(),
            "lr": c.lr,
            "wrong_penalty": c.wrong_penalty,
            "steps_per_episode": c.steps_per_episode,
        }


def _masker(mask: torch.Tensor) -> Callable[..., torch.Tensor]:
    def hook(_module: nn.Module, _inputs: Any, output: torch.Tensor) -> torch.Tensor:
        shape = [1, -1] + [1] * (output.dim() - 2)
        return output * mask.view(shape)

    return hook
