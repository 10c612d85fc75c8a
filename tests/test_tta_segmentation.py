"""Test-time adaptation of segmentation models: Tent's per-pixel entropy against a hand computation, Tent and
BN-adapt on a tiny segmentation model, mIoU-scored results of a tiny segmentation run, and the TTAs that need one
prediction per image refusing it by name."""

from __future__ import annotations

import json
import math

import pytest
import torch

from dgkit.backbones import SmallCNN
from dgkit.checkpoint import load_checkpoint_and_data
from dgkit.methods import ERM
from dgkit.run import train
from dgkit.tasks import Segmentation
from dgkit.tasks.segmentation import SegmentationMetric
from dgkit.tta import T3A, AdaNPC, BNAdapt, DRMEnsemble, ITTAAdapter, Tent
from dgkit.tta.evaluate import stream
from dgkit.tta.runner import format_result, run_tta
from tests.conftest import compose_cfg
from tests.test_seg_data import write_seg_tree

pytestmark = pytest.mark.usefixtures("one_thread")


def _seg_method(norm: str = "batch") -> ERM:
    torch.manual_seed(0)
    backbone = SmallCNN(widths=[8, 8, 8, 8], strides=[1, 2, 2, 1], norm=norm, img_size=16)
    return ERM(backbone, num_classes=2, domains=["a", "b"], test_domains=["b"], task=Segmentation()).eval()


def test_tent_loss_is_the_entropy_averaged_over_pixels():
    # one image, 2 classes, 1 x 3 pixels: logits (0, 0), (log 3, 0) and (0, log 4)
    logits = torch.tensor([[[[0.0, math.log(3.0), 0.0]], [[0.0, 0.0, math.log(4.0)]]]])  # (1, 2, 1, 3)
    h = [math.log(2.0), -(0.75 * math.log(0.75) + 0.25 * math.log(0.25)), -(0.2 * math.log(0.2) + 0.8 * math.log(0.8))]
    assert Tent.loss(logits).item() == pytest.approx(sum(h) / 3, abs=1e-6)
    # two images: the mean runs over every pixel of the batch (none ignored)
    second = torch.zeros(1, 2, 1, 3)  # three pixels of entropy log 2
    assert Tent.loss(torch.cat([logits, second])).item() == pytest.approx((sum(h) + 3 * math.log(2.0)) / 6, abs=1e-6)


def test_tent_step_on_a_segmentation_model_changes_only_norm_affine_parameters():
    method = _seg_method()
    tta = Tent(optimizer=lambda p: torch.optim.SGD(p, lr=1.0), reset="never").bind_method(method)
    before = {k: v.clone() for k, v in tta.backbone.state_dict().items()}
    head_before = {k: v.clone() for k, v in tta.classifier.state_dict().items()}
    x = torch.randn(4, 3, 16, 16)
    with torch.enable_grad():
        out = tta.predict(x)
    assert out.shape == (4, 2, 16, 16)  # a prediction per pixel
    changed = {k for k, v in tta.backbone.state_dict().items() if not torch.equal(v, before[k])}
    norm_affine = {f"features.{i}.{p}" for i in (2, 5, 8, 11) for p in ("weight", "bias")}
    assert changed and changed <= norm_affine
    assert all(torch.equal(v, head_before[k]) for k, v in tta.classifier.state_dict().items())
    assert all(p.grad is None for p in method.parameters())  # the source model is untouched


def test_bn_adapt_on_a_segmentation_model_normalises_with_the_test_batch_statistics():
    method = _seg_method()
    method.backbone.features[2].running_mean.fill_(5.0)  # source statistics far from the batch's
    tta = BNAdapt().bind_method(method)
    bn = tta.backbone.features[2]
    seen = {}
    bn.register_forward_hook(lambda m, i, o: seen.update(inp=i[0].detach(), out=o.detach()))
    with torch.inference_mode():
        out = tta.predict(torch.randn(4, 3, 16, 16) + 3.0)
    assert out.shape == (4, 2, 16, 16)
    conv = seen["inp"]
    mean = conv.mean(dim=(0, 2, 3), keepdim=True)
    var = conv.var(dim=(0, 2, 3), unbiased=False, keepdim=True)
    expected = (conv - mean) / torch.sqrt(var + bn.eps) * bn.weight.view(1, -1, 1, 1) + bn.bias.view(1, -1, 1, 1)
    assert torch.allclose(seen["out"], expected, atol=1e-5)
    assert bn.running_mean is None  # the source statistics are not used


