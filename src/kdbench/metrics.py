"""Feature-map metrics (REFERENCE §5): statistics, spectra and entropies of B×C×H×W maps.

``feature_metrics(fmap, definition)`` returns floats under :data:`KEYS`.

``definition="legacy"`` reproduces the original projects' ``noise_metrics.py`` applied to the
whole tensor:

* mean, unbiased std, skewness and kurtosis (scipy.stats, Fisher, bias=True), IQR (q75 − q25)
  of the flattened tensor;
* wavelet high-frequency energy: per channel of **sample 0**, the sum of squares of every
  detail band of ``pywt.wavedec2(map, 'db1', level=2)``, then the mean over channels;
* frequency entropy: per channel of sample 0, P = |fft2|², p = P/(ΣP + 1e-10),
  −Σ p·ln(p + 1e-10), then the mean over channels;
* high-frequency power: per channel of sample 0, the sum of |fft2|² over the
  ``[H/2:, W/2:]`` quadrant of the *unshifted* spectrum, then the mean;
* low-pass residual: ‖x − GaussianBlur(3, σ=1)(x)‖₂ over the whole tensor;
* "cv": mean / (|std| + 1e-10), inverted as in the original;
* total entropy: x − min, normalised to sum 1, −Σ p·ln(p + 1e-10).

``definition="corrected"`` (the default) fixes them:

* cv = std / |mean|;
* the spectral metrics use every sample, not only sample 0;
* high-frequency power: the spectrum is centred (fftshift) and a radial mask keeps the
  frequencies above half the Nyquist frequency (radius > 0.25 cycles per pixel);
* low-pass residual: the residual energy ‖x − blur(x)‖² divided by the map's energy ‖x‖²,
  per sample, so that layers of different sizes compare;
* total entropy per sample (0·ln 0 = 0), then averaged.

Defined behaviour, in both definitions: skewness and kurtosis of a constant map are 0; cv is 0
when std is 0, and std / 1e-12 when the mean is 0; a zero-energy map has zero spectral entropy,
zero residual and zero total entropy. No metric returns NaN or inf for finite input. Spatial
modes of size 1 have no blur residual (0).
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import pandas as pd
import pywt
import scipy.stats
import torch
from torch import Tensor
from torchvision.transforms.functional import gaussian_blur

from kdbench.errors import KdbenchError

KEYS = (
    "mean",
    "std",
    "skewness",
    "kurtosis",
    "iqr",
    "wavelet_hf_energy",
    "freq_entropy",
    "lowpass_residual",
    "cv",
    "hf_power",
    "total_entropy",
)
DEFINITIONS = ("corrected", "legacy")
#: radial cut-off of the corrected high-frequency power, in cycles per pixel (Nyquist = 0.5)
HF_CUTOFF = 0.25


def _moments(flat: np.ndarray) -> tuple[float, float]:
    """Skewness and excess kurtosis (biased), 0 for a constant map."""
    if flat.size < 2 or np.ptp(flat) == 0:
        return 0.0, 0.0
    return (
        float(scipy.stats.skew(flat, bias=True)),
        float(scipy.stats.kurtosis(flat, fisher=True, bias=True)),
    )


def _wavelet_hf(maps: np.ndarray) -> np.ndarray:
    """Sum of squares of every detail band of db1 level-2 wavedec2, per map (…×H×W)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # small maps: "level too high" boundary-effect warning
        coeffs = pywt.wavedec2(maps, "db1", level=2, axes=(-2, -1))
    energy = np.zeros(maps.shape[:-2])
    for detail in coeffs[1:]:
        for band in detail:
            energy += (band.astype(np.float64) ** 2).sum(axis=(-2, -1))
    return energy


def _power(maps: Tensor) -> Tensor:
    return torch.fft.fft2(maps.double()).abs() ** 2


def _spectral_entropy(power: Tensor) -> Tensor:
    """Legacy form −Σ p·ln(p + 1e-10), p = P / (ΣP + 1e-10), per map (…×H×W)."""
    p = power / (power.sum(dim=(-2, -1), keepdim=True) + 1e-10)
    return -(p * torch.log(p + 1e-10)).sum(dim=(-2, -1))


