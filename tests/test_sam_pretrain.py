"""SAM pre-training (issue 15, section 4 item 1): the generated corpus, SAM's prompts and losses, one step of the whole
SAM, the batched decoder, the export and the run; tiny random-init sam_tiny at 64 px."""

from __future__ import annotations

import importlib.util
import json
import math
import sys

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from torchvision.ops import sigmoid_focal_loss

from dgkit.backbones import SAMBackbone
from dgkit.data.embedded import sam_corpus
from dgkit.export import export_backbone
from dgkit.methods.sam_pretrain import (
    SAMPretrain,
    box_of,
    decode_rows,
    dice_per_mask,
    focal_per_mask,
    jitter_box,
    min_mask_loss,
    sample_point,
    warmup_step_decay,
)
from dgkit.run import train
from dgkit.tasks.promptable import PromptableSegmentation, PromptedIoU
from dgkit.utils.io import read_jsonl
from tests.conftest import ROOT, compose_cfg

# conf/backbone/sam_tiny.yaml at 64 px, with its prompt encoder and mask decoder
TINY_SAM = dict(img_size=64, embed_dim=64, depth=2, num_heads=2, global_attn_indexes=[1], window_size=4, out_chans=64,
                prompt_decoder=True, decoder_mlp_dim=128, decoder_heads=2)  # fmt: skip


def _sam(seed: int = 0) -> SAMBackbone:
    torch.manual_seed(seed)
    return SAMBackbone(**TINY_SAM)


def _method(seed: int = 0, **kw) -> SAMPretrain:
    return SAMPretrain(_sam(seed), 9, ["a", "b", "c"], ["c"], task=PromptableSegmentation(), **kw)


def _instances(n: int = 2, size: int = 64) -> torch.Tensor:
    """Instance maps with three rectangles (ids 1..3), the third partly over the first."""
    y = torch.zeros(n, size, size, dtype=torch.long)
    y[:, 4:20, 6:30] = 1
    y[:, 30:50, 10:22] = 2
    y[:, 15:40, 25:60] = 3
    return y


# ------------------------------------------------------------------------------------------------- corpus


def test_corpus_is_seeded_and_has_no_hidden_ids():
    a, b = sam_corpus.generate(3, seed=5), sam_corpus.generate(3, seed=5)
    c = sam_corpus.generate(3, seed=6)
    assert list(a) == list(sam_corpus.FAMILIES)
    for d in a:
        np.testing.assert_array_equal(a[d][0], b[d][0])
        np.testing.assert_array_equal(a[d][1], b[d][1])
        assert not np.array_equal(a[d][0], c[d][0])
        x, m = a[d]
        assert x.shape == (3, 128, 128, 3) and x.dtype == np.uint8 and m.shape == (3, 128, 128) and m.dtype == np.uint8
        for mask in m:  # ids are 1..K with no gap: every object is visible somewhere
            ids = np.unique(mask)
            np.testing.assert_array_equal(ids, np.arange(len(ids)))
            assert ids.max() <= sam_corpus.MAX_OBJECTS


@pytest.mark.parametrize("domain", list(sam_corpus.FAMILIES))
def test_corpus_masks_match_the_painted_shapes(domain):
    rng = np.random.default_rng(3)
    background, layers = sam_corpus.scene(rng, domain)
    image, ids = sam_corpus.compose(background, layers)
    # independent construction: layer j is visible where its shape lies and no later shape does
    later = np.zeros(ids.shape, bool)
    visible = []
    for shape, _ in reversed(layers):
        visible.insert(0, shape & ~later)
        later |= shape
    kept = [j for j, v in enumerate(visible) if v.any()]
    assert ids.max() == len(kept)
    for k, j in enumerate(kept, start=1):
        np.testing.assert_array_equal(ids == k, visible[j])
        fill = layers[j][1]
        np.testing.assert_array_equal(image[ids == k], np.clip(np.round(fill[ids == k]), 0, 255))  # its texture
    np.testing.assert_array_equal(image[ids == 0], np.clip(np.round(background[ids == 0]), 0, 255))
    # the public sampler paints the same way (effects off)
    x, m = sam_corpus.sample(np.random.default_rng(3), domain, effects=False)
    np.testing.assert_array_equal(m, ids)
    np.testing.assert_array_equal(x, image.astype(np.uint8))


