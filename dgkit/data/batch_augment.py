"""Batch augmentation for in-memory benchmarks: one seeded draw per step augments a whole batch as tensors.

DomainBed indexes a preloaded tensor (``x[idx]``) and pays almost nothing for its data; augmenting every image
with albumentations costs ten times that. For datasets that live in memory (:class:`~dgkit.data.benchmark.
ArrayDataset`, which declares ``in_memory``) the DataModule therefore builds batches here: the domain's images
are prepared once (the deterministic part of the policy: resize, edge padding, normalisation for the shift-only
policies) and each step indexes them and applies the policy's random part to the whole batch. Folder benchmarks keep the
per-image albumentations pipeline (:mod:`dgkit.data.transforms`) in loader workers.

Both paths speak one vocabulary: the ``data.augment`` policy names of :data:`dgkit.data.transforms.POLICIES`,
each with its batch counterpart in :data:`BATCH_POLICIES` (same ranges and probabilities):

- ``none``: resize (albumentations, at preparation) and normalise; identical to the per-image output.
- ``digits``: edge-replicated padding of 4 px (at preparation) and a crop at an offset uniform on ``0..8`` in
  each axis, exactly the per-image ``PadIfNeeded`` + ``RandomCrop``; each (image, offset) pair gives the very
  pixels the per-image pipeline gives.
- ``imagenet`` / ``maps``: random resized crop (albumentations' 10-attempt rule, vectorised), flips and 90-degree
  rotations folded into one affine grid per image (bilinear, as OpenCV's resize), then colour jitter with
  per-image factors in a random order drawn once per batch (albumentations draws it per image), and grayscale.

Seeding: every random number of a batch comes from one ``torch.Generator`` seeded by
``seed_hash(seed, domain, "batch", draw, view)``, where ``draw`` is the stream position of the batch's first
image (:class:`~dgkit.data.datamodule.DomainStream`). A resumed run therefore draws what the uninterrupted run
drew, as with per-image seeds; but a batch's augmentation depends on the batch size, not only on the image.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import albumentations as A
import cv2
import numpy as np
import torch
import torch.nn.functional as F

from dgkit.backbones.base import DataConfig
from dgkit.data.benchmark import seed_hash
from dgkit.data.transforms import POLICIES, _resize

GRAY = (0.299, 0.587, 0.114)  # ITU-R 601 luma, albumentations' ToGray and contrast weights


@dataclass(frozen=True)
class GeometricPolicy:
    """The random part of an ``imagenet``-like policy, as batch parameters (albumentations' meanings).

    Attributes:
        scale: area range of the random resized crop (fraction of the image).
        ratio: aspect-ratio range of the crop.
        hflip, vflip: probability of each flip.
        rot90: probability of a 90-degree rotation by ``k`` uniform on ``0..3`` (albumentations' RandomRotate90).
        jitter: brightness, contrast, saturation and hue ranges (factors ``1 ± v``; hue a shift of ``± v`` turn).
        jitter_p: probability of colour jitter per image.
        gray_p: probability of grayscale per image.
    """

    scale: tuple[float, float]
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: float = 0.0
    vflip: float = 0.0
    rot90: float = 0.0
    jitter: tuple[float, float, float, float] = (0.0, 0.0, 0.0, 0.0)
    jitter_p: float = 1.0
    gray_p: float = 0.0


SHIFT = 4
"""The ``digits`` policy's largest shift in pixels (its padding in :mod:`dgkit.data.transforms`)."""

BATCH_POLICIES: dict[str, GeometricPolicy | str] = {
    "none": "none",
    "digits": "shift",
    "imagenet": GeometricPolicy(scale=(0.7, 1.0), hflip=0.5, jitter=(0.3, 0.3, 0.3, 0.3), gray_p=0.1),
    "maps": GeometricPolicy(
        scale=(0.5, 1.0), hflip=0.5, vflip=0.5, rot90=0.5, jitter=(0.2, 0.2, 0.2, 0.05), jitter_p=0.8
    ),
}
"""The batch counterpart of every ``data.augment`` policy (same names as :data:`dgkit.data.transforms.POLICIES`)."""


class BatchAugment:
    """A policy applied to whole batches: :meth:`prepare` once per domain, then :meth:`__call__` per batch.

    Args:
        cfg: the backbone's preprocessing (input size, mean, std, interpolation).
        policy: a ``data.augment`` name.

    Raises:
        ValueError: an unknown policy (the valid names are listed).
    """

    def __init__(self, cfg: DataConfig, policy: str = "none") -> None:
        if policy not in POLICIES or policy not in BATCH_POLICIES:
            raise ValueError(f"data.augment={policy!r} is not a known policy; choose one of {sorted(BATCH_POLICIES)}")
        self.cfg, self.policy, self.kind = cfg, policy, BATCH_POLICIES[policy]
        self.random = self.kind != "none"  # whether a batch needs a generator
        normalize = A.Normalize(mean=cfg.mean, std=cfg.std, max_pixel_value=255.0)
        # albumentations normalises uint8 as (x - mean·255) · (1 / (std·255)) in float32: the same numbers here
        self._mean255 = torch.from_numpy(np.asarray(normalize.mean_np, np.float32)).view(1, -1, 1, 1)
        self._inv_std255 = torch.from_numpy(np.asarray(normalize.denominator, np.float32)).view(1, -1, 1, 1)
        self._mean = torch.tensor(cfg.mean, dtype=torch.float32).view(1, -1, 1, 1)
        self._std = torch.tensor(cfg.std, dtype=torch.float32).view(1, -1, 1, 1)

    def prepare(self, images: np.ndarray) -> np.ndarray:
        """The deterministic part of the policy on a domain's ``uint8 (N, H, W, C)`` images, ``(N, C, H', W')``:
        for ``none`` and ``digits`` resized (and edge-padded by :data:`SHIFT`) and normalised once into float32,
        as DomainBed preloads its tensors (a batch is then slices copied, no arithmetic); for the geometric
        policies the native ``uint8`` images (cropped and resized per batch)."""
        if isinstance(self.kind, GeometricPolicy):
            return np.ascontiguousarray(np.asarray(images).transpose(0, 3, 1, 2))
        steps: list[A.BasicTransform] = [_resize(self.cfg)]
        if self.kind == "shift":
            h, w = self.cfg.input_size
            steps.append(A.PadIfNeeded(h + 2 * SHIFT, w + 2 * SHIFT, border_mode=cv2.BORDER_REPLICATE))
        pipeline = A.Compose(steps)
        out = np.stack([pipeline(image=np.asarray(image))["image"] for image in images]).transpose(0, 3, 1, 2)
        return self.normalize_uint8(np.ascontiguousarray(out)).numpy()

    def __call__(self, prepared: np.ndarray, idx: np.ndarray, generator: torch.Generator | None) -> torch.Tensor:
        """Images ``idx`` of a prepared domain, augmented and normalised: ``float32 (B, C, H, W)``."""
        if self.kind == "none":
            return torch.from_numpy(prepared.take(idx, axis=0))
        if self.kind == "shift":
            return torch.from_numpy(self._shift(prepared, idx, generator))
        return self._geometric(prepared, idx, generator)

    def normalize_uint8(self, x: np.ndarray) -> torch.Tensor:
        """``uint8 (N, C, H, W)`` normalised with albumentations' arithmetic: float32 ``(x - mean·255) / (std·255)``."""
        return torch.from_numpy(x).float().sub_(self._mean255).mul_(self._inv_std255)

    def _shift(self, padded: np.ndarray, idx: np.ndarray, generator: torch.Generator) -> np.ndarray:
        """Crops of the padded images at offsets uniform on ``0..2·SHIFT`` per axis (``(2, B)`` draws)."""
        h, w = self.cfg.input_size
        offsets = torch.randint(0, 2 * SHIFT + 1, (2, len(idx)), generator=generator).tolist()
        out = np.empty((len(idx), padded.shape[1], h, w), dtype=padded.dtype)
        # numpy slice copies in a loop: ~1 µs per image, far below one fancy-indexing gather of the batch
        for k, (i, y, x) in enumerate(zip(idx.tolist(), *offsets)):
            out[k] = padded[i, :, y : y + h, x : x + w]
        return out

    def _geometric(self, images: np.ndarray, idx: np.ndarray, generator: torch.Generator) -> torch.Tensor:
        p: GeometricPolicy = self.kind  # type: ignore[assignment]
        x = torch.from_numpy(images.take(idx, axis=0)).float().div_(255.0)  # (B, C, H0, W0) in [0, 1]
        b, _, h0, w0 = x.shape
        theta = _crop_theta(generator, b, h0, w0, p)
        grid = F.affine_grid(theta, [b, x.shape[1], *self.cfg.input_size], align_corners=False)
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
        if any(p.jitter):
            x = _color_jitter(x, generator, p.jitter, p.jitter_p)
        if p.gray_p > 0:
            gray = torch.rand(b, generator=generator) < p.gray_p
            x = torch.where(gray.view(b, 1, 1, 1), _luma(x).expand_as(x), x)
        return x.sub_(self._mean).div_(self._std)


def _uniform(generator: torch.Generator, shape: tuple[int, ...], low: float, high: float) -> torch.Tensor:
    return torch.rand(shape, generator=generator, dtype=torch.float64) * (high - low) + low


def crop_boxes(
    generator: torch.Generator, n: int, h: int, w: int, scale: tuple[float, float], ratio: tuple[float, float]
) -> torch.Tensor:
    """``n`` random resized crop boxes ``(y0, x0, height, width)`` (int64 ``(n, 4)``) on an ``h x w`` image, by
    albumentations' rule: 10 attempts of area ``U(scale)·h·w`` and log-uniform aspect ratio, the first that fits,
    placed uniformly; else the centre crop clamped to ``ratio``."""
    area = _uniform(generator, (n, 10), scale[0] * h * w, scale[1] * h * w)
    aspect = torch.exp(_uniform(generator, (n, 10), math.log(ratio[0]), math.log(ratio[1])))
    cw, ch = torch.round(torch.sqrt(area * aspect)), torch.round(torch.sqrt(area / aspect))
    fits = (cw > 0) & (cw <= w) & (ch > 0) & (ch <= h)
    first = fits.to(torch.uint8).argmax(dim=1, keepdim=True)  # index of the first attempt that fits
    cw, ch = cw.gather(1, first).squeeze(1), ch.gather(1, first).squeeze(1)
    if w / h < ratio[0]:
        fw, fh = w, round(w / ratio[0])
    elif w / h > ratio[1]:
        fw, fh = round(h * ratio[1]), h
    else:
        fw, fh = w, h
    any_fit = fits.any(dim=1)
    cw, ch = torch.where(any_fit, cw, float(fw)), torch.where(any_fit, ch, float(fh))
    start = torch.rand((2, n), generator=generator, dtype=torch.float64)
    y0 = torch.where(any_fit, torch.floor((h - ch + 1) * start[0]), torch.floor((h - ch) / 2))
    x0 = torch.where(any_fit, torch.floor((w - cw + 1) * start[1]), torch.floor((w - cw) / 2))
    return torch.stack([y0, x0, ch, cw], dim=1).long()


def _crop_theta(generator: torch.Generator, b: int, h: int, w: int, p: GeometricPolicy) -> torch.Tensor:
    """Affine ``(B, 2, 3)`` from output to source normalised coordinates: crop box, then flips and rotations of
    the crop (``align_corners=False``: pixel ``u`` of ``n`` maps to ``x0 + (u + 0.5)·w / n - 0.5``, as OpenCV)."""
    y0, x0, ch, cw = crop_boxes(generator, b, h, w, p.scale, p.ratio).double().unbind(1)
    draws = torch.rand((3, b), generator=generator, dtype=torch.float64)
    k = torch.randint(0, 4, (b,), generator=generator) * (draws[2] < p.rot90)
    m = torch.eye(2, dtype=torch.float64).repeat(b, 1, 1)  # output (x, y) -> crop (x, y), both normalised
    m[:, 0, 0] = torch.where(draws[0] < p.hflip, -1.0, 1.0)
    m[:, 1, 1] = torch.where(draws[1] < p.vflip, -1.0, 1.0)
    rot = torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[0.0, 1.0], [-1.0, 0.0]], [[-1.0, 0.0], [0.0, -1.0]],
                        [[0.0, -1.0], [1.0, 0.0]]], dtype=torch.float64)  # fmt: skip
    m = m @ rot[k]  # rotate the output grid first, then flip: (flip ∘ rot)^-1 reads the crop
    scale = torch.stack([cw / w, ch / h], dim=1)  # crop -> source, normalised
    shift = torch.stack([(2 * x0 + cw) / w - 1, (2 * y0 + ch) / h - 1], dim=1)
    theta = torch.cat([scale.unsqueeze(2) * m, shift.unsqueeze(2)], dim=2)
    return theta.float()


