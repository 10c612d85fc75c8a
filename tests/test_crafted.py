"""Crafted-shift validation: families disjoint from training, frozen renderings, records, the selection rule."""

from __future__ import annotations

import albumentations as A
import pytest
import torch

from dgkit.backbones.base import DataConfig
from dgkit.compose import build
from dgkit.data.crafted import FAMILIES, POLICY_FAMILIES, check_families
from dgkit.data.transforms import POLICIES, build_transform
from dgkit.eval.records import Run
from dgkit.eval.selection import CraftedShiftValidation, TrainingDomainValidation
from dgkit.run import train
from dgkit.utils.io import read_jsonl
from tests.conftest import CONF

pytestmark = pytest.mark.usefixtures("one_thread")
DEFAULT = ["arithmetic", "blur", "contrast", "convolutional", "segmentation", "weather"]


def _classes(transforms) -> set[type]:
    found = set()
    for t in transforms:
        found.add(type(t))
        found |= _classes(getattr(t, "transforms", []))
    return found


@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_crafted_families_use_none_of_the_training_transforms(policy):
    cfg = DataConfig((32, 32))
    training = _classes(build_transform(cfg, policy, train=True).transforms)
    training -= _classes(build_transform(cfg, policy, train=False).transforms)  # the shared resize + normalise
    for family in check_families(DEFAULT, policy):
        assert not _classes(FAMILIES[family]()) & training, family
    assert "geometric" in POLICY_FAMILIES["digits"] and "color" in POLICY_FAMILIES["imagenet"]


def test_the_shipped_config_lists_the_default_families():
    from omegaconf import OmegaConf

    assert OmegaConf.load(CONF / "validation" / "crafted.yaml").data.crafted_families == DEFAULT


def test_families_training_uses_are_refused():
    with pytest.raises(ValueError, match=r"\['geometric'\] not usable with data.augment='digits'.*choose among"):
        check_families(["blur", "geometric"], "digits")
    with pytest.raises(ValueError, match="nope"):
        check_families(["nope"], "none")


def test_crafted_sets_are_frozen_and_recorded_for_sources_only(tiny_cfg, tmp_path):
    datamodule, method = build(tiny_cfg("+validation=crafted"))
    crafted = datamodule.split("a", "crafted")
    assert len(crafted) == len(datamodule.splits[("a", "out")]) * len(DEFAULT)
    assert torch.equal(crafted[3][0], crafted[3][0])  # the same rendering every time
    plain = datamodule.split("a", "out")[0][0]
    assert not torch.equal(crafted[0][0], plain)  # and a shifted one
    assert method.eval_names[-2:] == [("a", "crafted"), ("b", "crafted")]
    train(tiny_cfg("+validation=crafted"))
    record = read_jsonl(tmp_path / "run" / "results.jsonl")[-1]
    assert {k for k in record if k.endswith("/crafted")} == {"acc/a/crafted", "acc/b/crafted"}


def _run(hparams: str, out: float, crafted: float, score: float) -> Run:
    record = {"step": 100}
    for d in ("A", "B", "C"):
        record[f"acc/{d}/in"] = score if d == "A" else 0.0
        record[f"acc/{d}/out"] = out
        record[f"acc/{d}/crafted"] = crafted
    return Run("toy", ("A", "B", "C"), ("A",), 0, "ERM", hparams, records=[record])


def test_crafted_shift_rule_selects_on_the_crafted_scores():
    runs = [_run("h1", out=0.9, crafted=0.4, score=0.3), _run("h2", out=0.8, crafted=0.7, score=0.6)]
    assert TrainingDomainValidation().select(runs, "A").hparams == "h1"
    choice = CraftedShiftValidation().select(runs, "A")
    assert (choice.hparams, choice.val_score, choice.test_score) == ("h2", pytest.approx(0.7), 0.6)
    old = Run("toy", ("A", "B", "C"), ("A",), 0, "ERM", "h0", records=[{"step": 1, "acc/A/in": 0.5}])
    assert CraftedShiftValidation().select([old], "A") is None  # runs without crafted sets do not count


