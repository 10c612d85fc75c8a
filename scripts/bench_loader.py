"""Does the data path keep up? Loader throughput and cost against plain baselines, and the loader's memory.

Three parts (``--part``), all single-threaded (``torch.set_num_threads(1)``, one thread per loader worker),
variants interleaved so that background load hits them alike; medians and ratios are printed as markdown.

``in-memory`` (in-memory benchmarks, issue 19): one training step's batches of the experiment (default the quick
start: digits_dg, 3 source domains) from dgkit's loader (batch augmentation as tensors), from the per-image
albumentations path it replaced (``data.batch_augment=false``), and by plain tensor indexing ``x[idx]`` of a
preloaded normalised tensor (DomainBed's way, no augmentation); then the training step of each model (random
init, Adam, cross-entropy on the concatenated batch) to give the loader's share of a step.

``folder`` (issue 17): a JPEG tree of ``--images`` images (6 domains, 10 classes; written once under ``--tree``,
never committed), trained at ``--size`` px with the ``imagenet`` policy and 0, 1, 2 workers: dgkit's DataModule
against torchvision ``ImageFolder`` (one per source domain, concatenated) + one ``DataLoader`` with as many
workers and the same albumentations pipeline on the same pixels (torchvision decodes with PIL; dgkit decodes
JPEGs with OpenCV, which gives PIL's pixels faster: ``tests/test_bench_loader.py``). Images/s over
``--folder-steps`` steps after the workers started, and CPU time per image summed over the main process and its
workers (robust to other jobs on the machine). ``--cache S`` adds a third arm: dgkit's DataModule reading the
decoded cache of side ``S`` (``data.cache``; built once by ``scripts/prepare_cache.py`` when missing or stale, its
build time printed) instead of decoding the files.

``memory``: resident memory (RSS, PSS, USS from ``/proc/<pid>/smaps_rollup``) of the main process and its loader
workers: dgkit's DataModule with 2 workers after a few steps, and the file list's share: one loader with 2
workers over every path of the tree, each worker reading every path once (what a pass does), the paths kept as
a Python list of ``Path`` (before) or as dgkit's packed :class:`~dgkit.data.folder.PathTable`; the difference per
worker is extrapolated linearly to DomainNet's 586,575 paths.

    python scripts/bench_loader.py --part in-memory                        # quick start, batch 64 per domain
    python scripts/bench_loader.py --part folder --images 20000              # writes outputs/bench_loader_tree
    python scripts/bench_loader.py --part folder --images 3000 --cache 256   # + the decoded cache
    python scripts/bench_loader.py --part memory --images 20000
"""

from __future__ import annotations

import argparse
import gc
import itertools
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dgkit.backbones.base import DataConfig  # noqa: E402
from dgkit.config import register_resolvers  # noqa: E402
from dgkit.data import DGDataModule  # noqa: E402
from dgkit.data.folder import ImageFileDataset, folder_benchmark  # noqa: E402
from dgkit.data.transforms import build_transform  # noqa: E402
from dgkit.utils.cli import parse_with_overrides  # noqa: E402

MODELS = ("small_cnn", "small_cnn_lite", "resnet18", "vit_digits")
DOMAINNET_PATHS = 586_575
TREE_DOMAINS = ("clipart", "infograph", "painting", "quickdraw", "real", "sketch")


# ---- shared ----------------------------------------------------------------------------------------------------
def timed(fn: Callable[[], object]) -> tuple[float, float]:
    """``(wall s, CPU s of this process)`` of one call."""
    w, c = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - w, time.process_time() - c


def machine() -> str:
    """One line naming the machine the figures come from."""
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}"


def _cfg(exp: str, overrides: list[str]) -> object:
    register_resolvers()
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        return compose("train", overrides=[f"+exp={exp}", *overrides])


# ---- in-memory benchmarks ----------------------------------------------------------------------------------------
def indexing_loader(dm: DGDataModule) -> Iterator[dict]:
    """DomainBed's loader: every source domain's training images normalised once into a float tensor, each step
    ``x[idx]`` of the same stream positions dgkit draws."""
    tensors = {}
    for d in dm.source_domains:
        images = np.asarray(dm.benchmark.datasets[d].images)[dm.train_indices[d]]
        x = dm.batch_loader(d).augment.normalize_uint8(images.transpose(0, 3, 1, 2).copy())  # (N, C, H, W)
        tensors[d] = (x, torch.from_numpy(np.asarray(dm.benchmark.datasets[d].labels)[dm.train_indices[d]]))
    streams = {d: dm.stream(d).blocks() for d in dm.source_domains}
    while True:
        batch = {}
        for d, (x, y) in tensors.items():
            idx = torch.from_numpy(next(streams[d])[0])
            batch[d] = (x[idx], y[idx])
        yield batch


