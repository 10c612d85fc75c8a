"""Batch Styles Standardization: the Fourier operation against numpy, its parameters, the supervised option."""

import math

import numpy as np
import pytest
import torch

from dgkit.backbones import SmallCNN
from dgkit.data.style import BatchStylesStandardization, beta_to_ratio, standardize_styles, window_bounds
from dgkit.identity import hparams_id
from dgkit.methods.erm import ERM
from dgkit.run import train
from dgkit.utils.io import read_jsonl


def _centred_spectrum(x: np.ndarray) -> np.ndarray:
    return np.fft.fftshift(np.fft.fft2(x.astype(np.float64)), axes=(-2, -1))  # (N, C, H, W) complex


def _window_mask(h: int, w: int, ratio: float) -> np.ndarray:
    """Independent reconstruction: the bins within floor(side * sqrt(r) / 2) of the DC bin on both axes."""
    rows = np.abs(np.arange(h) - h // 2) <= math.floor(h * math.sqrt(ratio) / 2)
    cols = np.abs(np.arange(w) - w // 2) <= math.floor(w * math.sqrt(ratio) / 2)
    return rows[:, None] & cols[None, :]  # (H, W)


@pytest.mark.parametrize(
    "shape, ratio, ref", [((6, 3, 16, 16), 0.05, 2), ((4, 3, 15, 20), 0.2, 0), ((3, 1, 32, 32), 1.0, 1)]
)
def test_every_image_takes_the_reference_amplitude_and_keeps_its_phase(shape, ratio, ref):
    x = torch.rand(shape, generator=torch.Generator().manual_seed(0))
    out = standardize_styles(x, ratio, ref).numpy()
    before, after = _centred_spectrum(x.numpy()), _centred_spectrum(out)
    inside = _window_mask(shape[2], shape[3], ratio)
    assert inside.sum() > 1
    amp_before, amp_after = np.abs(before), np.abs(after)
    for i in range(shape[0]):
        np.testing.assert_allclose(amp_after[i][:, inside], amp_before[ref][:, inside], atol=1e-4, rtol=1e-4)
        np.testing.assert_allclose(amp_after[i][:, ~inside], amp_before[i][:, ~inside], atol=1e-4, rtol=1e-4)
        # phase of image i everywhere its new and old amplitudes are not ~0 (compare on the unit circle)
        valid = (amp_after[i] > 1e-3) & (amp_before[i] > 1e-3)
        diff = np.abs(np.exp(1j * np.angle(after[i][valid])) - np.exp(1j * np.angle(before[i][valid])))
        assert diff.max() < 1e-3


def test_window_is_centred_and_symmetric():
    assert window_bounds(32, 0.01) == (15, 18)  # b = floor(32 * 0.1 / 2) = 1
    assert window_bounds(32, 1.0) == (0, 32) and window_bounds(15, 1.0) == (0, 15)
    assert window_bounds(32, 0.0) == (16, 16)


def test_zero_ratio_is_identity():
    x = torch.rand(4, 3, 16, 16)
    assert torch.equal(standardize_styles(x, 0.0, 1), x)


@pytest.mark.parametrize("beta", [0.01, 0.05, 0.1, 0.25, 0.5])
@pytest.mark.parametrize("size", [16, 20, 32, 33])
def test_beta_gives_fda_window(beta, size):
    assert beta_to_ratio(beta) == pytest.approx((2 * beta) ** 2)
    b = math.floor(size * beta)  # FDA (Yang & Soatto): rows [c - b, c + b]
    c = size // 2
    assert window_bounds(size, beta_to_ratio(beta)) == (max(0, c - b), min(size, c + b + 1))


def test_beta_parameterisation_sets_ratios():
    bss = BatchStylesStandardization(beta_min=0.05, beta_max=0.1)
    assert bss.r_min == pytest.approx(0.01) and bss.r_max == pytest.approx(0.04)


def test_normalised_batch_stays_in_range():
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    m, s = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
    pixels = torch.rand(8, 3, 16, 16) ** 3  # dark images, so a bright reference pushes values past 1
    pixels[0] = 1 - pixels[0]
    out = BatchStylesStandardization(r_min=0.5, r_max=1.0, seed=0)((pixels - m) / s, mean, std)
    back = out * s + m
    assert back.min() >= -1e-5 and back.max() <= 1 + 1e-5
    assert not torch.allclose(back, pixels, atol=1e-3)


def test_batch_of_one_warns_and_is_identity():
    x = torch.rand(1, 3, 8, 8)
    with pytest.warns(UserWarning, match="batch of 1"):
        out = BatchStylesStandardization(seed=0).standardize(x)
    assert torch.equal(out, x)


def test_seed_makes_draws_reproducible():
    x = torch.rand(6, 3, 16, 16)
    a = BatchStylesStandardization(r_min=0.01, r_max=0.3, seed=3)
    b = BatchStylesStandardization(r_min=0.01, r_max=0.3, seed=3)
    outs_a = [a.standardize(x) for _ in range(3)]
    outs_b = [b.standardize(x) for _ in range(3)]
    assert all(torch.equal(u, v) for u, v in zip(outs_a, outs_b))
    assert not torch.equal(outs_a[0], outs_a[1])  # fresh ratio and reference per call


@pytest.mark.parametrize(
    "kwargs, key",
    [
        ({"r_min": 0.0}, "augment.bss.r_min"),
        ({"r_max": 1.5}, "augment.bss.r_max"),
        ({"r_min": 0.2, "r_max": 0.1}, "augment.bss.r_min"),
        ({"p": 1.2}, "augment.bss.p"),
        ({"p": -0.1}, "augment.bss.p"),
        ({"beta_min": 0.0, "beta_max": 0.1}, "augment.bss.beta_min"),
        ({"beta_min": 0.1, "beta_max": 0.7}, "augment.bss.beta_max"),
        ({"r_min": 0.1, "beta_max": 0.1}, "not both"),
    ],
)
def test_bad_parameters_name_the_key(kwargs, key):
    with pytest.raises(ValueError, match=key):
        BatchStylesStandardization(**kwargs)


def _erm() -> ERM:
    return ERM(SmallCNN(widths=(8, 8, 8, 8), img_size=16), 3, ["a", "b", "c"], ["c"])


def test_supervised_copy_doubles_the_batch_with_bss_of_it():
    method = _erm()
    method.bss = BatchStylesStandardization(r_min=0.05, r_max=0.3, p=1.0, seed=7)
    x, y, d = torch.randn(10, 3, 16, 16).clamp(-1, 1), torch.arange(10) % 3, torch.arange(10) % 2
    x2, y2, d2 = method.with_bss_copy(x, y, d)
    assert x2.shape == (20, 3, 16, 16) and torch.equal(y2, torch.cat([y, y])) and torch.equal(d2, torch.cat([d, d]))
    assert torch.equal(x2[:10], x)
    cfg = method.backbone.data_config
    expected = BatchStylesStandardization(r_min=0.05, r_max=0.3, p=1.0, seed=7)(x, cfg.mean, cfg.std)
    torch.testing.assert_close(x2[10:], expected)
    assert not torch.allclose(x2[10:], x, atol=1e-3)


def test_supervised_copy_off_without_bss_or_with_p_zero():
    method = _erm()
    x, y = torch.randn(4, 3, 16, 16), torch.arange(4) % 3
    assert method.with_bss_copy(x, y)[0] is x
    method.bss = BatchStylesStandardization(p=0.0)
    assert method.with_bss_copy(x, y)[0] is x


def test_method_that_ignores_bss_is_reported():
    class Ignores(ERM):
        def training_losses(self, batch):
            x, y = self.concat(batch)
            return {"loss": torch.nn.functional.cross_entropy(self(x), y)}

    method = Ignores(SmallCNN(widths=(8, 8, 8, 8), img_size=16), 3, ["a", "b", "c"], ["c"])
    method.bss = BatchStylesStandardization()
    batch = {"a": (torch.randn(4, 3, 16, 16), torch.arange(4) % 3)}
    with pytest.raises(RuntimeError, match="with_bss_copy"):
        method.training_step(batch, 0)


def test_erm_with_bss_trains_end_to_end(tiny_cfg, tmp_path):
    cfg = tiny_cfg("+augment=bss", "augment.bss.p=0.5", "backbone=small_cnn")
    train(cfg)
    assert [r["step"] for r in read_jsonl(tmp_path / "run" / "results.jsonl")] == [2, 4]
    assert hparams_id(cfg) != hparams_id(tiny_cfg("backbone=small_cnn"))
    assert hparams_id(tiny_cfg("+augment=bss", "augment.bss.p=0")) == hparams_id(tiny_cfg())  # off = absent
