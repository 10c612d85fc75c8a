"""The task-agnostic core: data-free and safe rebuild, the transform chain's replay, ``to_inference``,
``predict.py``, metric-named records, old run folders, and an import graph without cycles."""

from __future__ import annotations

import ast
import csv
import importlib.util
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image
from torch import nn

from dgkit.callbacks import CONFIG_KEY, META_KEY
from dgkit.chain import ModelTransform, TransformContext
from dgkit.checkpoint import load_checkpoint
from dgkit.data.datamodule import DGDataModule
from dgkit.eval import dataset_metrics, load_runs, summarise, to_markdown
from dgkit.methods.base import Method
from dgkit.predict import predict_checkpoint
from dgkit.run import train
from dgkit.utils.io import read_jsonl
from tests.conftest import ROOT, folder_run_cfg, write_image_tree

FIXTURES = Path(__file__).parent / "fixtures"


pytestmark = pytest.mark.usefixtures("one_thread")


def _batch(n: int = 6, size: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


# ---- every checkpoint kind loads with weights_only=True and rebuilds ------------------------------------------
KINDS = {
    "plain": [],
    "adapter": ["adapter=lora", "adapter.rank=2"],
    "ssl": ["method=simclr", "data.batch_size=4"],
    "drm": ["method=drm"],
    "itta": ["method=itta"],
}


@pytest.mark.parametrize("kind", list(KINDS))
def test_every_checkpoint_kind_loads_weights_only(kind, tiny_cfg, tmp_path):
    train(tiny_cfg(*KINDS[kind]))
    ckpt = tmp_path / "run" / "checkpoints" / "best.ckpt"
    raw = torch.load(ckpt, map_location="cpu", weights_only=True)  # raises on any pickled object
    assert raw[META_KEY]["classes"] == ["c0", "c1", "c2"] and raw[META_KEY]["test_domains"] == ["c"]
    _, method = load_checkpoint(ckpt)
    for name, tensor in raw["state_dict"].items():  # every stored weight landed in the rebuilt model
        assert torch.equal(method.state_dict()[name], tensor), name
    x = _batch()
    if kind == "ssl":
        with pytest.raises(ValueError, match="linear probe"):
            method.to_inference()
        return
    inference = method.to_inference()
    with torch.no_grad():
        torch.testing.assert_close(inference(x), method(x), rtol=1e-4, atol=1e-5)
    assert not any(type(m).__module__.startswith("peft") for m in inference.modules())  # adapters merged


def test_to_inference_drops_training_only_parts(tiny_cfg, tmp_path):
    train(tiny_cfg("method=dann"))
    _, method = load_checkpoint(tmp_path / "run" / "checkpoints" / "best.ckpt")
    assert any(k.startswith("discriminator.") for k in method.state_dict())
    inference = method.to_inference()
    assert set(inference.state_dict()) == {f"backbone.{k}" for k in method.backbone.state_dict()} | {
        f"head.{k}" for k in method.classifier.state_dict()
    }
    assert not inference.training


# ---- records, run.json and final.json name the task's metric ----------------------------------------------
def test_records_and_outcome_name_the_metric(tiny_cfg, tmp_path):
    final = train(tiny_cfg())
    run = load_runs(tmp_path / "run")[0]
    assert (run.metric, run.metric_name) == ("acc", "accuracy") and final["metric"] == "acc"
    assert run.choices["method"] == "ERM"
    records = read_jsonl(tmp_path / "run" / "results.jsonl")
    metric_keys = {k for r in records for k in r if k not in ("step", "epoch")}
    assert metric_keys == {f"acc/{d}/{s}" for d in "abc" for s in ("in", "out")}
    best = max(records, key=lambda r: ((r["acc/a/out"] + r["acc/b/out"]) / 2, -r["step"]))
    assert final["test_score"] == {"c": best["acc/c/in"]}


def test_trainer_test_path_is_gone():
    """Methods define no test step: nothing can report accuracy on source training images as a test score."""
    assert "test_step" not in vars(Method) and "on_test_epoch_end" not in vars(Method)
    assert "test_dataloader" not in vars(DGDataModule)


# ---- data-free rebuild and predict.py ------------------------------------------------------------------------
def test_reload_and_predict_without_the_dataset(tmp_path):
    train(folder_run_cfg(tmp_path, write_image_tree(tmp_path / "tree")))
    images = tmp_path / "images"
    images.mkdir()
    for i, f in enumerate(sorted((tmp_path / "tree" / "night").rglob("*.png"))[:5]):
        shutil.copy(f, images / f"img{i}.png")
    shutil.rmtree(tmp_path / "tree")  # the dataset is gone

    ckpt = tmp_path / "run" / "checkpoints" / "best.ckpt"
    _, method = load_checkpoint(ckpt)
    assert method.meta["classes"] == ["cat", "dog"] and method.meta["domains"] == ["night", "summer", "winter"]
    out = predict_checkpoint(ckpt, images, tmp_path / "predictions.csv")
    rows = list(csv.DictReader(out.open()))
    assert [Path(r["path"]).name for r in rows] == [f"img{i}.png" for i in range(5)]

    # the same images normalised by hand (32 px already: no resize), through to_inference()
    cfg = method.meta["data_config"]
    mean, std = torch.tensor(cfg["mean"])[:, None, None], torch.tensor(cfg["std"])[:, None, None]
    x = torch.stack(
        [(torch.from_numpy(np.asarray(Image.open(images / f"img{i}.png"))).permute(2, 0, 1) / 255 - mean) / std
         for i in range(5)]
    )  # fmt: skip
    with torch.no_grad():
        probs = method.to_inference()(x.float()).softmax(-1)
    assert [r["class"] for r in rows] == [["cat", "dog"][i] for i in probs.argmax(-1).tolist()]
    torch.testing.assert_close(torch.tensor([float(r["probability"]) for r in rows]), probs.max(-1).values,
                               atol=1e-5, rtol=1e-4)  # fmt: skip


def test_predict_script_errors_name_the_problem(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("predict_script", ROOT / "scripts" / "predict.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    main = script.main

    assert main(["images=x"]) == 2 and "ckpt= and images= are required" in capsys.readouterr().err
    assert main([f"ckpt={tmp_path / 'none.ckpt'}", f"images={tmp_path}"]) == 2
    assert "no image files found" in capsys.readouterr().err


# ---- unsafe or mismatched checkpoints --------------------------------------------------------------------------
class _Payload:
    """A pickled object: weights_only loading must refuse it."""


def test_unsafe_truncated_and_mismatched_checkpoints_are_refused(tiny_cfg, tmp_path):
    train(tiny_cfg())
    ckpt = tmp_path / "run" / "checkpoints" / "best.ckpt"
    raw = torch.load(ckpt, weights_only=True)

    pickled = tmp_path / "pickled.ckpt"
    torch.save({**raw, "extra": _Payload()}, pickled)
    with pytest.raises(ValueError, match="pickled objects"):
        load_checkpoint(pickled)

    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(ckpt.read_bytes()[:2000])
    with pytest.raises(ValueError, match="not a loadable dgkit checkpoint"):
        load_checkpoint(truncated)

    other = tmp_path / "other.ckpt"
    torch.save({**raw, "state_dict": {k: v for k, v in raw["state_dict"].items() if k != "classifier.weight"}}, other)
    with pytest.raises(ValueError, match=r"missing keys \['classifier.weight'\]"):
        load_checkpoint(other)

    no_task = tmp_path / "no_task.ckpt"
    torch.save({**raw, META_KEY: {k: v for k, v in raw[META_KEY].items() if k != "task"}}, no_task)
    with pytest.raises(ValueError, match=r"lacks \['task'\]"):
        load_checkpoint(no_task)


# ---- the transform chain replays a structure change -------------------------------------------------------
class LowRankHead(ModelTransform):
    """A toy after-fit link: the linear head becomes a rank-``rank`` factorisation (SVD), two layers."""

    stage = "after_fit"
    scope = "model"

    def __init__(self, rank: int = 2) -> None:
        self.rank = rank

    def transform(self, model: nn.Module, context: TransformContext) -> dict:
        assert context.datamodule is not None  # after-fit links see the run's data
        head = model.classifier
        u, s, vh = torch.linalg.svd(head.weight.detach(), full_matrices=False)
        first, second = self._structure(model, head.out_features, head.in_features)
        with torch.no_grad():
            first.weight.copy_(s[: self.rank, None] * vh[: self.rank])
            second.weight.copy_(u[:, : self.rank])
            second.bias.copy_(head.bias)
        return {"shape": torch.tensor([head.out_features, head.in_features])}  # a tensor in the recorded state

    def replay(self, model: nn.Module, state: dict) -> None:
        self._structure(model, *state["shape"].tolist())

    def _structure(self, model: nn.Module, out_features: int, in_features: int) -> tuple[nn.Linear, nn.Linear]:
        first, second = nn.Linear(in_features, self.rank, bias=False), nn.Linear(self.rank, out_features)
        model.classifier = nn.Sequential(first, second)
        return first, second


def test_chain_replays_a_structure_change_on_reload(tiny_cfg, tmp_path):
    cfg = tiny_cfg()
    cfg.transforms = [{"_target_": f"{__name__}.LowRankHead", "rank": 2}]
    final = train(cfg)
    transformed = Path(final["transformed_checkpoint"])
    assert transformed.name == "transformed.ckpt"
    assert torch.load(transformed, weights_only=True)[META_KEY]["chain"][-1]["stage"] == "after_fit"

    _, best = load_checkpoint(tmp_path / "run" / "checkpoints" / "best.ckpt")
    _, reloaded = load_checkpoint(transformed)
    assert isinstance(reloaded.classifier, nn.Sequential)
    width = reloaded.backbone.num_features
    assert [tuple(p.shape) for p in reloaded.classifier.parameters()] == [(2, width), (3, 2), (3,)]

    # independent reference: the best step's head truncated to rank 2 in float64
    x = _batch()
    with torch.no_grad():
        z = best.backbone(x).double()
        w, b = best.classifier.weight.double(), best.classifier.bias.double()
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        expected = z @ (u[:, :2] @ torch.diag(s[:2]) @ vh[:2]).T + b
        torch.testing.assert_close(reloaded(x).double(), expected, rtol=1e-4, atol=1e-5)


def test_chain_link_must_be_a_model_transform(tiny_cfg):
    cfg = tiny_cfg()
    cfg.transforms = [{"_target_": "torch.nn.Identity"}]
    with pytest.raises(TypeError, match="not a dgkit.chain.ModelTransform"):
        train(cfg)


# ---- old run folders still collect ------------------------------------------------------------------------
def test_legacy_run_folder_collects():
    runs = load_runs(FIXTURES / "legacy_run")
    assert [(r.metric, r.metric_name, r.choices) for r in runs] == [("acc", "accuracy", {})]
    summary = summarise(runs)
    iid = summary["toy"]["training-domain validation set"]["ERM"]["A"]
    # sources B, C: step 100 scores (0.80 + 0.70) / 2 = 0.75 > step 200's (0.75 + 0.72) / 2; A/in there is 0.50
    assert (iid.mean, iid.n_seeds) == (pytest.approx(50.0), 1)
    oracle = summary["toy"]["test-domain validation set (oracle)"]["ERM"]["A"]
    assert oracle.mean == pytest.approx(60.0)  # the last evaluation's A/in
    assert "Test-domain accuracy (%)." in to_markdown(summary, metrics=dataset_metrics(runs))


# ---- the import graph has no cycle ----------------------------------------------------------------------------
def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(package: Path = ROOT / "dgkit") -> dict[str, set[str]]:
    """``{module: dgkit modules it imports}``, from every import statement anywhere in the file (function-level
    imports included, so a late import cannot hide a cycle)."""
    modules = {_module_name(p): p for p in package.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        edges = set()
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                edges |= {a.name for a in node.names if a.name in modules}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                if node.module in modules:
                    edges.add(node.module)
                edges |= {f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in modules}
        graph[name] = edges - {name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a list of modules, or None (depth-first search with colours)."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_import_graph_has_no_cycle():
    graph = import_graph()
    assert "dgkit.compose" in graph["dgkit.checkpoint"]  # the parser sees real edges
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_config_and_meta_keys_are_plain(tiny_cfg, tmp_path):
    """The stored config and metadata are plain containers (what weights_only loading accepts)."""
    train(tiny_cfg("adapter=lora", "adapter.rank=2"))
    raw = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    assert OmegaConf.create(raw[CONFIG_KEY]).method._target_ == "dgkit.methods.ERM"
    assert raw[META_KEY]["chain"][0]["config"]["_target_"] == "dgkit.adapters.LoRA"