def test_corpus_rejects_unknown_family():
    with pytest.raises(ValueError, match="everyday"):
        sam_corpus.sample(np.random.default_rng(0), "maps")


# ------------------------------------------------------------------------------------------------ prompts


def test_points_lie_inside_and_boxes_contain_their_object_in_xy():
    mask = torch.zeros(64, 96, dtype=torch.bool)
    mask[10:21, 40:71] = True  # rows (y) 10..20, columns (x) 40..70: x and y ranges differ
    mask[20, 75] = True
    assert box_of(mask).tolist() == [40.0, 10.0, 75.0, 20.0]  # (x0, y0, x1, y1)
    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        x, y = sample_point(mask, g).long().tolist()
        assert mask[y, x]
    box = box_of(mask)
    assert torch.equal(jitter_box(box, (64, 96), std=0.0), box)
    jittered = torch.stack([jitter_box(box, (64, 96), 0.1, 2.0, g) for _ in range(200)])
    assert (jittered - box).abs().max() <= 2.0 + 1e-6 and (jittered - box).abs().max() > 0.5
    assert (jittered[:, 0] <= jittered[:, 2]).all() and (jittered[:, 1] <= jittered[:, 3]).all()


def test_training_prompts_match_their_targets():
    torch.manual_seed(0)
    method = _method(objects=3, box_jitter=0.0)
    y = _instances(4)
    groups = method._groups(y, (64, 64))
    assert sum(len(g["index"]) for g in groups) == 12
    for g in groups:
        for r, t in enumerate(g["target"]):
            assert torch.equal(t, y[g["index"][r]] == y[g["index"][r]][t].unique()[0])  # one object of its image
            if g["boxes"] is not None:
                x0, y0, x1, y1 = g["boxes"][r].long().tolist()
                assert t[y0 : y1 + 1, x0 : x1 + 1].sum() == t.sum()  # the box holds the whole object
                assert t[y0, x0 : x1 + 1].any() and t[y0 : y1 + 1, x0].any()  # and is tight
            else:
                x, y_ = g["coords"][r, 0].long().tolist()
                assert t[y_, x] and g["labels"][r, 0] == 1


# ------------------------------------------------------------------------------------------------- losses


def _focal64(logit: float, t: float, alpha: float = 0.25, gamma: float = 2.0) -> float:
    p = 1 / (1 + math.exp(-logit))
    p_t = p if t else 1 - p
    a_t = alpha if t else 1 - alpha
    return -a_t * (1 - p_t) ** gamma * math.log(p_t)


def test_focal_and_dice_against_hand_computation():
    logits = torch.tensor([[[[2.0, -1.0], [0.5, -3.0]]]], dtype=torch.float64)  # (1, 1, 2, 2)
    target = torch.tensor([[[[1.0, 0.0], [0.0, 1.0]]]], dtype=torch.float64)
    cells = list(zip(logits.flatten().tolist(), target.flatten().tolist()))
    focal = sum(_focal64(v, t) for v, t in cells) / 4
    assert focal_per_mask(logits, target).item() == pytest.approx(focal, rel=1e-12)
    assert focal_per_mask(logits, target).item() == pytest.approx(
        sigmoid_focal_loss(logits, target, reduction="mean").item()
    )
    p = [1 / (1 + math.exp(-v)) for v, _ in cells]
    inter, total = sum(pi * t for pi, (_, t) in zip(p, cells)), sum(p) + sum(t for _, t in cells)
    assert dice_per_mask(logits, target).item() == pytest.approx(1 - (2 * inter + 1) / (total + 1), rel=1e-12)


