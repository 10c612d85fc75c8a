"""Batch Styles Standardization (BSS; Scalbert, Vakalopoulou & Couzinié-Devy, ICLR 2024, arXiv 2303.06088).

BSS gives every image of a batch the same "style": in the centred Fourier spectrum, the low-frequency
amplitude square of every image is replaced by that of one reference image of the batch, while each image
keeps its own phase ("content"). One area ratio ``r ~ U(r_min, r_max)`` and one reference index are drawn per
call and shared by the whole batch. :class:`BatchColorJitter` is the paper's batch-wise colour jitter (one draw
shared by the batch), which does not re-introduce per-image style variation.

Window. The window is centred on the DC bin and symmetric about it: half-side ``b = floor(H * sqrt(r) / 2)``
and rows ``[H//2 - b, H//2 + b]`` (likewise for columns), i.e. FDA's window (Yang & Soatto, CVPR 2020) with
``beta = sqrt(r) / 2``, hence :func:`beta_to_ratio` ``r = (2 beta)^2``. FACT's window (side ``int(H sqrt r)``)
is off-centre by one bin when its side is even, so the edited spectrum is no longer Hermitian and taking the
real part of the inverse FFT silently changes the swapped amplitudes; the symmetric window keeps them exact.

Pixel space. Training batches arrive normalised by the backbone's mean/std. :class:`BatchStylesStandardization`
un-normalises them to [0, 1], standardises, clamps to [0, 1] and re-normalises; :func:`standardize_styles`
is the bare operation (no clamp) on whatever tensor it is given. The FFT runs in float32 on the batch's device.
"""

from __future__ import annotations

import math
import random
import warnings
from collections.abc import Sequence

import torch
import torchvision.transforms.v2.functional as TF


def beta_to_ratio(beta: float) -> float:
    """FDA's ``beta`` (half-side of the window over the image side) as BSS's area ratio ``r = (2 beta)^2``."""
    return (2.0 * beta) ** 2


def window_bounds(size: int, ratio: float) -> tuple[int, int]:
    """``[start, stop)`` of the centred window along one axis of ``size`` bins (after ``fftshift``).

    The half-side is ``b = floor(size * sqrt(ratio) / 2)``, so the window ``[size//2 - b, size//2 + b]`` is
    symmetric about the DC bin (clipped to the array); ``ratio <= 0`` gives an empty window.
    """
    centre = size // 2
    if ratio <= 0:
        return centre, centre
    b = math.floor(size * math.sqrt(ratio) / 2 + 1e-9)  # epsilon: sqrt((2 beta)^2) / 2 may land just below beta
    return max(0, centre - b), min(size, centre + b + 1)


@torch.no_grad()
def standardize_styles(x: torch.Tensor, ratio: float, ref: int) -> torch.Tensor:
    """Give every image of ``x`` the low-frequency amplitude of ``x[ref]`` (no clamping).

    Args:
        x: images ``(N, C, H, W)``, any float dtype (computed in float32, returned in ``x.dtype``).
        ratio: window area over image area, in [0, 1]; 0 is the identity.
        ref: index of the reference image.
    """
    n, _, h, w = x.shape
    if not 0 <= ref < n:
        raise ValueError(f"reference index {ref} out of range for a batch of {n}")
    (h0, h1), (w0, w1) = window_bounds(h, ratio), window_bounds(w, ratio)
    if h1 <= h0 or w1 <= w0:
        return x
    spectrum = torch.fft.fftshift(torch.fft.fft2(x.float()), dim=(-2, -1))  # (N, C, H, W) complex, DC at centre
    amplitude, phase = spectrum.abs(), spectrum.angle()
    amplitude[..., h0:h1, w0:w1] = amplitude[ref : ref + 1, :, h0:h1, w0:w1].clone()  # broadcast over the batch
    spectrum = torch.fft.ifftshift(torch.polar(amplitude, phase), dim=(-2, -1))
    return torch.fft.ifft2(spectrum).real.to(x.dtype)  # the imaginary part is round-off (symmetric window)


