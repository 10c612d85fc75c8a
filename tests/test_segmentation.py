"""Segmentation as a task: the metric against a hand-made confusion matrix, the head on CNN and ViT
intermediates, the ignore label, and objectives that refuse dense targets."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dgkit.backbones import SmallCNN, TimmBackbone
from dgkit.methods import DANN, DRM, ERM, UDIM, LinearProbe
from dgkit.tasks import Classification, Segmentation
from dgkit.tasks.segmentation import IGNORE, SegmentationMetric

pytestmark = pytest.mark.usefixtures("one_thread")


def _maps(k: int, seed: int, shape=(3, 9, 11)) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    target = torch.randint(0, k, shape, generator=g)
    target[torch.rand(shape, generator=g) < 0.1] = IGNORE
    pred = torch.where(torch.rand(shape, generator=g) < 0.6, target.clamp(max=k - 1), torch.randint(0, k, shape))
    return pred, target


def _numpy_scores(pred: np.ndarray, target: np.ndarray, k: int) -> dict[str, np.ndarray]:
    keep = target != IGNORE
    cm = np.zeros((k, k), np.int64)
    for t, p in zip(target[keep], pred[keep]):
        cm[t, p] += 1
    tp = np.diag(cm).astype(float)
    fp, fn = cm.sum(0) - tp, cm.sum(1) - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = tp / (tp + fp + fn)
        dice = 2 * tp / (2 * tp + fp + fn)
    return {"iou": iou, "dice": dice, "tp": tp, "fp": fp, "fn": fn}


@pytest.mark.parametrize("k", [2, 4])
def test_miou_and_dice_match_a_hand_made_confusion_matrix(k):
    metric = SegmentationMetric(k)
    preds, targets = [], []
    for seed in range(3):  # accumulated over batches
        p, t = _maps(k, seed)
        metric.update(p, t)
        preds.append(p.numpy()), targets.append(t.numpy())
    ref = _numpy_scores(np.concatenate(preds), np.concatenate(targets), k)
    assert metric.compute().item() == pytest.approx(np.nanmean(ref["iou"]), abs=1e-6)
    assert metric.dice().item() == pytest.approx(np.nanmean(ref["dice"]), abs=1e-6)
    np.testing.assert_allclose(metric.per_class_iou().numpy(), ref["iou"], atol=1e-9)
    scores = metric.scores()
    assert set(scores) >= {"miou", "dice", *(f"iou_{c}" for c in range(k))}
    if k == 2:
        tp, fp, fn = ref["tp"][1], ref["fp"][1], ref["fn"][1]
        p, r = tp / (tp + fp), tp / (tp + fn)
        assert scores["precision"].item() == pytest.approx(p, abs=1e-6)
        assert scores["recall"].item() == pytest.approx(r, abs=1e-6)
        assert scores["f1"].item() == pytest.approx(2 * p * r / (p + r), abs=1e-6)
    else:
        with pytest.raises(ValueError, match="binary"):
            metric.foreground()


def test_absent_classes_do_not_count_and_ignored_pixels_are_skipped():
    metric = SegmentationMetric(3)
    target = torch.tensor([[[0, 0, 1, IGNORE]]])
    metric.update(torch.tensor([[[0, 0, 1, 2]]]), target)  # class 2 only under an ignored pixel
    assert metric.compute().item() == 1.0
    assert torch.isnan(metric.per_class_iou()[2])


@pytest.mark.parametrize(
    "backbone",
    [
        lambda: SmallCNN(widths=[8, 8, 8, 8], strides=[1, 2, 2, 1], img_size=32),
        lambda: TimmBackbone("test_vit", input_size=32, model_kwargs={"img_size": 32}),
    ],
    ids=["small_cnn", "vit"],
)
def test_head_gives_logits_at_the_input_size_and_trains(backbone):
    torch.manual_seed(0)
    task = Segmentation(levels=2, width=8)
    method = ERM(backbone(), num_classes=3, domains=["a", "b"], test_domains=["b"], task=task)
    x = torch.randn(2, 3, 32, 32)
    y = torch.randint(0, 3, (2, 32, 32))
    y[:, :4] = IGNORE
    out = method(x)
    assert out.shape == (2, 3, 32, 32)
    assert task.predict(out).shape == (2, 32, 32)
    loss = method.training_losses({"a": (x, y)})["loss"]
    loss.backward()
    assert all(p.grad is not None for p in method.classifier.parameters())
    # ignored pixels do not count: changing their logits leaves the loss unchanged
    out2 = out.detach().clone()
    out2[:, :, :4] += 5.0
    assert task.loss(out2, y).item() == pytest.approx(task.loss(out.detach(), y).item(), rel=1e-6)


def test_logits_are_resized_to_odd_target_sizes():
    task = Segmentation()
    logits = torch.randn(1, 2, 8, 8)
    target = torch.zeros(1, 9, 9, dtype=torch.long)
    assert task.loss(logits, target).isfinite()
    metric = task.build_metric(2)
    task.update_metric(metric, logits, target)
    assert metric.confmat.sum() == 81


@pytest.mark.parametrize(
    "cls,name", [(DANN, "discriminator"), (UDIM, "per-sample"), (DRM, "per-domain"), (LinearProbe, "linear layer")]
)
def test_per_image_objectives_refuse_segmentation_naming_themselves(cls, name):
    backbone = SmallCNN(widths=[8, 8, 8, 8], img_size=16)
    with pytest.raises(ValueError, match=rf"{cls.__name__} is not defined for task=segmentation.*{name}"):
        cls(backbone, num_classes=2, domains=["a", "b", "c"], test_domains=["c"], task=Segmentation())
    cls(backbone, num_classes=2, domains=["a", "b", "c"], test_domains=["c"], task=Classification())  # still fine
