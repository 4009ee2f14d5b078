"""Feature-map metrics (REFERENCE §5): statistics, spectra and entropies of B×C×H×W maps.

``feature_metrics(fmap, definition)`` returns floats under :data:`KEYS`.

``definition="legacy"`` reproduces the original projects' ``noise_metrics.py`` applied to the
whole tensor:

* mean, unbiased std, skewness and kurtosis (as scipy.stats computes them: Fisher, bias=True),
  IQR (q75 − q25) of the flattened tensor;
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

import math
import warnings

import numpy as np
import pandas as pd
import pywt
import torch
from torch import Tensor

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


def _moments(flat: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Skewness and excess kurtosis (biased: the central moments m3 / m2^1.5 and
    m4 / m2² − 3, as ``scipy.stats.skew`` and ``kurtosis`` with ``bias=True``) of each row of
    G×M, 0 for a constant row. (numpy, not scipy.stats: its import is a fifth of an analysis
    job's.)"""
    deviations = flat - flat.mean(axis=1, keepdims=True)
    squares = deviations * deviations
    m2 = squares.mean(axis=1)
    constant = np.ptp(flat, axis=1) == 0 if flat.shape[1] > 1 else np.ones(len(flat), bool)
    constant |= m2 == 0  # deviations so small that their squares underflow
    skew = np.zeros(len(flat))
    kurt = np.zeros(len(flat))
    varying = ~constant
    if varying.any():
        m2 = m2[varying]
        skew[varying] = (squares[varying] * deviations[varying]).mean(axis=1) / m2**1.5
        kurt[varying] = (squares[varying] ** 2).mean(axis=1) / m2**2 - 3.0
    return skew, kurt


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


def _spectral_entropy(power: Tensor) -> Tensor:
    """Legacy form −Σ p·ln(p + 1e-10), p = P / (ΣP + 1e-10), per map (…×H×W)."""
    p = power / (power.sum(dim=(-2, -1), keepdim=True) + 1e-10)
    return -(p * torch.log(p + 1e-10)).sum(dim=(-2, -1))


def _radial_mask(h: int, w: int) -> Tensor:
    fy = torch.fft.fftshift(torch.fft.fftfreq(h, dtype=torch.float64))
    fx = torch.fft.fftshift(torch.fft.fftfreq(w, dtype=torch.float64))
    return torch.sqrt(fy[:, None] ** 2 + fx[None, :] ** 2) > HF_CUTOFF


#: the 3-tap kernel of torchvision's ``GaussianBlur(3, sigma=1)``, exp(−x²/2) at x = ±1 and 0,
#: normalised: its side and centre weights
_BLUR_SIDE = math.exp(-0.5) / (1.0 + 2.0 * math.exp(-0.5))
_BLUR_CENTRE = 1.0 / (1.0 + 2.0 * math.exp(-0.5))


def _blur_residual(x: Tensor) -> Tensor:
    """x − GaussianBlur(kernel 3, σ=1)(x) over the last two modes (0 where a mode has size 1).

    torchvision's ``GaussianBlur(3, sigma=1)`` (reflect padding: d c b | a b c d | c b a),
    one mode after the other; computed here rather than imported (torchvision's import, or
    scipy.ndimage's, would add to every analysis job).
    """
    if min(x.shape[-2:]) < 2:
        return torch.zeros_like(x)
    blurred = x
    for dim in (x.ndim - 2, x.ndim - 1):
        n = x.shape[dim]
        mirrored = torch.cat([torch.tensor([1]), torch.arange(n), torch.tensor([n - 2])])
        padded = blurred.index_select(dim, mirrored)
        blurred = (
            _BLUR_SIDE * padded.narrow(dim, 0, n)
            + _BLUR_CENTRE * padded.narrow(dim, 1, n)
            + _BLUR_SIDE * padded.narrow(dim, 2, n)
        )
    return x - blurred


def _entropy(rows: Tensor, legacy: bool) -> Tensor:
    """Total entropy of each row of a 2-D tensor: x − min normalised to sum 1 (0 for a constant
    row); legacy −Σ p·ln(p + 1e-10), corrected −Σ p·ln p with 0·ln 0 = 0."""
    shifted = rows - rows.min(dim=1, keepdim=True).values
    total = shifted.sum(dim=1, keepdim=True)
    p = torch.where(total > 0, shifted / total.clamp_min(1e-300), torch.zeros_like(shifted))
    if legacy:
        ent = -(p * torch.log(p + 1e-10)).sum(dim=1)
    else:
        ent = -torch.special.xlogy(p, p).sum(dim=1)
    return torch.where(total[:, 0] > 0, ent, torch.zeros_like(ent))


