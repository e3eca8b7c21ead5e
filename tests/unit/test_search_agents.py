"""Search agents: exploration, learning on a toy problem, seeds, baselines, DECORE scores."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from edgecompress.search.agents import AGENTS, DDPGAgent, DecoreAgent, DecoreContext, Transition
from edgecompress.search.agents.base import truncated_normal
from edgecompress.search.agents.ddpg import DDPGConfig


def _bandit(agent, episodes: int, target: float = 0.7, steps: int = 2) -> list[np.ndarray]:
    """Episodes of `steps` steps; reward is high when every action is near `target`."""
    taken = []
    for episode in range(episodes):
        transitions, actions = [], []
        for step in range(steps):
            state = np.array([step / steps, 1.0], np.float32)
            action = agent.act(state, episode, step)
            nxt = np.array([(step + 1) / steps, 1.0], np.float32)
            transitions.append(Transition(state, action, nxt, step == steps - 1))
            actions.append(action)
        reward = 1.0 - float(np.mean([abs(a[0] - target) for a in actions]))
        agent.observe(transitions, reward, episode)
        taken.append(np.concatenate(actions))
    return taken


def test_truncated_normal_stays_in_bounds_and_centres_on_the_mean() -> None:
    rng = np.random.default_rng(0)
    samples = np.stack([truncated_normal(rng, np.array([0.3, 0.95]), 0.1) for _ in range(2000)])
    assert samples.min() >= 0.0 and samples.max() <= 1.0
    assert abs(samples[:, 0].mean() - 0.3) < 0.01
    assert samples[:, 1].mean() < 0.95  # truncation at 1 pulls the mean down
    assert np.array_equal(truncated_normal(rng, np.array([0.4]), 0.0), np.array([0.4]))


def test_ddpg_warms_up_at_random_then_explores_less_each_episode() -> None:
    agent = DDPGAgent(2, 1, episodes=40, seed=0, config=DDPGConfig(warmup=5))
    assert agent.sigma(5) == pytest.approx(0.5)
    assert agent.sigma(15) == pytest.approx(0.5 * 0.95**10)
    assert agent.sigma(2) == agent.sigma(5)  # no decay during the warm-up


def test_ddpg_learns_the_best_action_of_a_bandit() -> None:
    config = DDPGConfig(warmup=10, init_sigma=0.3, sigma_decay=0.9, batch_size=32, hidden=64)
    agent = DDPGAgent(2, 1, episodes=80, seed=3, config=config)
    _bandit(agent, 80, target=0.8)
    greedy = [agent.greedy(np.array([s / 2, 1.0], np.float32))[0] for s in range(2)]
    assert agent.updates > 0 and agent.moving_average is not None
    assert all(abs(g - 0.8) < 0.2 for g in greedy), greedy


def test_same_seed_same_actions_other_seed_other_actions() -> None:
    def run(seed: int) -> np.ndarray:
        agent = DDPGAgent(2, 1, episodes=12, seed=seed, config=DDPGConfig(warmup=4, hidden=32))
        return np.stack(_bandit(agent, 12))

    a, b = run(1), run(1)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, run(2))


def test_ddpg_leaves_the_global_torch_rng_alone() -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    DDPGAgent(4, 2, episodes=10, seed=9)
    assert torch.equal(torch.rand(3), expected)


def test_uniform_sweeps_one_action_per_episode_and_random_is_seeded() -> None:
    uniform = AGENTS["uniform"](3, 1, episodes=5, seed=0)
    per_episode = [{float(uniform.act(np.zeros(3), e, s)[0]) for s in range(4)} for e in range(5)]
    assert all(len(actions) == 1 for actions in per_episode)  # one action per episode
    assert [a.pop() for a in per_episode] == pytest.approx([1.0, 0.75, 0.5, 0.25, 0.0])
    r1 = [AGENTS["random"](3, 2, 5, seed=4).act(np.zeros(3), 0, 0) for _ in range(2)]
    assert np.array_equal(r1[0], r1[1]) and (0 <= r1[0]).all() and (r1[0] <= 1).all()


def test_registry_names_every_agent() -> None:
    assert set(AGENTS) == {"ddpg", "decore", "random", "uniform"}
    assert all(cls.name == name for name, cls in AGENTS.items())


class _TwoUseful(nn.Module):
    """Four channels; the classifier reads only channels 0 and 1."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 1, bias=False)
        self.fc = nn.Linear(4, 2, bias=False)
        with torch.no_grad():
            self.conv.weight.copy_(torch.eye(4)[:, :, None, None])
            self.fc.weight.copy_(torch.tensor([[1.0, 0, 0, 0], [0, 1.0, 0, 0]]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.conv(x).flatten(1))


def test_decore_scores_useless_channels_below_useful_ones() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.rand(256, 4, 1, 1, generator=g)
    y = (x[:, 1, 0, 0] > x[:, 0, 0, 0]).long()

    def batches(rng: np.random.Generator):
        order = rng.permutation(256)
        for i in range(0, 256, 64):
            yield x[order[i : i + 64]], y[order[i : i + 64]]

    model = _TwoUseful()
    context = DecoreContext(model, [["conv"]], [4], batches)
    agent = DecoreAgent(3, 1, episodes=30, seed=0, context=context)
    agent.config = type(agent.config)(lr=0.2, init_weight=1.0, steps_per_episode=4)
    agent.weights = [np.full(4, 1.0)]
    keep = [agent.act(np.zeros(3), e, 0)[0] for e in range(30)]
    scores = agent.scores()[0]
    assert min(scores[:2]) > max(scores[2:]), scores
    assert keep[-1] == pytest.approx(0.5)  # keeps exactly the two channels that matter
    # masks are removed after training: the model's outputs are unchanged
    assert torch.equal(model(x).argmax(1), y)
