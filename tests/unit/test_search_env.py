"""Search environments: gymnasium's checker, the budget wall, states, memo, reward, resume.

The scorer here is analytic (accuracy and figures from the configuration) so the
environment's own logic is checked in milliseconds; the pipeline tests score with the
real apply/export/evaluate/measure chain.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

from edgecompress.compress.graph import analyze
from edgecompress.search.agents import AGENTS
from edgecompress.search.costs import Config, CostModel, fit_affine
from edgecompress.search.env import PruningEnv, QuantizationEnv, SharingEnv
from edgecompress.search.loop import better, make_agent, run_episodes
from edgecompress.search.record import CandidateLog, Outcome
from edgecompress.search.reward import Budgets, check, reward
from edgecompress.search.structure import channel_choices, from_graph
from edgecompress.zoo import load_model


@pytest.fixture(scope="module")
def structure():
    model = load_model("small_cnn")
    return from_graph(analyze(model.module, model.spec))


@pytest.fixture(scope="module")
def resnet():
    model = load_model("resnet20")
    graph = analyze(model.module, model.spec)
    return graph, from_graph(graph)


def _cost(structure) -> CostModel:
    cost = CostModel(structure, int8_speed=0.5)
    full = Config.full(structure)
    raw = cost.raw(full)
    # Anchors as if measured: 2 ms, 20 MB, and a file 10% larger than its weights.
    cost.calibrate(
        [
            (full, {"latency_ms": 2.0, "memory_mb": 20.0, "size_kb": 1.1 * raw["size_kb"] / 1024}),
        ]
    )
    return cost


class _Scorer:
    """Accuracy rises with kept channels and bits; figures are the prediction plus 3%."""

    def __init__(self, env_cost: CostModel, structure) -> None:
        self.cost, self.structure, self.calls = env_cost, structure, 0

    def __call__(self, decisions, measure):
        self.calls += 1
        s = self.structure
        channels = tuple(decisions["channels"][g.name] for g in s.groups)
        bits = [decisions["layers"].get(la.name, {}).get("bits", 32) for la in s.layers]
        acts = [decisions["layers"].get(la.name, {}).get("activation", "float") for la in s.layers]
        clusters = [decisions["layers"].get(la.name, {}).get("clusters") for la in s.layers]
        config = Config(channels, tuple(bits), tuple(acts), tuple(clusters))
        figures = self.cost.predict(config)
        kept = sum(channels) / sum(g.channels for g in s.groups)
        accuracy = 60 + 30 * kept - sum(8 - min(b, 8) for b in bits) * 0.1
        return Outcome(
            accuracy=accuracy,
            flops=figures["flops"],
            latency_ms=1.03 * figures["latency_ms"] if measure else None,
            memory_mb=1.03 * figures["memory_mb"] if measure else None,
            size_kb=1.03 * figures["size_kb"],
            measurement={"mode": "analytic"},
        )


def _baseline(cost: CostModel, structure) -> dict:
    return {"accuracy": 90.0, **cost.predict(Config.full(structure))}


def _env(structure, budgets: Budgets, kind=PruningEnv, **kwargs):
    cost = _cost(structure)
    scorer = _Scorer(cost, structure)
    return kind(structure, cost, scorer, budgets, _baseline(cost, structure), **kwargs), scorer


@pytest.mark.parametrize(
    "kind, kwargs",
    [
        (PruningEnv, {"channel_multiple": 4}),
        (QuantizationEnv, {"bits": (2, 4, 8)}),
        (QuantizationEnv, {"bits": (2, 4, 8), "clusters": (4, 16)}),
        (SharingEnv, {}),
    ],
)
def test_environments_pass_gymnasiums_checker(structure, kind, kwargs) -> None:
    env, _ = _env(structure, Budgets(latency_ms=1.5, size_kb=40.0), kind, **kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # render-mode and action-range advice only
        check_env(env, skip_render_check=True)
    obs, _ = env.reset(seed=0)
    assert env.observation_space.contains(obs)


@pytest.mark.parametrize(
    "budgets",
    [
        Budgets(latency_ms=1.0),
        Budgets(size_kb=20.0),
        Budgets(latency_ms=1.4, memory_mb=19.0, size_kb=30.0),
    ],
)
def test_the_wall_keeps_every_budget_whatever_the_agent_asks(structure, budgets) -> None:
    env, _ = _env(structure, budgets, channel_multiple=2)
    assert env.fits(env.floor_config())
    rng = np.random.default_rng(0)
    for _ in range(10):
        env.reset()
        done = False
        while not done:
            _, _, done, _, info = env.step(rng.uniform(0, 1, env.action_dim).astype(np.float32))
        predicted = info["candidate"]["predicted"]
        for key, limit in budgets.resources().items():
            assert predicted[key] <= limit, (key, predicted[key], limit)


def test_the_wall_lowers_bits_for_a_size_budget(structure) -> None:
    env, _ = _env(structure, Budgets(size_kb=60.0), QuantizationEnv, bits=(2, 4, 8))
    env.reset()
    done = False
    while not done:  # the agent always asks for the most bits
        _, _, done, _, info = env.step(np.ones(env.action_dim, np.float32))
    bits = [v["bits"] for v in info["candidate"]["decisions"]["layers"].values()]
    assert min(bits) < 8 and info["candidate"]["predicted"]["size_kb"] <= 60.0
    env2, _ = _env(structure, Budgets(), QuantizationEnv, bits=(2, 4, 8))
    env2.reset()
    done = False
    while not done:
        _, _, done, _, info = env2.step(np.ones(env2.action_dim, np.float32))
    assert {v["bits"] for v in info["candidate"]["decisions"]["layers"].values()} == {8}


def test_without_budgets_actions_map_straight_onto_choices(structure) -> None:
    env, _ = _env(structure, Budgets(), channel_multiple=1)
    env.reset()
    _, _, _, _, info = env.step(np.array([0.0], np.float32))
    assert info["applied_action"][0] == 0.0
    choices = env.knobs[0][0].choices
    assert env._config.channels[0] == choices[0]


def test_state_is_normalised_and_tracks_the_episode(structure) -> None:
    env, _ = _env(structure, Budgets(latency_ms=1.0), channel_multiple=2)
    first, _ = env.reset()
    second, *_ = env.step(np.array([0.0], np.float32))
    assert first.dtype == np.float32 and (0 <= first).all() and (first <= 1).all()
    assert second[0] > first[0]  # layer index
    assert second[12] > first[12]  # reduced so far
    assert second[-1] == 0.0  # previous action


def test_a_candidate_met_again_is_not_evaluated_again(structure) -> None:
    env, scorer = _env(structure, Budgets())
    for _ in range(3):
        env.reset()
        done = False
        while not done:
            *_, done, _, info = env.step(np.ones(1, np.float32))
    assert scorer.calls == 1 and info["candidate"]["cached"]


def test_pruning_decisions_name_every_group(structure) -> None:
    env, _ = _env(structure, Budgets(latency_ms=1.0), channel_multiple=4)
    env.reset()
    done = False
    while not done:
        *_, done, _, info = env.step(np.ones(1, np.float32))
    channels = info["candidate"]["decisions"]["channels"]
    assert set(channels) == {g.name for g in structure.groups}
    assert all(
        c % 4 == 0 or c == g.channels for c, g in zip(channels.values(), structure.groups, strict=True)
    )


def test_structure_counts_agree_with_the_graph_analysis(resnet) -> None:
    graph, structure = resnet
    cost = CostModel(structure)
    rng = np.random.default_rng(1)
    for _ in range(5):
        kept = tuple(int(rng.integers(1, g.channels + 1)) for g in structure.groups)
        config = Config.full(structure)
        for i, k in enumerate(kept):
            config = config.with_group(i, k)
        expected = graph.cost({g.name: k for g, k in zip(structure.groups, kept, strict=True)})[1]
        assert cost.raw(config)["flops"] == expected


def test_channel_choices_round_to_the_multiple_and_never_reach_zero() -> None:
    assert channel_choices(64, 8, 0.2) == (16, 24, 32, 40, 48, 56, 64)
    assert channel_choices(10, 8, 0.1) == (8, 10)
    assert channel_choices(3, 16, 0.5) == (3,)


def test_affine_fit_recovers_a_line_and_reports_its_error() -> None:
    fit = fit_affine([1.0, 2.0, 3.0], [1.5, 2.5, 3.5])
    assert fit.offset == pytest.approx(0.5) and fit.slope == pytest.approx(1.0)
    assert fit.error == pytest.approx(0.0, abs=1e-9)
    assert fit_affine([2.0], [4.0])(3.0) == pytest.approx(6.0)


def test_reward_pays_accuracy_and_charges_missed_budgets() -> None:
    base = {"accuracy": 90.0, "latency_ms": 4.0, "flops": 1e6, "size_kb": 100.0}
    budgets = Budgets(latency_ms=2.0)
    met = reward({"accuracy": 85.0, "latency_ms": 1.9, "flops": 4e5}, base, budgets)
    missed = reward({"accuracy": 85.0, "latency_ms": 3.0, "flops": 4e5}, base, budgets)
    assert met == pytest.approx(0.85) and missed == pytest.approx(0.85 - 2.0 * 0.5)
    dead = reward({"accuracy": 85.0, "latency_ms": None, "flops": 4e5}, base, budgets)
    assert dead < missed  # a model that did not fit the device's memory
    flops = reward({"accuracy": 85.0, "latency_ms": 9.0, "flops": 6e5}, base, budgets, "flops")
    assert flops == pytest.approx(0.85 - 2.0 * (6e5 / 5e5 - 1))  # latency unseen in that mode
    sized = reward({"accuracy": 85.0, "flops": 4e5, "size_kb": 60.0}, base, Budgets(size_kb=50.0), "flops")
    assert sized == pytest.approx(0.85 - 2.0 * 0.2)  # file size is exact: FLOPs mode keeps it
    drop = Budgets(max_accuracy_drop=1.0)
    fast = reward({"accuracy": 89.5, "latency_ms": 1.0, "flops": 1}, base, drop)
    slow = reward({"accuracy": 89.5, "latency_ms": 2.0, "flops": 1}, base, drop)
    lossy = reward({"accuracy": 85.0, "latency_ms": 1.0, "flops": 1}, base, drop)
    assert fast > slow and fast > lossy
    rows = check(Budgets(latency_ms=2.0, max_accuracy_drop=1.0), {"latency_ms": 2.5, "accuracy": 89.5}, 90.0)
    assert [r["met"] for r in rows] == [False, True]


def test_equal_reward_goes_to_the_smaller_and_faster_candidate() -> None:
    fp32 = {"feasible": True, "reward": 0.94, "latency_ms": 0.20, "memory_mb": 3.0, "size_kb": 87.0}
    int8 = {**fp32, "latency_ms": 0.21, "size_kb": 27.0}  # as accurate, a bit slower, 3x smaller
    assert better(int8, fp32) and not better(fp32, int8)
    assert not better(dict(fp32), fp32)  # a full tie keeps the earlier one
    assert better({**fp32, "reward": 0.95, "size_kb": 500.0}, int8)  # accuracy comes first
    assert not better({**int8, "feasible": False, "reward": 0.99}, fp32)  # and budgets before it
    unmeasured = {**int8, "latency_ms": None, "memory_mb": None}  # FLOPs mode: size alone decides
    assert better(unmeasured, fp32)


@pytest.mark.parametrize("agent", sorted(set(AGENTS) - {"decore"}))
def test_resumed_search_replays_without_evaluating_and_ends_the_same(
    structure, agent, tmp_path: Path
) -> None:
    def search(episodes: int, log: CandidateLog):
        env, scorer = _env(structure, Budgets(latency_ms=1.2), channel_multiple=2)
        result = run_episodes(env, make_agent(agent, env, 12, seed=5), episodes, log_file=log)
        return result, scorer

    full, _ = search(12, CandidateLog(tmp_path / "full.jsonl"))
    log = CandidateLog(tmp_path / "resumed.jsonl")
    search(7, log)  # "killed" after 7 episodes
    assert len(CandidateLog(tmp_path / "resumed.jsonl").records) == 7
    resumed, scorer = search(12, CandidateLog(tmp_path / "resumed.jsonl"))
    records = CandidateLog(tmp_path / "resumed.jsonl").records
    assert [r["episode"] for r in records] == list(range(12))
    assert [r["digest"] for r in records] == [r["digest"] for r in full.records]
    assert resumed.best["digest"] == full.best["digest"]
    assert scorer.calls == len({r["digest"] for r in records[7:]} - {r["digest"] for r in records[:7]})


def test_stage_one_takes_its_share_of_a_budget_in_log_terms() -> None:
    from edgecompress.search.session import stage_one_share

    start, floor, reach = {"size_kb": 400.0}, {"size_kb": 100.0}, {"size_kb": 25.0}
    # pruning can do 4x, precision 4x more: a 4x budget is split evenly, 2x each
    assert stage_one_share({"size_kb": 100.0}, start, floor, reach)["size_kb"] == pytest.approx(200.0)
    # precision cannot help (reach == floor): stage 1 must meet the budget itself
    assert stage_one_share({"size_kb": 100.0}, start, floor, floor)["size_kb"] == pytest.approx(100.0)
    # pruning cannot help: stage 1 is left unconstrained (its start)
    assert stage_one_share(
        {"latency_ms": 5.0}, {"latency_ms": 8.0}, {"latency_ms": 8.0}, {"latency_ms": 4.0}
    ) == {"latency_ms": pytest.approx(8.0)}
    # latency is shared only when pruning alone cannot meet it
    assert stage_one_share(
        {"latency_ms": 6.0}, {"latency_ms": 8.0}, {"latency_ms": 5.0}, {"latency_ms": 2.0}
    ) == {"latency_ms": 6.0}
    # already met at the start: nothing to share
    assert stage_one_share({"size_kb": 500.0}, start, floor, reach) == {"size_kb": 500.0}
