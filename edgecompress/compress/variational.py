"""Variational kernel importance: per-kernel gates with a learned Gaussian posterior.

Zhao et al., "Variational Convolutional Neural Network Pruning" (CVPR 2019), give each
channel a stochastic saliency with a Gaussian posterior q = N(mu, sigma^2), trained on
the task loss plus the KL divergence to a sparsity-inducing prior, and remove what the
posterior says does not matter; the two-stage DRL paper applies that variational
pruning to whole 2-D kernels. Here every k x k kernel W[o, i] of a convolution gets a
multiplicative gate g[o, i] ~ q. The network runs with W * g (one reparameterized
sample per batch, BatchNorm in eval mode, the network's own weights frozen), and
(mu, log sigma^2) are trained by Adam on

    cross-entropy + kl_weight * sum KL(q || N(0, prior_std^2))

(the evidence lower bound; kl_weight defaults to 1 / training images). A kernel's
importance (`SCORES`, chosen by `VariationalConfig.score`) is by default the posterior's
signal-to-noise ratio |mu| / sigma, as in structured Bayesian pruning (Neklyudov et
al., 2017): a gate the loss needs stays sharp and away from zero, one it does not
drifts to the prior, wide and centred on zero. "expected_norm" is |mu| * ||W[o, i]||,
the L2 norm of the kernel the posterior mean leaves (magnitude pruning of the gated
network). The scores go to `sparse.kernel_mask`, which zeroes the lowest in each layer.
benchmarks/kernel_pruning.py measures both against plain L2 on ResNet-20.

The scores are data, like the learned channel criterion's: computed once on the
original model with training images, then handed to `apply` / `compress_model`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from edgecompress.data import Dataset
from edgecompress.errors import DataError, PlanError
from edgecompress.zoo.spec import InputSpec

log = logging.getLogger(__name__)
Progress = Callable[[str, "float | None"], None]


@dataclass(frozen=True)
class VariationalConfig:
    steps: int = 300
    batch_size: int = 64
    lr: float = 0.05  # Adam, on the gate means and log-variances only
    # The zero-centred prior every gate is pulled towards; narrow enough to pull the gates
    # the loss does not need towards zero (0.1 pulled nearly all of ResNet-20's gates to 0,
    # 0.5 moved few of them: chosen on held-out images, not the test split).
    prior_std: float = 0.2
    kl_weight: float | None = None  # None: 1 / (training images), the ELBO's weight
    init_std: float = 0.05  # gates start at mean 1, nearly deterministic: the original net
    max_images: int | None = None  # a fixed random subset of the training data
    score: str = "snr"  # a key of SCORES
    seed: int = 0


def gated_layers(module: nn.Module) -> list[str]:
    """Conv layers with k x k kernels (k > 1): those kernel-wise pruning applies to."""
    return [
        name
        for name, m in module.named_modules()
        if isinstance(m, nn.Conv2d) and m.kernel_size[0] * m.kernel_size[1] > 1
    ]


def gaussian_kl(mu: torch.Tensor, log_var: torch.Tensor, prior_std: float) -> torch.Tensor:
    """KL(N(mu, exp(log_var)) || N(0, prior_std^2)), summed over all entries."""
    var = log_var.exp()
    return (math.log(prior_std) - 0.5 * log_var + (var + mu * mu) / (2 * prior_std**2) - 0.5).sum()


def train_gates(
    module: nn.Module,
    spec: InputSpec,
    data: Dataset,
    *,
    layers: Sequence[str] | None = None,
    config: VariationalConfig | None = None,
    progress: Progress | None = None,
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per layer, the trained gate posteriors: (mean, log-variance), each (out, in).

    `module` is not changed (its weights are read, never trained); `data` holds uint8
    training images. Deterministic for a given config seed on one device.
    """
    config = config or VariationalConfig()
    if config.score not in SCORES:
        raise PlanError(
            f"unknown variational kernel score {config.score!r}; choose one of: {', '.join(SCORES)}"
        )
    if len(data) == 0:
        raise DataError("variational kernel scores need training images; the dataset is empty")
    modules = dict(module.named_modules())
    names = list(layers) if layers is not None else gated_layers(module)
    bad = [n for n in names if not isinstance(modules.get(n), nn.Conv2d)]
    if bad:
        raise PlanError(f"variational kernel scores need Conv2d layers; {bad[0]!r} is not one")
    data = data.take(config.max_images, seed=config.seed)
    kl_weight = config.kl_weight if config.kl_weight is not None else 1.0 / len(data)
    device = next(module.parameters()).device
    init_log_var = 2.0 * math.log(config.init_std)
    mus, log_vars = {}, {}
    for name in names:
        o, i = modules[name].weight.shape[:2]
        mus[name] = torch.ones(o, i, device=device, requires_grad=True)
        log_vars[name] = torch.full((o, i), init_log_var, device=device, requires_grad=True)
    optimizer = torch.optim.Adam([*mus.values(), *log_vars.values()], lr=config.lr)
    # Every parameter detached: training the gates must leave no gradient on the model.
    frozen = {k: p.detach() for k, p in module.named_parameters()}
    rng = np.random.default_rng(config.seed)
    gen = torch.Generator(device=device).manual_seed(int(rng.integers(2**31)))
    labels = torch.from_numpy(data.y)
    was_training = module.training
    module.eval()
    order = rng.permutation(len(data))
    pos, loss = 0, torch.tensor(float("nan"))
    try:
        for step in range(config.steps):
            if pos + config.batch_size > len(order):
                order, pos = rng.permutation(len(data)), 0
            batch = np.sort(order[pos : pos + config.batch_size])
            pos += config.batch_size
            x = torch.from_numpy(spec.normalize(data.x[batch])).to(device)
            y = labels[batch].to(device)
            weights = dict(frozen)
            kl = torch.zeros((), device=device)
            for name in names:
                mu, log_var = mus[name], log_vars[name]
                eps = torch.randn(mu.shape, generator=gen, device=device)
                gate = mu + eps * (0.5 * log_var).exp()
                weights[f"{name}.weight"] = frozen[f"{name}.weight"] * gate[:, :, None, None]
                kl = kl + gaussian_kl(mu, log_var, config.prior_std)
            loss = F.cross_entropy(functional_call(module, weights, (x,)), y) + kl_weight * kl
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if progress:
                progress("variational kernel scores", (step + 1) / config.steps)
    finally:
        module.train(was_training)
    log.info("variational kernel gates: %d steps, final loss %.4f", config.steps, float(loss.detach()))
    return {name: (mus[name].detach().cpu().numpy(), log_vars[name].detach().cpu().numpy()) for name in names}


