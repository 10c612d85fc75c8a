"""Reproducible runs and an honest run identity: seeded augmentation, exact resume, run folders that never mix
two runs, the folder lock, relocated data, corrupt checkpoints, image verification and extending a run."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from dgkit.checkpoint import load_checkpoint_and_data
from dgkit.data.datamodule import DomainStream
from dgkit.methods.erm import ERM
from dgkit.run import train
from dgkit.runfolder import RunFolder, RunFolderInUse
from dgkit.utils.io import read_jsonl
from tests.conftest import folder_run_cfg, write_image_tree

pytestmark = pytest.mark.usefixtures("one_thread")


def _records(folder: Path) -> str:
    return (folder / "results.jsonl").read_text()


def _same_weights(a: Path, b: Path) -> bool:
    """Whether two runs' last checkpoints hold bit-identical weights (records alone are coarse on tiny data)."""
    wa, wb = (torch.load(f / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"] for f in (a, b))
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


# ---- seeded augmentation and exact resume ---------------------------------------------------------------------
def test_same_command_gives_byte_identical_records_with_augmentation(tiny_cfg, tmp_path):
    train(tiny_cfg("data.augment=digits", "+augment=bss", out="one"))
    train(tiny_cfg("data.augment=digits", "+augment=bss", out="two"))
    assert _records(tmp_path / "one") == _records(tmp_path / "two")
    assert _same_weights(tmp_path / "one", tmp_path / "two")
    train(tiny_cfg("data.augment=digits", "+augment=bss", "seed=1", out="three"))
    assert _records(tmp_path / "three") != _records(tmp_path / "one")  # the seed does reach the draws


def test_augmentation_is_random_per_draw_and_fixed_per_key(tiny_cfg):
    from dgkit.compose import build

    datamodule, _ = build(tiny_cfg("data.augment=digits"))
    dataset = datamodule.train_split("a")
    first, again, other = dataset[(0, 0)][0], dataset[(0, 0)][0], dataset[(0, 7)][0]
    assert torch.equal(first, again)  # the same (image, draw) key: the same augmentation
    assert not torch.equal(first, other)  # another draw of the same image: another augmentation


def test_domain_stream_passes_are_permutations_and_start_anywhere():
    stream = iter(DomainStream(5, seed=0, domain="a"))
    keys = [next(stream) for _ in range(12)]
    assert sorted(i for i, _ in keys[:5]) == list(range(5)) and sorted(i for i, _ in keys[5:10]) == list(range(5))
    assert [d for _, d in keys] == list(range(12))
    resumed = iter(DomainStream(5, seed=0, domain="a", start=7))
    assert [next(resumed) for _ in range(5)] == keys[7:]


def test_processes_take_disjoint_batches_of_one_stream():
    whole = iter(DomainStream(7, seed=0, domain="a"))
    keys = [next(whole) for _ in range(12)]  # 4 steps of batch 3 in one process
    ranks = [iter(DomainStream(7, seed=0, domain="a", rank=r, world=2, block=3)) for r in (0, 1)]
    parts = [[next(stream) for _ in range(6)] for stream in ranks]  # 2 steps of batch 3 in each of 2 processes
    assert parts[0] == keys[0:3] + keys[6:9] and parts[1] == keys[3:6] + keys[9:12]
    resumed = iter(DomainStream(7, seed=0, domain="a", start=6, rank=1, world=2, block=3))
    assert [next(resumed) for _ in range(3)] == keys[9:12]


def test_killed_and_resumed_equals_uninterrupted(tiny_cfg, tmp_path, monkeypatch):
    overrides = ("data.augment=digits", "+augment=bss", "trainer.max_steps=6")
    train(tiny_cfg(*overrides, out="whole"))
    calls = []
    real = ERM.training_losses

    def killed_at_step_5(self, batch):
        calls.append(1)
        if len(calls) == 5:
            raise RuntimeError("killed")  # after the step-4 evaluation and checkpoint
        return real(self, batch)

    monkeypatch.setattr(ERM, "training_losses", killed_at_step_5)
    with pytest.raises(RuntimeError, match="killed"):
        train(tiny_cfg(*overrides, out="killed"))
    monkeypatch.setattr(ERM, "training_losses", real)
    train(tiny_cfg(*overrides, out="killed"))
    assert _records(tmp_path / "killed") == _records(tmp_path / "whole")
    assert _same_weights(tmp_path / "killed", tmp_path / "whole")


def test_extending_a_finished_run_continues_it(tiny_cfg, tmp_path, monkeypatch):
    train(tiny_cfg("data.augment=digits", "trainer.max_steps=6", out="whole"))
    train(tiny_cfg("data.augment=digits", "trainer.max_steps=4"))
    first = read_jsonl(tmp_path / "run" / "results.jsonl")
    calls = []
    real = ERM.training_losses
    monkeypatch.setattr(ERM, "training_losses", lambda self, batch: calls.append(1) or real(self, batch))
    final = train(tiny_cfg("data.augment=digits", "trainer.max_steps=6"))
    assert len(calls) == 2 and final["last_step"] == 6  # steps 5 and 6 only
    extended = read_jsonl(tmp_path / "run" / "results.jsonl")
    assert extended[: len(first)] == first  # the first part's records are unchanged
    assert _records(tmp_path / "run") == _records(tmp_path / "whole")  # and it equals a 6-step run
    assert _same_weights(tmp_path / "run", tmp_path / "whole")
    with pytest.raises(ValueError, match="cannot be shortened"):
        train(tiny_cfg("data.augment=digits", "trainer.max_steps=2"))


def test_a_budget_dependent_schedule_is_not_extended(tiny_cfg):
    train(tiny_cfg("method=dann", "trainer.max_steps=4"))
    with pytest.raises(ValueError, match=r"cannot be extended honestly: DANN's λ ramp"):
        train(tiny_cfg("method=dann", "trainer.max_steps=6"))


# ---- run identity ------------------------------------------------------------------------------------------
def test_other_held_out_domains_are_refused(tiny_cfg, tmp_path):
    train(tiny_cfg())
    with pytest.raises(ValueError, match=r"test_domains: \['c'\] there, \['a'\] now.*another output folder"):
        train(tiny_cfg("data.test_domains=[a]"))


def test_other_data_is_refused_and_a_moved_copy_is_the_same_run(tmp_path):
    train(folder_run_cfg(tmp_path, write_image_tree(tmp_path / "a")))
    with pytest.raises(ValueError, match="data_fingerprint"):
        train(folder_run_cfg(tmp_path, write_image_tree(tmp_path / "b", seed=1, per_class=7)))  # other images
    shutil.copytree(tmp_path / "a", tmp_path / "a_copy")
    final = train(folder_run_cfg(tmp_path, tmp_path / "a_copy"))  # the same images elsewhere: already finished
    assert final["data_fingerprint"] == json.loads((tmp_path / "run" / "run.json").read_text())["data_fingerprint"]


def _drop_augment_path(run_json: Path) -> None:
    """Make ``run_json`` look written before the augmentation path was recorded (every run was per image)."""
    record = json.loads(run_json.read_text())
    del record["augment_path"]
    run_json.write_text(json.dumps(record))


def test_a_run_augmented_per_image_before_batch_augmentation_is_not_resumed_on_the_batch_path(tiny_cfg, tmp_path):
    train(tiny_cfg("data.augment=digits"))
    run_json = tmp_path / "run" / "run.json"
    assert json.loads(run_json.read_text())["augment_path"] == "batch"  # synthetic lives in memory
    _drop_augment_path(run_json)
    with pytest.raises(ValueError, match=r"augment_path: per_image there, batch now"):
        train(tiny_cfg("data.augment=digits"))


def test_without_augmentation_an_older_run_folder_is_still_the_same_run(tiny_cfg, tmp_path):
    first = train(tiny_cfg())  # data.augment=none: both paths train identically
    _drop_augment_path(tmp_path / "run" / "run.json")
    assert train(tiny_cfg())["last_step"] == first["last_step"]  # skipped as finished, not refused


def test_a_failed_start_does_not_claim_the_folder(tiny_cfg):
    with pytest.raises(ValueError):
        train(tiny_cfg("method.optimizer.lr=-0.001"))  # Adam refuses in configure_optimizers
    assert train(tiny_cfg())["last_step"] == 4  # the corrected command trains


# ---- the lock ------------------------------------------------------------------------------------------------
def test_a_locked_folder_refuses_and_a_stale_lock_is_taken_over(tiny_cfg, tmp_path):
    with RunFolder(tmp_path / "run").lock():
        with pytest.raises(RunFolderInUse, match=r"in use by PID \d+ on host"):
            train(tiny_cfg())
    (tmp_path / "run" / ".lock").write_text("PID 999999 on host gone\n")  # left by a dead process
    assert train(tiny_cfg())["last_step"] == 4


# ---- relocated data and corrupt checkpoints -------------------------------------------------------------------
def test_evaluation_reads_moved_data(tmp_path):
    train(folder_run_cfg(tmp_path, write_image_tree(tmp_path / "tree")))
    shutil.move(tmp_path / "tree", tmp_path / "moved")
    ckpt = tmp_path / "run" / "checkpoints" / "best.ckpt"
    with pytest.raises(FileNotFoundError):
        load_checkpoint_and_data(ckpt)  # the old path is gone
    _, datamodule, _ = load_checkpoint_and_data(ckpt, {"data.root": str(tmp_path / "moved")})
    assert str(datamodule.benchmark.datasets["night"].files[0]).startswith(str(tmp_path / "moved"))
    with pytest.raises(FileNotFoundError, match="no such folder"):
        load_checkpoint_and_data(ckpt, {"data.root": str(tmp_path / "nonexistent")})


def test_evaluate_script_takes_data_root(tmp_path):
    from hydra import compose, initialize_config_dir

    from tests.conftest import CONF

    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = compose("evaluate", overrides=["ckpt=x", f"data.root={tmp_path}", f"paths.datasets={tmp_path}"])
    assert cfg.data.root == str(tmp_path) and cfg.paths.datasets == str(tmp_path)


def test_a_corrupt_last_checkpoint_is_named_or_falls_back(tiny_cfg, tmp_path, caplog):
    out = tmp_path / "run"
    train(tiny_cfg())
    (out / "done").unlink()
    (out / "checkpoints" / "last.ckpt").write_bytes(b"\x00" * 100)
    assert train(tiny_cfg())["last_step"] == 4  # resumed from best.ckpt instead
    assert "cannot be read" in caplog.text
    (out / "done").unlink()
    for name in ("last", "best"):
        (out / "checkpoints" / f"{name}.ckpt").write_bytes(b"\x00" * 100)
    with pytest.raises(ValueError, match=r"last\.ckpt cannot be read .*resume=false"):
        train(tiny_cfg())


# ---- bad images ------------------------------------------------------------------------------------------------
def test_verify_lists_every_bad_image_and_skip_trains_without_them(tmp_path):
    root = write_image_tree(tmp_path / "tree", bad=2)
    listed = r"2 unreadable image\(s\)(.|\n)*fake0\.png(.|\n)*fake1\.png(.|\n)*on_bad_image=skip"
    with pytest.raises(ValueError, match=listed):
        train(folder_run_cfg(tmp_path, root))
    final = train(folder_run_cfg(tmp_path, root, "data.on_bad_image=skip"))
    assert final["skipped_images"] == 2
    assert json.loads((tmp_path / "run" / "run.json").read_text())["skipped_images"] == 2


def test_two_process_ddp_writes_one_run(tiny_cfg, tmp_path):
    """``trainer.strategy=ddp_spawn trainer.devices=2`` on CPU: both processes train, rank 0 writes once."""
    final = train(tiny_cfg("trainer.devices=2", "trainer.strategy=ddp_spawn"))
    records = read_jsonl(tmp_path / "run" / "results.jsonl")
    assert [r["step"] for r in records] == [2, 4] and final["last_step"] == 4
    assert (tmp_path / "run" / "done").exists()
    assert json.loads((tmp_path / "run" / "run.json").read_text())["devices"] == "2x1"