def test_multimask_loss_backpropagates_only_the_lowest_of_three():
    target = torch.zeros(1, 1, 4, 4, dtype=torch.float64)
    target[..., 1:3, 1:3] = 1
    logits = torch.stack([torch.full((4, 4), -2.0), target[0, 0] * 8 - 4, torch.full((4, 4), 1.0)])[None]
    logits = logits.to(torch.float64).requires_grad_()
    iou_pred = torch.tensor([[0.1, 0.9, 0.3]], dtype=torch.float64)
    out = min_mask_loss(logits, iou_pred, target)
    hand = []
    for m in range(3):
        cells = list(zip(logits[0, m].flatten().tolist(), target.flatten().tolist()))
        focal = sum(_focal64(v, t) for v, t in cells) / 16
        p = [1 / (1 + math.exp(-v)) for v, _ in cells]
        dice = 1 - (2 * sum(pi * t for pi, (_, t) in zip(p, cells)) + 1) / (sum(p) + 4 + 1)
        hand.append(20 * focal + dice)
    assert out["choice"].item() == int(np.argmin(hand)) == 1
    assert out["mask"].item() == pytest.approx(min(hand), rel=1e-10)
    actual_iou = [0.0, 1.0, 4 / 16]  # all background; exact; everything foreground
    assert out["iou"].item() == pytest.approx(np.mean([(a - b) ** 2 for a, b in zip([0.1, 0.9, 0.3], actual_iou)]))
    out["mask"].sum().backward()
    assert logits.grad[0, 1].abs().sum() > 0 and logits.grad[0, [0, 2]].abs().sum() == 0


def test_prompted_iou_metric_against_hand_counts():
    metric = PromptedIoU()
    p = torch.zeros(3, 4, 4, dtype=torch.bool)
    t = torch.zeros(3, 4, 4, dtype=torch.bool)
    p[0, :2], t[0, 1:3] = True, True  # 4 common of 12
    p[1, 0, 0], t[1, 0, 0] = True, True  # exact
    metric.update(p, t)
    assert metric.compute().item() == pytest.approx((4 / 12 + 1 + 1) / 3)  # row 2: both empty = 1


def test_schedule_warms_up_then_steps_down():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = warmup_step_decay(opt, total_steps=100, warmup=10, decay_at=(0.5, 0.9), gamma=0.1)
    lrs = []
    for _ in range(100):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0) and lrs[49] == pytest.approx(1.0)
    assert lrs[50] == pytest.approx(0.1) and lrs[89] == pytest.approx(0.1) and lrs[90] == pytest.approx(0.01)


# -------------------------------------------------------------------------------------------- the model