def _stats(values: Sequence[float], like: torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(values, dtype=torch.float32, device=like.device).view(1, -1, 1, 1)  # (1, C, 1, 1)


def unnormalize(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Invert ``Normalize``: ``(N, C, H, W)`` normalised images to [0, 1] pixel values (float32)."""
    return x.float() * _stats(std, x) + _stats(mean, x)


def normalize(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Apply ``Normalize`` to ``(N, C, H, W)`` [0, 1] pixel values."""
    return (x - _stats(mean, x)) / _stats(std, x)


class _Draws:
    """Random draws from a seeded CPU generator, or from torch's global RNG (seeded by the run) without one."""

    def __init__(self, seed: int | None) -> None:
        self.generator = torch.Generator().manual_seed(int(seed)) if seed is not None else None

    def uniform(self, low: float, high: float) -> float:
        return low + (high - low) * torch.rand((), generator=self.generator).item()

    def index(self, n: int) -> int:
        return int(torch.randint(n, (), generator=self.generator).item())

    def bernoulli(self, p: float) -> bool:
        if p >= 1.0 or p <= 0.0:  # no draw: p=1 and p=0 runs consume the same stream
            return p >= 1.0
        return torch.rand((), generator=self.generator).item() < p


def _check_probability(key: str, p: float) -> None:
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"{key}={p} must be a probability in [0, 1]")


class BatchStylesStandardization:
    """BSS with a random ratio and reference per call (``augment.bss`` in the config).

    Args:
        r_min: smallest window area ratio, in (0, 1] (default 0.01 unless ``beta_*`` is given).
        r_max: largest window area ratio, in [r_min, 1] (default 0.1 unless ``beta_*`` is given).
        p: probability of using BSS at a step (supervised: adding the standardised copy; SSL: per view column).
        beta_min: FDA parameterisation of ``r_min`` (``r = (2 beta)^2``, beta in (0, 0.5]); excludes ``r_*``.
        beta_max: FDA parameterisation of ``r_max``.
        seed: seed of a private generator for reproducible draws; ``None`` uses torch's global RNG.
    """

    def __init__(
        self,
        r_min: float | None = None,
        r_max: float | None = None,
        p: float = 1.0,
        beta_min: float | None = None,
        beta_max: float | None = None,
        seed: int | None = None,
    ) -> None:
        if beta_min is not None or beta_max is not None:
            if r_min is not None or r_max is not None:
                raise ValueError("set either augment.bss.r_min/r_max or augment.bss.beta_min/beta_max, not both")
            for key, beta in (("beta_min", beta_min), ("beta_max", beta_max)):
                if beta is None or not 0.0 < beta <= 0.5:
                    raise ValueError(f"augment.bss.{key}={beta} must be in (0, 0.5] (r = (2 beta)^2)")
            r_min, r_max = beta_to_ratio(beta_min), beta_to_ratio(beta_max)
        r_min = 0.01 if r_min is None else float(r_min)
        r_max = 0.1 if r_max is None else float(r_max)
        for key, r in (("r_min", r_min), ("r_max", r_max)):
            if not 0.0 < r <= 1.0:
                raise ValueError(f"augment.bss.{key}={r} must be an area ratio in (0, 1]")
        if r_min > r_max:
            raise ValueError(f"augment.bss.r_min={r_min} is larger than augment.bss.r_max={r_max}")
        _check_probability("augment.bss.p", p)
        self.r_min, self.r_max, self.p = r_min, r_max, float(p)
        self._draws = _Draws(seed)

    def __repr__(self) -> str:
        return f"BatchStylesStandardization(r_min={self.r_min}, r_max={self.r_max}, p={self.p})"

    def should_apply(self) -> bool:
        """One Bernoulli(``p``) draw: whether to use BSS now."""
        return self._draws.bernoulli(self.p)

    def standardize(self, x: torch.Tensor) -> torch.Tensor:
        """BSS of a batch of [0, 1] images ``(N, C, H, W)`` with a fresh ratio and reference, clamped to [0, 1]."""
        if len(x) < 2:
            warnings.warn("BSS on a batch of 1 image is the identity (no other style to take)", stacklevel=2)
            return x
        ratio = self._draws.uniform(self.r_min, self.r_max)
        ref = self._draws.index(len(x))
        return standardize_styles(x, ratio, ref).clamp_(0.0, 1.0)

    def __call__(self, x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
        """BSS of a normalised batch ``(N, C, H, W)``: un-normalise, standardise, clamp, re-normalise."""
        return normalize(self.standardize(unnormalize(x, mean, std)), mean, std).to(x.dtype)


class BatchColorJitter:
    """Colour jitter with one random draw shared by the whole batch (the paper's batch-wise jitter).

    Factors follow torchvision's ``ColorJitter``: brightness, contrast and saturation factors are drawn from
    ``[max(0, 1 - s), 1 + s]``, the hue shift from ``[-h, h]``, and the four are applied in a random order.

    Args:
        brightness: strength ``s`` of the brightness jitter (0: off).
        contrast: strength of the contrast jitter.
        saturation: strength of the saturation jitter (RGB only).
        hue: largest hue shift, in [0, 0.5] (RGB only).
        p: probability of jittering a batch at all.
        seed: seed of a private generator; ``None`` uses torch's global RNG.
    """

    def __init__(
        self,
        brightness: float = 0.4,
        contrast: float = 0.4,
        saturation: float = 0.4,
        hue: float = 0.1,
        p: float = 0.8,
        seed: int | None = None,
    ) -> None:
        for key, value in (("brightness", brightness), ("contrast", contrast), ("saturation", saturation)):
            if value < 0:
                raise ValueError(f"color_jitter {key}={value} must be >= 0")
        if not 0.0 <= hue <= 0.5:
            raise ValueError(f"color_jitter hue={hue} must be in [0, 0.5]")
        _check_probability("color_jitter_p", p)
        self.strengths = {"brightness": brightness, "contrast": contrast, "saturation": saturation, "hue": hue}
        self.p = float(p)
        self._draws = _Draws(seed)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Jitter [0, 1] images ``(N, C, H, W)`` with one draw; the result stays in [0, 1]."""
        if not self._draws.bernoulli(self.p):
            return x
        ops = {
            "brightness": TF.adjust_brightness,
            "contrast": TF.adjust_contrast,
            "saturation": TF.adjust_saturation,
            "hue": TF.adjust_hue,
        }
        order = list(ops)
        random.Random(self._draws.index(2**31)).shuffle(order)
        for name in order:
            s = self.strengths[name]
            if s == 0 or (name in ("saturation", "hue") and x.shape[1] != 3):
                continue
            factor = self._draws.uniform(-s, s) if name == "hue" else self._draws.uniform(max(0.0, 1 - s), 1 + s)
            x = ops[name](x, factor)
        return x.clamp(0.0, 1.0)