def model_step(backbone_name: str, exp: str, overrides: list[str], batch: torch.Tensor) -> Callable[[], None]:
    """One ERM training step (forward, cross-entropy, backward, Adam) of a random-init backbone + linear head."""
    cfg = _cfg(exp, [f"backbone={backbone_name}", *overrides])
    backbone = instantiate(cfg.backbone)
    model = torch.nn.Sequential(backbone, torch.nn.Linear(backbone.num_features, 10))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    y = torch.randint(0, 10, (batch.shape[0],), generator=torch.Generator().manual_seed(0))

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(batch), y).backward()
        opt.step()

    return step


def bench_in_memory(args: argparse.Namespace, overrides: list[str]) -> dict:
    """Loader CPU per step (batch path, per-image path, plain indexing) and each model's step time."""
    from dgkit.compose import build_datamodule

    base = [f"data.batch_size={args.batch_size}", *overrides]
    cfg = _cfg(args.exp, base)
    backbone = instantiate(cfg.backbone)
    loaders = {
        "dgkit (batch tensors)": iter(build_datamodule(cfg, backbone).train_dataloader()),
        "per-image albumentations": iter(
            build_datamodule(_cfg(args.exp, [*base, "+data.batch_augment=false"]), backbone).train_dataloader()
        ),  # fmt: skip
        "x[idx] (DomainBed)": indexing_loader(build_datamodule(cfg, backbone)),
    }
    cpu: dict[str, list[float]] = {k: [] for k in loaders}
    wall: dict[str, list[float]] = {k: [] for k in loaders}
    for step in range(args.warmup + args.steps):
        for name, it in loaders.items():
            w, c = timed(lambda it=it: next(it))
            if step >= args.warmup:
                wall[name].append(w)
                cpu[name].append(c)
    first = next(loaders["dgkit (batch tensors)"])
    first = first[0] if isinstance(first, tuple) else first
    x = torch.cat([v[0] for v in first.values()])
    images = x.shape[0]
    loader = {k: {"cpu_ms": 1e3 * statistics.median(cpu[k]), "wall_ms": 1e3 * statistics.median(wall[k])} for k in cpu}
    models = {}
    steps = {m: model_step(m, args.exp, base, x) for m in args.models}
    times: dict[str, list[float]] = {m: [] for m in steps}
    for r in range(args.model_warmup + args.model_steps):  # interleaved over models
        for m, fn in steps.items():
            _, c = timed(fn)  # CPU time, as the loader's: one thread, and robust to other jobs on the machine
            if r >= args.model_warmup:
                times[m].append(c)
    for m, t in times.items():
        models[m] = 1e3 * statistics.median(t)
    return {"images_per_step": images, "loader": loader, "model_ms": models, "shape": tuple(x.shape[1:])}


def print_in_memory(res: dict, args: argparse.Namespace) -> None:
    loader, n = res["loader"], res["images_per_step"]
    plain = loader["x[idx] (DomainBed)"]["cpu_ms"]
    print(f"\n### In-memory loader: {args.exp}, {n} images per step {res['shape']}\n")
    print("| loader | CPU ms / step | images per CPU-second (loader alone) | CPU vs x[idx] |\n|---|---:|---:|---:|")
    for name, t in loader.items():
        print(f"| {name} | {t['cpu_ms']:.2f} | {n / t['cpu_ms'] * 1e3:,.0f} | {t['cpu_ms'] / plain:.2f} |")
    ours = loader["dgkit (batch tensors)"]["cpu_ms"]
    old = loader["per-image albumentations"]["cpu_ms"]
    print("\n| model | CPU ms / training step | dgkit loader / model step | per-image loader / model step |")
    print("|---|---:|---:|---:|")
    for m, ms in res["model_ms"].items():
        print(f"| {m} | {ms:.0f} | {100 * ours / ms:.2f} % | {100 * old / ms:.2f} % |")


