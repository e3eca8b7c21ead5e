"""The episode loop: an agent acts on a stage environment; every candidate is recorded.

Resuming is replaying: the loop starts again from the seed, the environment's memo
holds every candidate the log already has, so the replayed episodes cost no evaluation
and the agent ends up exactly where the killed run was (same seed, same rewards); only
episodes the log lacks are evaluated and appended.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from edgecompress.search.agents import AGENTS, Agent, Transition
from edgecompress.search.env import SearchEnv
from edgecompress.search.record import CandidateLog

log = logging.getLogger(__name__)

Progress = Callable[[str, "float | None"], None]
OnRecord = Callable[[dict[str, Any], "dict[str, Any] | None"], None]  # (record, best so far)


@dataclass(frozen=True)
class StageResult:
    """A finished search stage: its best candidate and every episode's record."""

    best: dict[str, Any] | None
    records: tuple[dict[str, Any], ...]
    evaluated: int  # candidates evaluated in this call (not taken from the log)


LEANER = ("latency_ms", "memory_mb", "size_kb")  # what breaks a tie of reward


def better(record: Mapping[str, Any], best: Mapping[str, Any] | None) -> bool:
    """Feasible beats infeasible; then higher reward; at equal reward (held-out accuracy is
    counted in whole images, so equal models tie) the leaner one: the smaller product of
    its latency, memory and size over the other's. Full ties keep the earlier one."""
    if best is None:
        return True
    mine, theirs = (bool(record["feasible"]), record["reward"]), (bool(best["feasible"]), best["reward"])
    if mine != theirs:
        return mine > theirs
    return leanness(record, best) < 0.0


def leanness(record: Mapping[str, Any], other: Mapping[str, Any]) -> float:
    """Sum of log(figure / other's figure) over the LEANER figures both have: below 0 when
    `record` is smaller and faster on balance (half the latency at twice the size is even)."""
    total = 0.0
    for key in LEANER:
        a, b = record.get(key), other.get(key)
        if a is not None and b is not None and a > 0 and b > 0:
            total += float(np.log(a / b))
    return total


def make_agent(name: str, env: SearchEnv, episodes: int, seed: int, **options: Any) -> Agent:
    """An agent from the registry, sized for the environment."""
    if name not in AGENTS:
        from edgecompress.errors import UsageError

        raise UsageError(f"unknown search agent {name!r}; choose one of: {', '.join(AGENTS)}")
    state_dim = int(np.prod(env.observation_space.shape))
    return AGENTS[name](state_dim, env.action_dim, episodes, seed, **options)


def run_episodes(
    env: SearchEnv,
    agent: Agent,
    episodes: int,
    *,
    log_file: CandidateLog | None = None,
    on_record: OnRecord | None = None,
    progress: Progress | None = None,
    label: str = "search",
    best: dict[str, Any] | None = None,
) -> StageResult:
    """Run `episodes` episodes, appending each new candidate to the log as it is scored.

    `best` is the best candidate met before the search (a reference model of the stage).
    """
    logged_episodes: set[int] = set()
    if log_file is not None:
        env.memo.update(log_file.memo(env.stage))
        logged_episodes = {int(r["episode"]) for r in log_file.stage(env.stage) if "episode" in r}
    records, evaluated = [], 0
    for episode in range(episodes):
        state, _ = env.reset(seed=agent.seed + episode)
        transitions, done, info, reward = [], False, {}, 0.0
        step = 0
        while not done:
            action = agent.act(state, episode, step)
            next_state, reward, done, _, info = env.step(action)
            transitions.append(Transition(state, info["applied_action"], next_state, done))
            state, step = next_state, step + 1
        agent.observe(transitions, reward, episode)
        record = {
            "id": f"{env.stage}-{episode:04d}",
            "episode": episode,
            "agent": agent.name,
            "actions": [t.action.round(4).tolist() for t in transitions],
            **info["candidate"],
        }
        if not record["cached"]:
            evaluated += 1
        if log_file is not None and (episode not in logged_episodes or not record["cached"]):
            log_file.append(record)
        records.append(record)
        if better(record, best):
            best = record
        if on_record is not None:
            on_record(record, best)
        if progress is not None:
            progress(f"{label} | {_summary(episode, episodes, best)}", (episode + 1) / episodes)
    return StageResult(best, tuple(records), evaluated)


def _summary(episode: int, episodes: int, best: Mapping[str, Any] | None) -> str:
    text = f"episode {episode + 1}/{episodes}"
    if best is not None:
        parts = [f"best {best['accuracy']:.1f}%"]
        if best.get("latency_ms") is not None:
            parts.append(f"{best['latency_ms']:.3g} ms")
        if best.get("size_kb") is not None:
            parts.append(f"{best['size_kb']:.0f} KB")
        text += ", " + " ".join(parts) + ("" if best["feasible"] else " (over budget)")
    return text