def kernel_scores(
    module: nn.Module,
    spec: InputSpec,
    data: Dataset,
    *,
    layers: Sequence[str] | None = None,
    config: VariationalConfig | None = None,
    progress: Progress | None = None,
) -> dict[str, np.ndarray]:
    """Per layer, an (out, in) array of kernel importances (higher: keep), by `config.score`.

    `module` is not changed; `data` holds uint8 training images.
    """
    config = config or VariationalConfig()
    gates = train_gates(module, spec, data, layers=layers, config=config, progress=progress)
    return gate_scores(module, gates, config.score)


def gate_scores(
    module: nn.Module, gates: dict[str, tuple[np.ndarray, np.ndarray]], score: str = "snr"
) -> dict[str, np.ndarray]:
    """Kernel importances from trained gates (`train_gates`), by a key of SCORES."""
    if score not in SCORES:
        raise PlanError(f"unknown variational kernel score {score!r}; choose one of: {', '.join(SCORES)}")
    modules = dict(module.named_modules())
    out = {}
    for name, (mu, log_var) in gates.items():
        w = modules[name].weight.detach().cpu().numpy().astype(np.float64)
        out[name] = SCORES[score](mu.astype(np.float64), log_var.astype(np.float64), w)
    return out


def _snr(mu: np.ndarray, log_var: np.ndarray, weight: np.ndarray) -> np.ndarray:
    return np.abs(mu) / np.exp(0.5 * log_var)


def _expected_norm(mu: np.ndarray, log_var: np.ndarray, weight: np.ndarray) -> np.ndarray:
    return np.abs(mu) * np.sqrt((weight**2).sum((2, 3)))


# Kernel importance from a gate posterior (mean, log-variance) and the kernel's weights.
SCORES: dict[str, Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]] = {
    "snr": _snr,
    "expected_norm": _expected_norm,
}
