"""Shrinking a configuration that missed a budget when measured (the last resort of verify).

The wall keeps budgets by prediction; a final model can still miss one when measured
(fine-tuning changes nothing structural, but the prediction has an error). Then the
configuration is lowered greedily, one choice at a time, always where a step buys the
most of the missing figure, until its prediction is below the measured miss scaled
down by the same ratio, with a little more headroom.
"""

from __future__ import annotations

from collections.abc import Mapping

from edgecompress.search.costs import Config
from edgecompress.search.env import SearchEnv
from edgecompress.search.reward import Budgets

HEADROOM = 0.03


def shrink(
    env: SearchEnv, config: Config, measured: Mapping[str, float | None], budgets: Budgets | None = None
) -> Config | None:
    """A smaller configuration whose predicted figures should meet every missed budget.

    None when nothing is missed, or when no step of this environment lowers a missed
    figure (its floor, or choices that do not touch it: fewer bits on int8 kernels do
    not run faster). `budgets` default to the environment's.
    """
    predicted = env.cost.predict(config)
    targets = {}
    for key, limit in (budgets or env.budgets).resources().items():
        value = measured.get(key)
        if value is None or value > limit:
            ratio = limit / value if value else 0.5  # a model that did not fit: halve it
            targets[key] = predicted[key] * ratio * (1.0 - HEADROOM)
    if not targets:
        return None
    current = config
    while True:
        figures = env.cost.predict(current)
        short = {k: figures[k] - t for k, t in targets.items() if figures[k] > t}
        if not short:
            return current
        best, best_gain = None, 0.0
        for t, unit in enumerate(env.units):
            for knob in env.knobs[t]:
                value = _value(current, unit, knob.field)
                index = knob.choices.index(value) if value in knob.choices else 0
                if index == 0:
                    continue
                trial = env._set(current, unit, knob, knob.choices[index - 1])
                after = env.cost.predict(trial)
                gain = sum((figures[k] - after[k]) / max(short[k], 1e-12) for k in short)
                if gain > best_gain:
                    best, best_gain = trial, gain
        if best is None:
            return None
        current = best


def _value(config: Config, unit: int, field: str) -> object:
    return getattr(config, field)[unit]
