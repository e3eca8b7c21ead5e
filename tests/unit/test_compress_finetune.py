"""Fine-tuning: distillation loss, class subsets, and resuming a killed run exactly."""

from __future__ import annotations

import copy

import pytest
import torch
from compress_fixtures import digits, trained_small_cnn

from edgecompress.compress.api import prune_model, uniform_plan
from edgecompress.compress.finetune import FinetuneConfig, distillation_loss, finetune
from edgecompress.compress.plan import CompressionPlan
from edgecompress.data import load_dataset
from edgecompress.evaluate import evaluate


def test_distillation_loss_mixes_labels_and_teacher() -> None:
    torch.manual_seed(0)
    logits, labels = torch.randn(8, 10), torch.randint(0, 10, (8,))
    config = FinetuneConfig(distill_weight=0.7, temperature=4.0)
    hard = torch.nn.functional.cross_entropy(logits, labels)
    # A teacher that agrees with the student adds nothing: only the label term, weighted.
    torch.testing.assert_close(distillation_loss(logits, logits.clone(), labels, config), 0.3 * hard)
    assert distillation_loss(logits, None, labels, config) == hard
    other = distillation_loss(logits, torch.randn(8, 10), labels, config)
    assert other > 0.3 * hard


class _Stop(Exception):
    pass


def test_a_killed_run_resumes_from_its_checkpoint_and_ends_where_an_unbroken_run_ends(tmp_path) -> None:
    base = trained_small_cnn()
    data = digits("train")
    config = FinetuneConfig(epochs=2, batch_size=64, max_images=192, lr=0.02, checkpoint=tmp_path / "a.pt")
    whole = copy.deepcopy(base.module)
    finetune(whole, base.spec, data, teacher=base.module, config=config)

    broken = copy.deepcopy(base.module)
    resumed_config = FinetuneConfig(**{**config.__dict__, "checkpoint": tmp_path / "b.pt"})

    def kill(stage: str, fraction: float | None) -> None:
        if fraction is not None and fraction > 0.6:  # during epoch 2, after epoch 1's checkpoint
            raise _Stop

    with pytest.raises(_Stop):
        finetune(broken, base.spec, data, teacher=base.module, config=resumed_config, progress=kill)
    again = copy.deepcopy(base.module)
    result = finetune(again, base.spec, data, teacher=base.module, config=resumed_config)
    assert result.resumed_from_epoch == 1 and result.steps == 6
    for (k, a), b in zip(whole.state_dict().items(), again.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, msg=k, rtol=1e-5, atol=1e-6)


def test_a_checkpoint_of_another_model_is_not_resumed(tmp_path) -> None:
    """Regression: a repair fine-tunes a smaller model into the same checkpoint path; it
    must train afresh, not load the earlier model's (differently shaped) weights."""
    base = trained_small_cnn()
    data = digits("train")
    config = FinetuneConfig(epochs=1, batch_size=64, max_images=128, lr=0.02, checkpoint=tmp_path / "c.pt")
    finetune(copy.deepcopy(base.module), base.spec, data, config=config)
    smaller = prune_model(base, uniform_plan(base, keep_ratio=0.5))
    result = finetune(smaller.module, smaller.spec, data, config=config)
    assert result.resumed_from_epoch == 0 and result.steps == 2
    same_start = copy.deepcopy(base.module)
    assert finetune(same_start, base.spec, data, config=config).resumed_from_epoch == 0


def test_class_subset_fine_tuning_learns_the_subset() -> None:
    base = trained_small_cnn()
    classes = (0, 1, 7)
    student = prune_model(base, CompressionPlan(classes=classes))
    sub_train, sub_test = load_dataset("digits", "train", classes), load_dataset("digits", "test", classes)
    config = FinetuneConfig(epochs=2, batch_size=32, max_images=256, lr=0.02)
    result = finetune(
        student.module, student.spec, sub_train, teacher=base.module, teacher_classes=classes, config=config
    )
    assert result.device in ("cpu", "cuda")
    assert result.steps == 16 and result.final_loss == result.final_loss  # not NaN
    assert student.spec.num_classes == 3
    assert evaluate(student, sub_test).top1 >= 90.0