def _radial_mask(h: int, w: int) -> Tensor:
    fy = torch.fft.fftshift(torch.fft.fftfreq(h, dtype=torch.float64))
    fx = torch.fft.fftshift(torch.fft.fftfreq(w, dtype=torch.float64))
    return torch.sqrt(fy[:, None] ** 2 + fx[None, :] ** 2) > HF_CUTOFF


def _blur_residual(x: Tensor) -> Tensor:
    """x − GaussianBlur(kernel 3, σ=1)(x) over the last two modes (0 where a mode has size 1)."""
    if min(x.shape[-2:]) < 2:
        return torch.zeros_like(x)
    return x - gaussian_blur(x, kernel_size=[3, 3], sigma=[1.0, 1.0])


def _entropy(flat: Tensor, legacy: bool) -> float:
    shifted = flat - flat.min()
    total = shifted.sum()
    if total == 0:
        return 0.0
    p = shifted / total
    if legacy:
        return float(-(p * torch.log(p + 1e-10)).sum())
    return float(-torch.special.xlogy(p, p).sum())


def feature_metrics(fmap: Tensor, definition: str = "corrected") -> dict[str, float]:
    """The metrics of :data:`KEYS` for a B×C×H×W feature map (see the module docstring)."""
    if definition not in DEFINITIONS:
        raise KdbenchError(f"unknown metric definition {definition!r} (known: corrected, legacy)")
    if fmap.ndim != 4:
        raise KdbenchError(f"feature_metrics needs a B×C×H×W tensor, got shape {tuple(fmap.shape)}")
    x = fmap.detach().to("cpu", torch.float64)
    if not torch.isfinite(x).all():
        raise KdbenchError("feature map has non-finite values")
    legacy = definition == "legacy"
    flat = x.flatten()
    mean = float(flat.mean())
    std = float(flat.std()) if flat.numel() > 1 else 0.0
    q75, q25 = torch.quantile(flat, torch.tensor([0.75, 0.25], dtype=torch.float64)).tolist()
    skewness, kurtosis = _moments(flat.numpy())
    spectral = x[:1] if legacy else x  # the original looked at sample 0 only
    power = _power(spectral)
    out: dict[str, float] = {
        "mean": mean,
        "std": std,
        "skewness": skewness,
        "kurtosis": kurtosis,
        "iqr": q75 - q25,
        "wavelet_hf_energy": float(_wavelet_hf(spectral.numpy()).mean()),
        "freq_entropy": float(_spectral_entropy(power).mean()),
    }
    residual = _blur_residual(x)
    if legacy:
        h, w = x.shape[-2:]
        out["lowpass_residual"] = float(torch.linalg.vector_norm(residual))
        out["cv"] = mean / (abs(std) + 1e-10)
        out["hf_power"] = float(power[..., h // 2 :, w // 2 :].sum(dim=(-2, -1)).mean())
        out["total_entropy"] = _entropy(flat, legacy=True)
    else:
        energy = (x**2).flatten(1).sum(1)
        res = (residual**2).flatten(1).sum(1)
        ratio = torch.where(energy > 0, res / energy.clamp_min(1e-300), torch.zeros_like(res))
        out["lowpass_residual"] = float(ratio.mean())
        out["cv"] = 0.0 if std == 0 else std / max(abs(mean), 1e-12)
        centred = torch.fft.fftshift(power, dim=(-2, -1))
        mask = _radial_mask(*x.shape[-2:])
        out["hf_power"] = float((centred * mask).sum(dim=(-2, -1)).mean())
        out["total_entropy"] = float(np.mean([_entropy(s, legacy=False) for s in x.flatten(1)]))
    return out


def per_channel_metrics(fmap: Tensor, definition: str = "corrected") -> pd.DataFrame:
    """A tidy table (channel, metric, value): :func:`feature_metrics` of each channel alone."""
    rows: list[dict[str, Any]] = []
    for c in range(fmap.shape[1]):
        for metric, value in feature_metrics(fmap[:, c : c + 1], definition).items():
            rows.append({"channel": c, "metric": metric, "value": value})
    return pd.DataFrame(rows, columns=["channel", "metric", "value"])
