"""Export a checkpoint into a self-describing folder that refuses to exist unless parity holds.

:func:`export_checkpoint` rebuilds the run (:func:`dgkit.checkpoint.load_checkpoint_and_data`: the model and its
benchmark), takes ``method.to_inference()`` as the eager reference and writes, into a temporary sibling folder:

* ``model.onnx`` (``kind="onnx"``: :mod:`dgkit.export.onnx`, quantised linears as ``MatMulNBits``; a chain with an
  ``Int8Quantize`` link goes through :func:`dgkit.export.qdq.quantize_qdq` on the link's own calibration images) or
  ``model.pt2`` (``kind="torch"``: a ``torch.export`` program, batch dimension dynamic; optionally an
  AOTInductor package ``model_aoti.pt2``);
* ``parity.json`` (:mod:`dgkit.export.parity`, run on the written file);
* ``bench.json``: file size, batch-1 and batch-32 latency (median of ``bench_runs`` after warm-up) at ``threads``;
* ``manifest.json`` (:mod:`dgkit.export.manifest`).

Only when every check passed is the folder renamed to ``out_dir``; any failure removes it (and the parent folders
it created), so an export folder on disk is always a checked one.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import onnx
import torch
from hydra.utils import instantiate
from torch import nn
from torch._inductor import aoti_compile_and_package, aoti_load_package

from dgkit.chain import TransformContext
from dgkit.checkpoint import load_checkpoint_and_data
from dgkit.export import bench, parity, qdq
from dgkit.export.manifest import build_manifest, write_manifest
from dgkit.export.onnx import INPUT_NAME, OUTPUT_NAME, export_onnx, model_bytes
from dgkit.export.runtime import OrtModel, ort_session
from dgkit.utils.io import atomic_write_json
from dgkit.variants import run_folder_of

KINDS = ("onnx", "torch")
MODEL_FILES = {"onnx": "model.onnx", "torch": "model.pt2"}
AOTI_FILE = "model_aoti.pt2"
INT8_SUFFIX = "Int8Quantize"

Int8Input = tuple[dict[str, Any], torch.Tensor]  # the int8 link's chain record and its calibration images
Written = tuple[dict[str, Any], list[dict], Callable]  # the manifest's model entry, parity checks, the runtime


def compress_names(meta: dict[str, Any]) -> list[str]:
    """The names of the checkpoint's ``after_fit`` links, in order: each config's ``name`` (``awq_w4``), else its
    class name in lower case."""
    names = []
    for record in meta.get("chain") or []:
        if record.get("stage") == "after_fit":
            config = record.get("config") or {}
            names.append(str(config.get("name") or str(config.get("_target_", "link")).rsplit(".", 1)[-1].lower()))
    return names


def default_out_dir(ckpt: str | Path, kind: str, meta: dict[str, Any]) -> Path:
    """``<run folder>/exports/<kind>[-<compression names>]`` (``exports/onnx-awq_w4`` for
    ``<run>/variants/awq_w4/model.ckpt``); beside the checkpoint when it is not inside a run folder."""
    run = run_folder_of(ckpt) or Path(ckpt).resolve().parent
    return run / "exports" / "-".join([kind, *compress_names(meta)])


def export_checkpoint(
    ckpt: str | Path,
    out_dir: str | Path | None = None,
    kind: str = "onnx",
    threads: int = 1,
    overrides: dict[str, Any] | None = None,
    thresholds: parity.ParityThresholds | None = None,
    images_per_domain: int = 32,
    seed: int = 0,
    bench_runs: int = 20,
    overwrite: bool = False,
    aoti: bool = False,
) -> Path:
    """Export a dgkit checkpoint to a checked folder (see the module docstring); return the folder.

    Args:
        ckpt: a run's checkpoint (``best.ckpt``, or ``transformed.ckpt`` for a compressed model).
        out_dir: the folder to create (default :func:`default_out_dir`).
        kind: ``onnx`` (ONNX Runtime) or ``torch`` (``torch.export`` program).
        threads: threads for the runtime in the parity and latency runs (and PyTorch's for ``torch``).
        overrides: config overrides for the rebuild, such as ``{"data.root": PATH}`` when the data moved.
        thresholds: parity gates (default :class:`~dgkit.export.parity.ParityThresholds`).
        images_per_domain: parity images per domain (half from ``in``, half from ``out``).
        seed: the parity images' seed.
        bench_runs: timed runs per batch size (>= 20 for the recorded medians).
        overwrite: replace an existing ``out_dir`` (only once the new export passed).
        aoti: ``torch`` only: also compile an AOTInductor package (minutes of compilation).

    Raises:
        FileNotFoundError: no checkpoint, or its dataset (give ``overrides={"data.root": ...}``).
        FileExistsError: ``out_dir`` exists and ``overwrite`` is false.
        ValueError: an unknown kind, a bad argument, or int8 calibration images that are not the link's.
        ParityError: the export disagrees with its reference beyond ``thresholds`` (nothing is written).
    """
    if kind not in KINDS:
        raise ValueError(f"export={kind!r}: choose one of {KINDS}")
    if threads < 1 or bench_runs < 1:
        raise ValueError(f"threads={threads} and bench_runs={bench_runs} must be >= 1")
    if aoti and kind != "torch":
        raise ValueError("aoti=true applies to export=torch only")
    thresholds = thresholds or parity.ParityThresholds()
    _, datamodule, method = load_checkpoint_and_data(ckpt, overrides)
    eager = method.to_inference()
    images = parity.parity_images(datamodule, images_per_domain, seed)
    reference = parity.outputs(eager, images)
    out = Path(out_dir) if out_dir is not None else default_out_dir(ckpt, kind, method.meta)
    with staged_folder(out, overwrite) as folder:
        start = time.perf_counter()
        if kind == "onnx":
            int8 = int8_calibration(method.meta, datamodule)
            written = _write_onnx(eager, _example(images), folder, images, reference, thresholds, threads, int8)
        else:
            written = _write_torch(eager, _example(images), folder, images, reference, thresholds, threads, aoti)
        model_entry, checks, runner = written
        seconds = time.perf_counter() - start
        result = parity.report(checks, thresholds, images, seed)
        atomic_write_json(folder / "parity.json", result)
        if not result["passed"]:
            raise parity.ParityError(parity.failure_message(result))
        shape = tuple(next(iter(images.values())).shape[1:])
        atomic_write_json(folder / "bench.json", _bench(runner, folder / model_entry["file"], shape, threads,
                                                        bench_runs, seconds))  # fmt: skip
        extra = {"source": {"checkpoint": str(Path(ckpt).resolve())}, "parity": _parity_summary(result)}
        write_manifest(folder, build_manifest(method.meta, kind, model_entry, folder, extra))
    return out


def _example(images: dict[str, torch.Tensor]) -> torch.Tensor:
    """Two images to trace with (``torch.export`` specialises a batch of one); a copy, not a view: ``model.pt2``
    stores the example's whole storage."""
    x = torch.cat([x[:2] for x in images.values()])[:2].clone()
    return x if len(x) == 2 else x.repeat(2, 1, 1, 1)


def int8_calibration(meta: dict[str, Any], datamodule: Any) -> Int8Input | None:
    """``(record, calibration images (N, C, H, W))`` of the chain's ``Int8Quantize`` link, ``None`` without one.

    The images are drawn again by the link itself (its own calibration settings) and must be the ones it recorded
    (domains and counts): the QDQ pass checks its ranges against ONNX Runtime's on them.

    Raises:
        ValueError: the redrawn calibration differs from the recorded one (another dataset or split).
    """
    record = next((r for r in meta.get("chain") or []
                   if str((r.get("config") or {}).get("_target_", "")).endswith(INT8_SUFFIX)), None)  # fmt: skip
    if record is None:
        return None
    link = instantiate(record["config"])
    calibration = link.calibrate(TransformContext(stage="after_fit", datamodule=datamodule))
    recorded = (record.get("state") or {}).get("calibration") or {}
    drawn = calibration.record()
    if recorded and (drawn["domains"], drawn["counts"]) != (recorded.get("domains"), recorded.get("counts")):
        raise ValueError(
            f"int8 export: the link calibrated on {recorded.get('counts')} but the data now gives {drawn['counts']}; "
            "export with the dataset the checkpoint was compressed on"
        )
    return record, torch.cat(list(calibration.images.values()))


def _write_onnx(eager: nn.Module, example: torch.Tensor, folder: Path, images: dict[str, torch.Tensor],
                reference: dict[str, torch.Tensor], thresholds: parity.ParityThresholds, threads: int,
                int8: Int8Input | None) -> Written:  # fmt: skip
    """Write ``model.onnx``; check the float graph against eager (unless int8 layers make eager a fake-quant model)
    and the written file against the fake-quant reference when it holds quantised layers."""
    graphs = export_onnx(eager, example)
    path = folder / MODEL_FILES["onnx"]
    if int8 is None:
        path.write_bytes(model_bytes(graphs.final))
    else:
        float_file = folder / ".float.onnx"
        float_file.write_bytes(model_bytes(graphs.final))
        qdq.quantize_qdq(float_file, path, int8[1], int8[0])
        float_file.unlink()
    runner = OrtModel(ort_session(path, threads))
    checks = []
    if int8 is None:  # the float graph computes eager's function (QuantLinear's float module is exact)
        float_runner = OrtModel(ort_session(model_bytes(graphs.float), threads)) if graphs.nbits else runner
        checks.append(parity.check("float_runtime_vs_eager", reference, parity.outputs(float_runner, images),
                                   thresholds.float_limits()))  # fmt: skip
    if graphs.nbits or int8 is not None:
        checks.append(parity.check("quantised_runtime_vs_fake_quant", reference, parity.outputs(runner, images),
                                   thresholds.quantised_limits()))  # fmt: skip
    opsets = {op.domain or "ai.onnx": op.version for op in onnx.load(str(path), load_external_data=False).opset_import}
    entry = {"file": path.name, "runtime": "onnxruntime", "input": INPUT_NAME, "output": OUTPUT_NAME,
             "layout": "NCHW", "dtype": "float32", "input_shape": ["batch", *example.shape[1:]], "opsets": opsets,
             "matmul_nbits": graphs.nbits_records(),
             "int8_qdq_layers": list(int8[0]["state"]["layers"]) if int8 is not None else []}  # fmt: skip
    return entry, checks, runner


def _write_torch(eager: nn.Module, example: torch.Tensor, folder: Path, images: dict[str, torch.Tensor],
                 reference: dict[str, torch.Tensor], thresholds: parity.ParityThresholds, threads: int,
                 aoti: bool) -> Written:  # fmt: skip
    """Write ``model.pt2`` (the eager model as a ``torch.export`` program) and check the reloaded file (and the
    AOTInductor package, when asked for)."""
    batch = torch.export.Dim("batch", min=1)
    with torch.no_grad():
        program = torch.export.export(eager, (example,), dynamic_shapes=({0: batch},))
    path = folder / MODEL_FILES["torch"]
    torch.export.save(program, path)
    runner = torch.export.load(path).module()
    with bench.torch_threads(threads):
        checks = [parity.check("runtime_vs_eager", reference, parity.outputs(runner, images),
                               thresholds.float_limits())]  # fmt: skip
    entry = {"file": path.name, "runtime": "torch.export", "input": INPUT_NAME, "output": OUTPUT_NAME,
             "layout": "NCHW", "dtype": "float32", "input_shape": ["batch", *example.shape[1:]]}  # fmt: skip
    if aoti:  # compiled C++ for the same program: checked like the program itself
        compiled = aoti_load_package(aoti_compile_and_package(program, package_path=str(folder / AOTI_FILE)))
        with bench.torch_threads(threads):
            checks.append(parity.check("aoti_vs_eager", reference, parity.outputs(compiled, images),
                                       thresholds.float_limits()))  # fmt: skip
        entry["aoti_file"] = AOTI_FILE
    return entry, checks, runner


def _bench(runner: Callable, path: Path, shape: tuple[int, ...], threads: int, runs: int,
           export_seconds: float) -> dict[str, Any]:  # fmt: skip
    """``bench.json``: the model file's size, latency at ``threads`` threads, and how long the export took."""
    with bench.torch_threads(threads):
        latency = bench.latency(runner, shape, runs=runs)
    return {"file": path.name, "file_bytes": path.stat().st_size, "file_mb": path.stat().st_size / 2**20,
            "threads": threads, "runs": runs, "latency": latency, "export_seconds": export_seconds,
            "cpu": bench.cpu_model()}  # fmt: skip


def _parity_summary(result: dict[str, Any]) -> dict[str, Any]:
    """The manifest's short account of ``parity.json``."""
    keys = ("max_abs_diff", "rel_l2", "top1_agreement", "images", "passed")
    return {"passed": result["passed"], "checks": {c["name"]: {k: c[k] for k in keys} for c in result["checks"]}}


@contextlib.contextmanager
def staged_folder(out: Path, overwrite: bool = False) -> Iterator[Path]:
    """A temporary sibling of ``out`` to write into; renamed to ``out`` when the block ends without an error, else
    removed together with the parent folders it had to create.

    Raises:
        FileExistsError: ``out`` exists and ``overwrite`` is false.
    """
    out = Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists: remove it, choose another out=, or pass overwrite=true")
    created = next((p for p in reversed([out.parent, *out.parent.parents]) if not p.exists()), None)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        yield tmp
        _publish(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if created is not None:
            _remove_empty(out.parent, created)
        raise


def _publish(tmp: Path, out: Path) -> None:
    """Move the finished folder to ``out`` (replacing an old one), with the permissions ``mkdir`` would give."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _remove_empty(folder: Path, top: Path) -> None:
    """Remove ``folder`` and its parents up to ``top`` (included) while they are empty."""
    for path in [folder, *folder.parents]:
        with contextlib.suppress(OSError):
            path.rmdir()
        if path == top:
            return