@pytest.mark.parametrize("cls", [T3A, AdaNPC, ITTAAdapter, DRMEnsemble])
def test_per_image_ttas_refuse_a_segmentation_model_naming_themselves(cls):
    method = _seg_method()
    with pytest.raises(ValueError, match=f"tta={cls.name} is not defined for task=segmentation"):
        cls().bind_method(method)
    with pytest.raises(ValueError, match=f"tta={cls.name} is not defined for task=segmentation"):
        cls().bind(method.backbone, method.classifier, task=Segmentation())


@pytest.fixture(scope="module")
def seg_run(tmp_path_factory):
    """A tiny BatchNorm segmentation run trained with ``tta=tent``; its folder and final summary."""
    tmp = tmp_path_factory.mktemp("seg_tta")
    root = write_seg_tree(tmp / "maps", n=6, size=16)
    overrides = [
        "+exp=hist_maps_erm", "data=seg_folder", f"data.root={root}", "data.num_classes=2", "data.test_domains=[c]",
        "data.image_size=16", "data.batch_size=2", "data.num_workers=0", "data.holdout_fraction=0.34",
        "backbone.norm=batch", "trainer.max_steps=2", "trainer.val_check_interval=2",
        "trainer.enable_progress_bar=false", "trainer.accelerator=cpu", "logger=none", "print_summary=false",
        "tta=tent", "tta.batch_size=2",
    ]  # fmt: skip
    final = train(compose_cfg(overrides, tmp / "run"))
    return tmp / "run", final


def test_train_with_tent_on_segmentation_records_miou(seg_run):
    folder, final = seg_run
    entry = final["tta"]["tent"]
    assert entry["metric"] == "miou" and set(entry["sets"]["c"]) == {"miou_none", "miou_tta"}
    result = json.loads(open(entry["file"]).read())
    assert result["task"] == "segmentation" and result["metric_name"] == "mIoU"
    assert 0.0 <= result["mean_miou_tta"] <= 1.0 and not any(k.startswith("acc") for k in result["sets"]["c"])


def test_run_tta_on_segmentation_scores_miou_over_the_stream(seg_run, tmp_path):
    folder, _ = seg_run
    ckpt = folder / "checkpoints" / "best.ckpt"
    result, path = run_tta(ckpt, BNAdapt(batch_size=2), out=tmp_path / "bn.json")
    assert json.loads(path.read_text())["sets"] == result["sets"]
    assert result["metric"] == "miou" and "mIoU" in format_result(result)
    # both scores are the task's mIoU over the same seeded stream, recomputed here by hand
    _, datamodule, method = load_checkpoint_and_data(ckpt)
    images = datamodule.split("c", "in")
    none, adapted = SegmentationMetric(2), SegmentationMetric(2)
    bn = BNAdapt(batch_size=2).bind_method(method)
    with torch.inference_mode():
        for x, y in stream(images, 2, 0):
            none.update(method(x).argmax(1), y)
            adapted.update(bn.predict(x).argmax(1), y)
    c = result["sets"]["c"]
    assert c["images"] == len(images)
    assert c["miou_none"] == pytest.approx(none.compute().item(), abs=1e-6)
    assert c["miou_tta"] == pytest.approx(adapted.compute().item(), abs=1e-6)
    with pytest.raises(ValueError, match="tta=t3a is not defined for task=segmentation"):
        run_tta(ckpt, T3A(), out=tmp_path / "t3a.json")