# ---- folder benchmarks -------------------------------------------------------------------------------------------
def write_tree(root: Path, images: int, classes: int = 10, seed: int = 0) -> Path:
    """A ``root/<domain>/<class>/<i>.jpg`` tree of ``images`` smooth random JPEGs (240-400 px a side), written
    once (``root/.complete`` records the count)."""
    marker = root / ".complete"
    if marker.exists() and marker.read_text().strip() == str(images):
        return root
    rng = np.random.default_rng(seed)
    per_class = max(1, images // (len(TREE_DOMAINS) * classes))
    for d, c in itertools.product(range(len(TREE_DOMAINS)), range(classes)):
        folder = root / TREE_DOMAINS[d] / f"c{c:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            h, w = rng.integers(240, 401, 2)
            coarse = Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8))
            coarse.resize((int(w), int(h)), Image.BICUBIC).save(folder / f"{i:05d}.jpg", quality=90)
    marker.write_text(str(images))
    return root


class _AlbumentationsOnPil:
    """torchvision's ``ImageFolder`` hands a PIL image: its array is the one dgkit decodes; then the same pipeline."""

    def __init__(self, transform) -> None:
        self.transform = transform

    def __call__(self, image: Image.Image) -> torch.Tensor:
        return self.transform(image=np.asarray(image))["image"]


def imagefolder_loader(tree: Path, domains: list[str], size: int, batch: int, workers: int) -> Iterator:
    """torchvision ``ImageFolder`` per source domain, concatenated, in one shuffled endless ``DataLoader`` of
    ``batch`` images per domain per step (the same images per step and worker processes as dgkit's loader)."""
    from torchvision.datasets import ImageFolder

    transform = _AlbumentationsOnPil(build_transform(DataConfig((size, size)), "imagenet", train=True))
    dataset = torch.utils.data.ConcatDataset([ImageFolder(str(tree / d), transform=transform) for d in domains])
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=batch * len(domains), shuffle=True, num_workers=workers, persistent_workers=workers > 0,
        drop_last=True,
    )  # fmt: skip
    while True:
        yield from loader


def dgkit_folder_loader(tree: Path, size: int, batch: int, workers: int, cache: int | None = None) -> Iterator:
    """dgkit's training batches on the tree (decoding the files, or reading the decoded cache of side ``cache``)."""
    dm = DGDataModule(folder_benchmark(tree, verify=False, cache=cache), test_domains=[TREE_DOMAINS[-1]],
                      data_config=DataConfig((size, size)), batch_size=batch, num_workers=workers,
                      augment="imagenet")  # fmt: skip
    return iter(dm.train_dataloader())


def cpu_s(pids: list[int]) -> float:
    """CPU seconds (user + system) used so far by this process and the processes ``pids``."""
    tick = os.sysconf("SC_CLK_TCK")
    total = time.process_time()
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += (int(fields[11]) + int(fields[12])) / tick  # utime, stime (fields 14 and 15 of stat)
    return total


def throughput(it: Iterator, steps: int, warmup: int, per_step: int) -> tuple[float, float]:
    """``(images/s, CPU ms per image over the main process and its workers)`` over ``steps`` steps."""
    for _ in range(warmup):  # workers start and fill their prefetch queues
        next(it)
    pids = children()
    start, cpu = time.perf_counter(), cpu_s(pids)
    for _ in range(steps):
        next(it)
    wall, cpu = time.perf_counter() - start, cpu_s(pids) - cpu
    return steps * per_step / wall, 1e3 * cpu / (steps * per_step)


def ensure_cache(tree: Path, size: int, workers: int) -> float | None:
    """Build the tree's decoded cache of side ``size`` unless a valid one exists: the build's wall seconds, or
    ``None`` when it was already there."""
    from prepare_cache import build_cache  # scripts/ is on the path: this script's own folder

    try:
        folder_benchmark(tree, cache=size)
        return None
    except FileNotFoundError:
        start = time.perf_counter()
        build_cache(tree, size, workers=workers)
        return time.perf_counter() - start


