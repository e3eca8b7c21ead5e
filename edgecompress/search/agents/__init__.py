"""Search agents by name: the one registry the pipeline and the CLI choose from."""

from __future__ import annotations

from edgecompress.search.agents.base import Agent, Transition
from edgecompress.search.agents.baselines import RandomAgent, UniformAgent
from edgecompress.search.agents.ddpg import DDPGAgent
from edgecompress.search.agents.reinforce import DecoreAgent, DecoreContext

AGENTS: dict[str, type[Agent]] = {
    "ddpg": DDPGAgent,
    "decore": DecoreAgent,
    "random": RandomAgent,
    "uniform": UniformAgent,
}

__all__ = ["AGENTS", "Agent", "DDPGAgent", "DecoreAgent", "DecoreContext", "Transition"]