def test_albumentations_families_render_uint8_images_of_the_same_shape():
    import numpy as np

    image = np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8)
    for family, make in FAMILIES.items():
        for op in make():
            out = A.Compose([op])(image=image)["image"]
            assert out.dtype == np.uint8 and out.shape == image.shape, (family, type(op).__name__)


def test_study_rank_correlation_and_regret_on_hand_built_runs():
    from dgkit.eval.study import rule_quality

    runs = [
        _run("h1", out=0.9, crafted=0.2, score=0.3),
        _run("h2", out=0.5, crafted=0.8, score=0.6),
        _run("h3", out=0.7, crafted=0.5, score=0.5),
    ]
    iid = rule_quality(TrainingDomainValidation(), runs, "A")
    crafted = rule_quality(CraftedShiftValidation(), runs, "A")
    # out ranks (3, 1, 2) against held-out ranks (1, 3, 2): perfectly reversed; crafted ranks agree exactly
    assert iid.spearman == pytest.approx(-1.0) and crafted.spearman == pytest.approx(1.0)
    assert iid.regret == pytest.approx(0.6 - 0.3) and crafted.regret == pytest.approx(0.0)
    assert iid.points == crafted.points == 3


def test_study_scores_leave_one_domain_out_from_the_pair_runs():
    """Leave-one-domain-out's points are the mean held-in ``in`` score of the pair runs {A, v}, v in {B, C}."""
    from dgkit.eval.selection import LeaveOneDomainOut
    from dgkit.eval.study import rule_quality

    def pair(hparams: str, v: str, acc_v: float) -> Run:
        record = {"step": 100, f"acc/{v}/in": acc_v, "acc/A/in": 0.0}
        return Run("toy", ("A", "B", "C"), ("A", v), 0, "ERM", hparams, records=[record])

    singles = [_run("h1", out=0.9, crafted=0.2, score=0.3), _run("h2", out=0.5, crafted=0.8, score=0.6)]
    # h1: pairs give (0.2 + 0.4) / 2 = 0.3; h2: (0.9 + 0.5) / 2 = 0.7, so LODO picks h2 (training-domain val h1)
    pairs = [pair("h1", "B", 0.2), pair("h1", "C", 0.4), pair("h2", "B", 0.9), pair("h2", "C", 0.5)]
    q = rule_quality(LeaveOneDomainOut(), singles + pairs, "A")
    assert (q.spearman, q.regret, q.points) == (pytest.approx(1.0), pytest.approx(0.0), 2)
    partial = rule_quality(LeaveOneDomainOut(), singles + pairs[:3], "A")  # h2's {A, C} run missing: h1 only
    assert (partial.points, partial.regret) == (1, pytest.approx(0.6 - 0.3))


def test_study_scatter_plots_each_rules_own_points():
    from dgkit.eval.selection import LeaveOneDomainOut
    from dgkit.eval.study import rule_scatter

    runs = [_run("h1", out=0.9, crafted=0.2, score=0.3), _run("h2", out=0.5, crafted=0.8, score=0.6)]
    fig = rule_scatter([TrainingDomainValidation(), CraftedShiftValidation(), LeaveOneDomainOut()], runs, ["A"])
    iid, crafted, lodo = fig.axes[:3]
    # first collection: every point (×100); second: the ring on the choice
    assert iid.collections[0].get_offsets().tolist() == [[90.0, 30.0], [50.0, 60.0]]
    assert iid.collections[1].get_offsets().tolist() == [[90.0, 30.0]]
    assert crafted.collections[1].get_offsets().tolist() == [[80.0, 60.0]]
    assert not lodo.collections and lodo.texts[0].get_text() == "no runs for this rule"  # no pair runs