def bench_folder(args: argparse.Namespace) -> dict:
    tree = write_tree(Path(args.tree), args.images)
    sources = list(TREE_DOMAINS[:-1])
    per_step = len(sources) * args.folder_batch
    rates: dict[tuple[str, int], list[tuple[float, float]]] = {}
    arms = ("dgkit", "ImageFolder") + (("dgkit cached",) if args.cache else ())
    if args.cache:
        args.cache_build_s = ensure_cache(tree, args.cache, max(args.workers))
    for _ in range(args.repeats):
        for w in args.workers:
            for name in arms:
                if name == "ImageFolder":
                    it = imagefolder_loader(tree, sources, args.size, args.folder_batch, w)
                else:
                    cache = args.cache if name == "dgkit cached" else None
                    it = dgkit_folder_loader(tree, args.size, args.folder_batch, w, cache)
                rates.setdefault((name, w), []).append(throughput(it, args.folder_steps, 2, per_step))
                del it
                gc.collect()
    return {k: tuple(statistics.median(r[i] for r in v) for i in (0, 1)) for k, v in rates.items()}


def print_folder(res: dict, args: argparse.Namespace) -> None:
    print(f"\n### Folder loader: {args.images} JPEGs, {args.size} px, imagenet policy, "
          f"{len(TREE_DOMAINS) - 1} source domains x {args.folder_batch}\n")  # fmt: skip
    print("| workers | dgkit images/s | ImageFolder images/s | ratio | dgkit CPU ms / image "
          "| ImageFolder CPU ms / image | ratio (CPU per image, ImageFolder / dgkit) |")  # fmt: skip
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for w in args.workers:
        (a, ca), (b, cb) = res[("dgkit", w)], res[("ImageFolder", w)]
        print(f"| {w} | {a:.0f} | {b:.0f} | {a / b:.2f} | {ca:.2f} | {cb:.2f} | {cb / ca:.2f} |")
    if args.cache:
        print_cache(res, args)


def print_cache(res: dict, args: argparse.Namespace) -> None:
    built = getattr(args, "cache_build_s", None)
    note = "already built" if built is None else f"built in {built:.0f} s with {max(args.workers)} worker(s)"
    print(f"\n### Decoded cache: data.cache={args.cache} ({note}) against decoding the JPEGs\n")
    print("| workers | cached images/s | dgkit decoding images/s | ImageFolder images/s | speed-up (cached / "
          "decoding) | cached CPU ms / image | dgkit decoding CPU ms / image | ImageFolder CPU ms / image "
          "| CPU per image, decoding / cached |")  # fmt: skip
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for w in args.workers:
        (c, cc), (a, ca), (b, cb) = res[("dgkit cached", w)], res[("dgkit", w)], res[("ImageFolder", w)]
        print(f"| {w} | {c:.0f} | {a:.0f} | {b:.0f} | {c / a:.2f} | {cc:.2f} | {ca:.2f} | {cb:.2f} | {ca / cc:.2f} |")


# ---- memory --------------------------------------------------------------------------------------------------------
def memory_kb(pid: int) -> dict[str, int]:
    """RSS, PSS and USS (private clean + dirty) of one process, kB, from ``/proc/<pid>/smaps_rollup``."""
    fields = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        key, value = line.split(":")
        fields[key] = int(value.split()[0])
    return {"rss": fields["Rss"], "pss": fields["Pss"], "uss": fields["Private_Clean"] + fields["Private_Dirty"]}


def children() -> list[int]:
    """This process's direct children (loader workers)."""
    pids = []
    for task in Path(f"/proc/{os.getpid()}/task").iterdir():
        pids += [int(p) for p in (task / "children").read_text().split()]
    return pids


class _TouchEveryPath(torch.utils.data.Dataset):
    """Wraps an :class:`ImageFileDataset`; each worker's first item reads every path once (a pass's accesses)."""

    def __init__(self, dataset: ImageFileDataset) -> None:
        self.dataset, self.touched = dataset, False

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> int:
        if not self.touched:
            self.touched = sum(len(str(p)) for p in self.dataset.files) > 0
        return i