def _luma(x: torch.Tensor) -> torch.Tensor:
    """``(B, 1, H, W)`` grayscale of RGB ``x``."""
    return (x[:, 0:1] * GRAY[0]).add_(x[:, 1:2], alpha=GRAY[1]).add_(x[:, 2:3], alpha=GRAY[2])


def _blend(x: torch.Tensor, other: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return (x * factor + other * (1 - factor)).clamp_(0, 1)


def _shift_hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate the hue of RGB ``x`` in [0, 1] by ``shift`` turns (``(B, 1, 1)``) through HSV."""
    r, g, b = x.unbind(1)
    v, _ = x.max(dim=1)
    c = v - x.min(dim=1).values
    safe = torch.where(c > 0, c, torch.ones_like(c))
    h = torch.where(v == r, ((g - b) / safe) % 6, torch.where(v == g, (b - r) / safe + 2, (r - g) / safe + 4))
    h = torch.where(c > 0, h / 6, torch.zeros_like(h))
    h = (h + shift) % 1.0
    # HSV -> RGB: channel n takes v - c·clamp(min(k, 4 - k), 0, 1) with k = (n + 6h) mod 6, n = 5, 3, 1
    n = torch.tensor([5.0, 3.0, 1.0], dtype=x.dtype).view(1, 3, 1, 1)
    k = (n + 6 * h.unsqueeze(1)) % 6
    return v.unsqueeze(1) - c.unsqueeze(1) * torch.clamp(torch.minimum(k, 4 - k), 0, 1)


def _color_jitter(
    x: torch.Tensor, generator: torch.Generator, ranges: tuple[float, float, float, float], p: float
) -> torch.Tensor:
    """Brightness, contrast, saturation and hue with per-image factors, in one random order per batch; images
    drawn out (probability ``1 - p``) keep factors 1 and shift 0."""
    b = x.shape[0]
    factors = torch.rand((4, b), generator=generator) * 2 - 1  # U(-1, 1)
    factors = factors * torch.tensor(ranges).view(4, 1)
    factors = factors * (torch.rand(b, generator=generator) < p)
    order = torch.randperm(4, generator=generator).tolist()
    view = (b, 1, 1, 1)
    ops: list[Callable[[torch.Tensor], torch.Tensor]] = [
        lambda t: (t * (1 + factors[0]).view(view)).clamp_(0, 1),
        lambda t: _blend(t, _luma(t).mean(dim=(1, 2, 3), keepdim=True), (1 + factors[1]).view(view)),
        lambda t: _blend(t, _luma(t), (1 + factors[2]).view(view)),
        lambda t: _shift_hue(t, factors[3].view(b, 1, 1)),
    ]
    for i in order:
        x = ops[i](x)
    return x


class BatchLoader:
    """An endless iterable of one domain's training batches ``(x (B, C, H, W) or (V, B, C, H, W), y (B,))``.

    Args:
        augment: the policy.
        prepared: the domain's training images after :meth:`BatchAugment.prepare`.
        labels: their labels ``(N,)``.
        stream: a :class:`~dgkit.data.datamodule.DomainStream` whose blocks are batches.
        seed, domain: with a block's first draw and the view, the key of its generator.
        views: independent augmentations per image (stacked on a leading axis when > 1).
    """

    def __init__(
        self,
        augment: BatchAugment,
        prepared: np.ndarray,
        labels: np.ndarray,
        stream,
        seed: int = 0,
        domain: str = "",
        views: int = 1,
    ) -> None:
        self.augment, self.prepared, self.stream = augment, prepared, stream
        self.labels = np.asarray(labels, dtype=np.int64)
        self.seed, self.domain, self.views = seed, domain, views

    def generator(self, draw: int, view: int = 0) -> torch.Generator:
        """The generator of the batch starting at stream position ``draw``."""
        return torch.Generator().manual_seed(seed_hash(self.seed, self.domain, "batch", draw, view))

    def batch(self, idx: np.ndarray, draw: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch of images ``idx`` whose first stream position is ``draw``."""
        xs = [
            self.augment(self.prepared, idx, self.generator(draw, v) if self.augment.random else None)
            for v in range(self.views)
        ]
        return (xs[0] if self.views == 1 else torch.stack(xs)), torch.from_numpy(self.labels.take(idx))

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        consume_loader_seed()  # when iter() is called, as a DataLoader does: the global stream stays the per-image one
        return (self.batch(idx, draw) for idx, draw in self.stream.blocks())


def consume_loader_seed(n: int = 1) -> None:
    """Take ``n`` draws from torch's global generator, as each ``DataLoader`` iterator does for its base seed.

    What else draws from the global generator during training (dropout, BSS without a seed) then sees the same
    stream whichever loader built the batches, so ``data.augment=none`` trains identically on both paths.
    """
    for _ in range(n):
        torch.empty((), dtype=torch.int64).random_()