def test_batched_decoder_rows_equal_segment_anythings_per_image_call(one_thread):
    sam = _sam().eval()
    with torch.no_grad():
        emb = sam.forward_features(torch.randn(2, 3, 64, 64))
        sparse, dense = sam.prompt_encoder(points=(torch.rand(3, 1, 2) * 64, torch.ones(3, 1)), boxes=None, masks=None)
        pe = sam.prompt_encoder.get_dense_pe()
        masks, iou = decode_rows(sam.mask_decoder, emb[[0, 1, 1]], pe, sparse, dense)
        for r, i in enumerate([0, 1, 1]):  # the official decoder, one image and one prompt per call
            m, q = sam.mask_decoder.predict_masks(emb[i : i + 1], pe, sparse[r : r + 1], dense[r : r + 1])
            torch.testing.assert_close(masks[r : r + 1], m, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(iou[r : r + 1], q, atol=1e-5, rtol=1e-5)


def test_one_step_changes_encoder_prompt_encoder_and_decoder(one_thread):
    torch.manual_seed(0)
    method = _method(objects=3, box_probability=0.5, corrective_points=1)
    before = {k: v.detach().clone() for k, v in method.backbone.named_parameters()}
    batch = {"a": (torch.randn(2, 3, 64, 64), _instances(2)), "b": (torch.randn(2, 3, 64, 64), _instances(2))}
    opt = torch.optim.SGD(method.parameters(), lr=0.1)  # no weight decay: only gradients move weights
    losses = method.training_losses(batch)
    assert set(losses) == {"loss", "focal", "dice", "iou"} and torch.isfinite(losses["loss"])
    losses["loss"].backward()
    opt.step()
    changed = {k for k, v in method.backbone.named_parameters() if not torch.equal(v, before[k])}
    for part in ("image_encoder.blocks.0.", "image_encoder.neck.", "prompt_encoder.point_embeddings.",
                 "prompt_encoder.mask_downscaling.", "mask_decoder.transformer.", "mask_decoder.iou_prediction_head.",
                 "mask_decoder.output_hypernetworks_mlps.1."):  # fmt: skip
        assert any(k.startswith(part) for k in changed), part


def test_exported_file_loads_back_through_backbone_weights(tmp_path, one_thread):
    method = _method(seed=1)
    path = export_backbone(method.backbone, tmp_path / "backbone.safetensors")
    cfg = compose_cfg(["backbone=sam_tiny", "backbone.prompt_decoder=true", f"backbone.weights={path}",
                       "data.image_size=64"], tmp_path)  # fmt: skip
    torch.manual_seed(99)  # another random init, overwritten by the file
    loaded = instantiate(cfg.backbone).eval()
    fresh = SAMPretrain(loaded, 9, ["a"], [], task=PromptableSegmentation()).eval()
    x, y = torch.randn(2, 3, 64, 64), _instances(2)
    method.eval()
    with torch.no_grad():
        a, ta = method.prompted_masks(x, y)
        b, tb = fresh.prompted_masks(x, y)
    assert torch.equal(ta, tb) and len(a) == 6
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    sd = loaded.state_dict()
    assert {k.split(".")[0] for k in sd} == {"image_encoder", "prompt_encoder", "mask_decoder"}


def test_refusals_name_the_fix():
    with pytest.raises(ValueError, match="prompt_decoder=true"):
        SAMPretrain(SAMBackbone(**{**TINY_SAM, "prompt_decoder": False}), 9, ["a"], [], task=PromptableSegmentation())
    with pytest.raises(ValueError, match="task=promptable"):
        SAMPretrain(_sam(), 9, ["a"], [])
    with pytest.raises(ValueError, match="backbone.weights"):
        _method().to_inference()


# --------------------------------------------------------------------------------------------------- runs


def test_tiny_pretraining_run_writes_records_and_weights(tmp_path, one_thread):
    out = tmp_path / "run"
    cfg = compose_cfg(
        ["+exp=sam_tiny_pretrain", f"paths.datasets={tmp_path / 'data'}", "data.benchmark.n_per_domain=6",
         "data.image_size=64", "data.batch_size=2", "data.eval_batch_size=16", "trainer.max_steps=2",
         "trainer.val_check_interval=2", "trainer.enable_progress_bar=false", "logger=none", "print_summary=false"],
        out,
    )  # fmt: skip
    final = train(cfg)
    records = read_jsonl(out / "results.jsonl")
    assert [r["step"] for r in records] == [2]
    assert {f"box_miou/{d}/{s}" for d in sam_corpus.FAMILIES for s in ("in", "out")} <= set(records[0])
    assert json.loads((out / "run.json").read_text())["metric"] == "box_miou"
    assert (out / "backbone.safetensors").exists() and final["backbone_weights"].endswith("backbone.safetensors")


def test_prepare_embedded_builds_sam_corpus_only_when_named(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("prepare_embedded_sam", ROOT / "scripts" / "prepare_embedded.py")
    prepare = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = prepare
    spec.loader.exec_module(prepare)
    root = tmp_path / "data"
    prepare.main(["--root", str(root), "--only", "sam_corpus", "--sam-corpus-per-domain", "2"])
    manifest = json.loads((root / "sam_corpus" / "manifest.json").read_text())
    assert manifest["counts"] == {d: 2 for d in sam_corpus.FAMILIES}
    assert "sam_corpus: 3 domains, 6 images" in capsys.readouterr().out