def _check(fmap: Tensor, definition: str) -> Tensor:
    if definition not in DEFINITIONS:
        raise KdbenchError(f"unknown metric definition {definition!r} (known: corrected, legacy)")
    if fmap.ndim != 4:
        raise KdbenchError(f"feature_metrics needs a B×C×H×W tensor, got shape {tuple(fmap.shape)}")
    x = fmap.detach().to("cpu", torch.float64)
    if not torch.isfinite(x).all():
        raise KdbenchError("feature map has non-finite values")
    return x


def _grouped(y: Tensor, legacy: bool) -> dict[str, np.ndarray]:
    """The metrics of each group of a G×B×K×H×W tensor (a group: B samples of K channels)."""
    g, b, _, h, w = y.shape
    flat = y.reshape(g, -1)
    mean = flat.mean(dim=1)
    std = flat.std(dim=1) if flat.shape[1] > 1 else torch.zeros(g, dtype=flat.dtype)
    q75, q25 = np.quantile(flat.numpy(), [0.75, 0.25], axis=1)
    skewness, kurtosis = _moments(flat.numpy())
    spectral = y[:, :1] if legacy else y  # the original looked at sample 0 only
    power = torch.fft.fft2(spectral).abs() ** 2
    out: dict[str, np.ndarray] = {
        "mean": mean.numpy(),
        "std": std.numpy(),
        "skewness": skewness,
        "kurtosis": kurtosis,
        "iqr": q75 - q25,
        "wavelet_hf_energy": _wavelet_hf(spectral.numpy()).reshape(g, -1).mean(axis=1),
        "freq_entropy": _spectral_entropy(power).reshape(g, -1).mean(dim=1).numpy(),
    }
    residual = _blur_residual(y)
    mean_np, std_np = out["mean"], out["std"]
    if legacy:
        out["lowpass_residual"] = torch.linalg.vector_norm(residual.reshape(g, -1), dim=1).numpy()
        out["cv"] = mean_np / (np.abs(std_np) + 1e-10)
        hf = power[..., h // 2 :, w // 2 :].sum(dim=(-2, -1))
        out["hf_power"] = hf.reshape(g, -1).mean(dim=1).numpy()
        out["total_entropy"] = _entropy(flat, legacy=True).numpy()
    else:
        energy = (y**2).reshape(g, b, -1).sum(dim=2)
        res = (residual**2).reshape(g, b, -1).sum(dim=2)
        ratio = torch.where(energy > 0, res / energy.clamp_min(1e-300), torch.zeros_like(res))
        out["lowpass_residual"] = ratio.mean(dim=1).numpy()
        with np.errstate(divide="ignore", invalid="ignore"):
            cv = std_np / np.maximum(np.abs(mean_np), 1e-12)
        out["cv"] = np.where(std_np == 0, 0.0, cv)
        centred = torch.fft.fftshift(power, dim=(-2, -1))
        hf = (centred * _radial_mask(h, w)).sum(dim=(-2, -1))
        out["hf_power"] = hf.reshape(g, -1).mean(dim=1).numpy()
        out["total_entropy"] = _entropy(y.reshape(g * b, -1), legacy=False).reshape(g, b)
        out["total_entropy"] = out["total_entropy"].mean(dim=1).numpy()
    return {key: out[key] for key in KEYS}


def feature_metrics(fmap: Tensor, definition: str = "corrected") -> dict[str, float]:
    """The metrics of :data:`KEYS` for a B×C×H×W feature map (see the module docstring)."""
    x = _check(fmap, definition)
    values = _grouped(x.unsqueeze(0), definition == "legacy")
    return {key: float(v[0]) for key, v in values.items()}


def per_channel_metrics(fmap: Tensor, definition: str = "corrected") -> pd.DataFrame:
    """A tidy table (channel, metric, value): :func:`feature_metrics` of each channel alone,
    computed for all channels at once."""
    x = _check(fmap, definition)
    values = _grouped(x.transpose(0, 1).unsqueeze(2), definition == "legacy")
    c = x.shape[1]
    return pd.DataFrame(
        {
            "channel": np.tile(np.arange(c), len(KEYS)),
            "metric": np.repeat(list(KEYS), c),
            "value": np.concatenate([values[k] for k in KEYS]).astype(np.float64),
        }
    ).sort_values(["channel"], kind="stable", ignore_index=True)
