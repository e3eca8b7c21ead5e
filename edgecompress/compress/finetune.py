"""Fine-tuning after compression: SGD with a cosine schedule and distillation from the original.

loss = (1 - w) * cross-entropy(labels) + w * T^2 * KL(teacher_T || student_T)
(Hinton et al., 2015). Class subsets: the data's labels are the subset's (0..k-1) and
the teacher's logits are cut to the same classes. A checkpoint after every epoch lets
a killed run resume where it stopped; CUDA is used when present.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from edgecompress.data import Dataset
from edgecompress.errors import DataError
from edgecompress.zoo.spec import InputSpec

log = logging.getLogger(__name__)
Progress = Callable[[str, "float | None"], None]


@dataclass(frozen=True)
class FinetuneConfig:
    epochs: int = 1
    lr: float = 0.01
    # The quantized/shared stage trains the BatchNorm-folded graph that ships: without
    # BN it is not scale-invariant, and ResNet-20 diverged at lr 1e-3 (loss 15, 11% top-1)
    # while 1e-4 kept improving; so that stage uses this smaller rate.
    qat_lr: float = 1e-4
    momentum: float = 0.9
    weight_decay: float = 5e-4
    batch_size: int = 128
    temperature: float = 4.0
    distill_weight: float = 0.7  # 0: labels only; 1: teacher only
    max_images: int | None = None  # a fixed random subset of the training data per run
    augment: bool = True  # random crop (pad 4) and horizontal flip
    seed: int = 0
    checkpoint: Path | None = None  # resume from / save to this file after each epoch
    device: str | None = None  # default: cuda when available, else cpu


@dataclass(frozen=True)
class FinetuneResult:
    epochs: int
    steps: int
    final_loss: float
    resumed_from_epoch: int
    device: str


def _device(config: FinetuneConfig) -> torch.device:
    if config.device:
        return torch.device(config.device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _augment(x: torch.Tensor, rng: torch.Generator) -> torch.Tensor:
    """Random 4-pixel-padded crop and horizontal flip of a normalized NCHW batch."""
    n, _, h, w = x.shape
    padded = F.pad(x, (4, 4, 4, 4), mode="reflect")
    dy = torch.randint(0, 9, (n,), generator=rng)
    dx = torch.randint(0, 9, (n,), generator=rng)
    rows = (dy[:, None] + torch.arange(h)[None, :]).to(x.device)
    cols = (dx[:, None] + torch.arange(w)[None, :]).to(x.device)
    idx = torch.arange(n, device=x.device)[:, None, None]
    out = padded.permute(0, 2, 3, 1)[idx, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)
    flip = (torch.rand(n, generator=rng) < 0.5).to(x.device)
    return torch.where(flip[:, None, None, None], out.flip(3), out)


def distillation_loss(
    student: torch.Tensor, teacher: torch.Tensor | None, labels: torch.Tensor, config: FinetuneConfig
) -> torch.Tensor:
    hard = F.cross_entropy(student, labels)
    if teacher is None or config.distill_weight == 0:
        return hard
    t = config.temperature
    soft = F.kl_div(
        F.log_softmax(student / t, 1), F.log_softmax(teacher / t, 1), reduction="batchmean", log_target=True
    )
    return (1 - config.distill_weight) * hard + config.distill_weight * t * t * soft


def _save(path: Path, state: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def _weights_digest(module: nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        digest.update(name.encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def finetune(
    student: nn.Module,
    spec: InputSpec,
    data: Dataset,
    *,
    teacher: nn.Module | None = None,
    teacher_classes: tuple[int, ...] | None = None,
    config: FinetuneConfig | None = None,
    progress: Progress | None = None,
) -> FinetuneResult:
    """Train `student` in place on `data` (uint8 images), distilling from `teacher` if given."""
    config = config or FinetuneConfig()
    if len(data) == 0:
        raise DataError("fine-tuning needs training images; the dataset is empty")
    if data.num_classes > spec.num_classes:
        raise DataError(f"the data has {data.num_classes} classes but the model outputs {spec.num_classes}")
    device = _device(config)
    data = data.take(config.max_images, seed=config.seed)
    steps_per_epoch = math.ceil(len(data) / config.batch_size)
    total = max(1, steps_per_epoch * config.epochs)
    student.to(device)
    if teacher is not None:
        teacher.to(device).eval()
    params = [p for p in student.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(
        params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay, nesterov=True
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * s / total))
    )
    start_epoch, loss_value = 0, float("nan")
    fingerprint = {k: str(v) for k, v in asdict(config).items() if k not in ("checkpoint", "device")}
    # A checkpoint resumes only the fine-tune it came from: the same settings and the same
    # starting weights (a later fine-tune of another model into the same path starts afresh).
    fingerprint["start"] = _weights_digest(student)
    if config.checkpoint is not None and Path(config.checkpoint).is_file():
        state = torch.load(config.checkpoint, map_location=device, weights_only=False)
        if state.get("config") == fingerprint:
            student.load_state_dict(state["student"])
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            start_epoch = int(state["epoch"])
            log.info("resuming fine-tuning from epoch %d of %s", start_epoch, config.checkpoint)
        else:
            log.warning("ignoring checkpoint %s: it was made with another configuration", config.checkpoint)
    x_all = data.x
    y_all = torch.from_numpy(data.y)
    index = None if teacher_classes is None else torch.tensor(teacher_classes, device=device)
    step = start_epoch * steps_per_epoch
    for epoch in range(start_epoch, config.epochs):
        # The order of each epoch depends only on (seed, epoch), so a resumed run matches.
        rng = np.random.default_rng([config.seed, epoch])
        gen = torch.Generator().manual_seed(int(rng.integers(2**31)))
        order = rng.permutation(len(data))
        student.train()
        for b in range(steps_per_epoch):
            batch = order[b * config.batch_size : (b + 1) * config.batch_size]
            x = torch.from_numpy(spec.normalize(x_all[np.sort(batch)])).to(device)
            y = y_all[np.sort(batch)].to(device)
            if config.augment and x.shape[-1] > 8:
                x = _augment(x, gen)
            with torch.no_grad():
                t = teacher(x) if teacher is not None else None
                if t is not None and index is not None:
                    t = t.index_select(1, index)
            loss = distillation_loss(student(x), t, y, config)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            step += 1
            loss_value = float(loss.detach())
            if progress:
                progress("fine-tuning", step / total)
        if config.checkpoint is not None:
            _save(
                Path(config.checkpoint),
                {
                    "student": student.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "epoch": epoch + 1,
                    "config": fingerprint,
                },
            )
        log.info("fine-tune epoch %d/%d: loss %.4f", epoch + 1, config.epochs, loss_value)
    student.eval().cpu()
    if teacher is not None:
        teacher.cpu()
    return FinetuneResult(config.epochs, step, loss_value, start_epoch, str(device))