def file_list_memory(tree: Path, packed: bool) -> dict:
    """Worker USS after each of 2 workers read every path of the tree, with packed or list-of-Path storage."""
    bench = folder_benchmark(tree, verify=False)
    files = [f for d in bench.domains for f in bench.datasets[d].files]
    dataset = ImageFileDataset(files, np.zeros(len(files), np.int64))
    if not packed:
        dataset.files = [Path(f) for f in files]  # the storage before: one Path object per file
    del bench, files
    gc.collect()
    loader = torch.utils.data.DataLoader(_TouchEveryPath(dataset), batch_size=64, num_workers=2)
    it = iter(loader)
    for _ in range(4):  # both workers have served a batch, so both touched every path
        next(it)
    time.sleep(0.5)
    workers = [memory_kb(pid) for pid in children()]
    main = memory_kb(os.getpid())
    del it
    return {"paths": len(dataset), "main": main, "workers": workers}


def bench_memory(args: argparse.Namespace) -> dict:
    tree = write_tree(Path(args.tree), args.images)
    it = dgkit_folder_loader(tree, args.size, args.folder_batch, 2)
    for _ in range(3):
        next(it)
    time.sleep(0.5)
    loader = {"main": memory_kb(os.getpid()), "workers": [memory_kb(pid) for pid in children()]}
    del it
    gc.collect()
    time.sleep(1.0)
    return {"loader": loader, "list": file_list_memory(tree, packed=False), "packed": file_list_memory(tree, True)}


def print_memory(res: dict, args: argparse.Namespace) -> None:
    loader = res["loader"]
    total = {k: loader["main"][k] + sum(w[k] for w in loader["workers"]) for k in ("rss", "pss", "uss")}
    n_workers = len(loader["workers"])
    print(f"\n### Memory: dgkit DataModule, data.num_workers=2, {args.images} paths ({n_workers} worker processes)\n")
    print("| process | RSS MB | PSS MB | USS MB |\n|---|---:|---:|---:|")
    mean_worker = {k: statistics.mean(w[k] for w in loader["workers"]) for k in total}
    for name, m in (("main", loader["main"]), ("one worker (mean)", mean_worker), ("all", total)):
        print(f"| {name} | {m['rss'] / 1024:.0f} | {m['pss'] / 1024:.0f} | {m['uss'] / 1024:.0f} |")
    lst, packed = res["list"], res["packed"]
    n = lst["paths"]
    print(f"\n### The file list's share: 2 workers, each reading all {n} paths once\n")
    print("| storage | worker USS MB (mean) | main USS MB | per worker at 586k paths (extrapolated) MB |")
    print("|---|---:|---:|---:|")
    base = statistics.mean(w["uss"] for w in packed["workers"])
    for name, r in (("list of Path (before)", lst), ("PathTable (packed)", packed)):
        uss = statistics.mean(w["uss"] for w in r["workers"])
        extra = (uss - base) / n * DOMAINNET_PATHS / 1024
        print(f"| {name} | {uss / 1024:.1f} | {r['main']['uss'] / 1024:.0f} | +{extra:.0f} over packed |")


def main(argv: list[str] | None = None) -> dict:
    """Run the chosen parts; print markdown tables and the machine; return the raw figures."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", nargs="+", default=["in-memory", "folder", "memory"],
                   choices=["in-memory", "folder", "memory"])  # fmt: skip
    p.add_argument("--exp", default="quickstart")
    p.add_argument("--batch-size", type=int, default=64, help="in-memory: images per source domain per step")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--models", nargs="+", default=list(MODELS))
    p.add_argument("--model-steps", type=int, default=8)
    p.add_argument("--model-warmup", type=int, default=2)
    p.add_argument("--tree", default=str(ROOT / "outputs" / "bench_loader_tree"))
    p.add_argument("--images", type=int, default=20000)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--folder-batch", type=int, default=16, help="folder: images per source domain per step")
    p.add_argument("--folder-steps", type=int, default=8)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--cache", type=int, default=None, help="folder: also time the decoded cache of this side")
    p.epilog = "Hydra overrides for the in-memory part (key=value) may follow anywhere, or after --."
    args, overrides = parse_with_overrides(p, argv)
    torch.set_num_threads(1)
    out = {}
    if "in-memory" in args.part:
        out["in_memory"] = bench_in_memory(args, overrides)
        print_in_memory(out["in_memory"], args)
    if "folder" in args.part:
        out["folder"] = bench_folder(args)
        print_folder(out["folder"], args)
    if "memory" in args.part:
        out["memory"] = bench_memory(args)
        print_memory(out["memory"], args)
    print(f"\nmachine: {machine()}; one thread per process")
    return out


if __name__ == "__main__":
    main()
