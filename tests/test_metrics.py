import math

import numpy as np
import pytest
import scipy.ndimage
import torch

from kdbench import metrics
from kdbench.errors import KdbenchError

SMALL = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])  # 1×1×2×2


def test_legacy_values_worked_by_hand():
    m = metrics.feature_metrics(SMALL, "legacy")
    std = math.sqrt(5 / 3)  # unbiased
    assert m["mean"] == pytest.approx(2.5)
    assert m["std"] == pytest.approx(std)
    assert m["iqr"] == pytest.approx(3.25 - 1.75)  # linear interpolation of [1, 2, 3, 4]
    assert m["cv"] == pytest.approx(2.5 / std)  # the original's inverted "cv"
    assert m["skewness"] == pytest.approx(0.0, abs=1e-12)
    # deviations ±0.5, ±1.5: m2 = 1.25, m4 = 2.5625, excess kurtosis m4/m2² − 3 = -1.36
    assert m["kurtosis"] == pytest.approx(2.5625 / 1.25**2 - 3)
    # fft2 of [[1, 2], [3, 4]] is [[10, -2], [-4, 0]]: power 100, 4, 16, 0
    p = np.array([100, 4, 16, 0]) / 120
    assert m["freq_entropy"] == pytest.approx(-(p * np.log(p + 1e-10)).sum(), rel=1e-9)
    assert m["hf_power"] == pytest.approx(0.0)  # the unshifted [1:, 1:] quadrant holds F[1,1] = 0
    # Haar details of the 2×2 block: ((1+2)-(3+4))/2 = -2, ((1+3)-(2+4))/2 = -1, 0; level 2 adds 0
    assert m["wavelet_hf_energy"] == pytest.approx(4 + 1 + 0)
    q = np.array([0, 1, 2, 3]) / 6
    assert m["total_entropy"] == pytest.approx(-(q * np.log(q + 1e-10)).sum(), rel=1e-9)


def test_legacy_spectral_metrics_look_at_sample_zero_only():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(3, 2, 4, 4, generator=g)
    y = x.clone()
    y[1:] *= 10
    a, b = metrics.feature_metrics(x, "legacy"), metrics.feature_metrics(y, "legacy")
    for key in ("wavelet_hf_energy", "freq_entropy", "hf_power"):
        assert a[key] == pytest.approx(b[key])
    c, d = metrics.feature_metrics(x), metrics.feature_metrics(y)
    assert c["hf_power"] != pytest.approx(d["hf_power"])


def reference_blur(x):
    """GaussianBlur(3, σ=1) with reflect padding, by scipy (independent of torchvision)."""
    k = np.exp(-0.5 * np.array([-1.0, 0.0, 1.0]) ** 2)
    k /= k.sum()
    out = scipy.ndimage.correlate1d(x, k, axis=-1, mode="mirror")
    return scipy.ndimage.correlate1d(out, k, axis=-2, mode="mirror")


@pytest.mark.parametrize("shape", [(4, 3, 8, 8), (2, 5, 6, 7)])
def test_corrected_metrics_against_independent_numpy(shape):
    g = torch.Generator().manual_seed(1)
    t = torch.relu(torch.randn(*shape, generator=g)) + 0.01
    x = t.double().numpy()
    m = metrics.feature_metrics(t)
    flat = x.ravel()
    d = flat - flat.mean()
    m2, m3, m4 = (d**2).mean(), (d**3).mean(), (d**4).mean()
    assert m["mean"] == pytest.approx(flat.mean())
    assert m["std"] == pytest.approx(flat.std(ddof=1))
    assert m["skewness"] == pytest.approx(m3 / m2**1.5)
    assert m["kurtosis"] == pytest.approx(m4 / m2**2 - 3)
    assert m["iqr"] == pytest.approx(np.percentile(flat, 75) - np.percentile(flat, 25))
    assert m["cv"] == pytest.approx(flat.std(ddof=1) / abs(flat.mean()))
    power = np.abs(np.fft.fft2(x)) ** 2
    p = power / (power.sum(axis=(-2, -1), keepdims=True) + 1e-10)
    assert m["freq_entropy"] == pytest.approx((-(p * np.log(p + 1e-10)).sum(axis=(-2, -1))).mean())
    h, w = shape[-2:]
    fy, fx = np.meshgrid(np.fft.fftfreq(h), np.fft.fftfreq(w), indexing="ij")
    high = np.sqrt(fy**2 + fx**2) > 0.25  # in unshifted coordinates: same set of frequencies
    assert m["hf_power"] == pytest.approx((power * high).sum(axis=(-2, -1)).mean())
    res = ((x - reference_blur(x)) ** 2).reshape(shape[0], -1).sum(1)
    assert m["lowpass_residual"] == pytest.approx(
        (res / (x**2).reshape(shape[0], -1).sum(1)).mean()
    )
    ent = []
    for s in x.reshape(shape[0], -1):
        q = (s - s.min()) / (s - s.min()).sum()
        ent.append(-(q[q > 0] * np.log(q[q > 0])).sum())
    assert m["total_entropy"] == pytest.approx(np.mean(ent))
    import pywt

    energy = []
    for sample in x:
        for ch in sample:
            coeffs = pywt.wavedec2(ch, "db1", level=2)
            energy.append(sum((band**2).sum() for detail in coeffs[1:] for band in detail))
    assert m["wavelet_hf_energy"] == pytest.approx(np.mean(energy))


def test_legacy_lowpass_residual_matches_the_independent_blur():
    g = torch.Generator().manual_seed(2)
    t = torch.rand(2, 3, 5, 5, generator=g)
    x = t.double().numpy()
    m = metrics.feature_metrics(t, "legacy")
    assert m["lowpass_residual"] == pytest.approx(np.linalg.norm(x - reference_blur(x)), rel=1e-6)


@pytest.mark.parametrize("definition", ["corrected", "legacy"])
@pytest.mark.parametrize(
    "fmap",
    [
        torch.zeros(2, 3, 4, 4),
        torch.full((2, 3, 4, 4), 0.7),
        torch.zeros(2, 3, 4, 4).index_put_(
            (torch.tensor([0]), torch.tensor([1]), torch.tensor([2]), torch.tensor([3])),
            torch.tensor(5.0),
        ),
        torch.rand(3, 2, 1, 1),
    ],
    ids=["zero", "constant", "single-pixel", "1x1-maps"],
)
def test_degenerate_maps_give_defined_finite_values(fmap, definition):
    m = metrics.feature_metrics(fmap, definition)
    assert list(m) == list(metrics.KEYS)
    assert all(math.isfinite(v) for v in m.values()), m
    if fmap.std() == 0:
        assert m["skewness"] == m["kurtosis"] == 0.0 and m["std"] == 0.0 and m["iqr"] == 0.0
        assert m["total_entropy"] == 0.0
        if definition == "corrected":
            assert m["cv"] == 0.0 and m["lowpass_residual"] == 0.0


def test_constant_map_has_all_power_at_zero_frequency():
    m = metrics.feature_metrics(torch.full((2, 3, 4, 4), 0.7))
    assert m["hf_power"] == pytest.approx(0.0, abs=1e-20)
    assert m["freq_entropy"] == pytest.approx(0.0, abs=1e-6)
    assert m["lowpass_residual"] == pytest.approx(0.0, abs=1e-20)


@pytest.mark.parametrize("definition", ["corrected", "legacy"])
def test_per_channel_table_is_feature_metrics_of_each_channel(definition):
    g = torch.Generator().manual_seed(3)
    x = torch.relu(torch.randn(3, 4, 5, 6, generator=g))
    x[:, 2] = 0.0  # a dead channel among live ones
    x[:, 3] = 0.25  # a constant one
    table = metrics.per_channel_metrics(x, definition)
    assert list(table.columns) == ["channel", "metric", "value"]
    assert len(table) == 4 * len(metrics.KEYS)
    assert table.channel.tolist() == [c for c in range(4) for _ in metrics.KEYS]
    for c in range(4):
        one = metrics.feature_metrics(x[:, c : c + 1], definition)
        rows = table[table.channel == c]
        assert rows.metric.tolist() == list(metrics.KEYS)
        assert rows.value.to_numpy() == pytest.approx(list(one.values()), rel=1e-9, abs=1e-12)
    assert np.isfinite(table.value).all()


def test_bad_input():
    with pytest.raises(KdbenchError, match="unknown metric definition"):
        metrics.feature_metrics(SMALL, "new")
    with pytest.raises(KdbenchError, match="B×C×H×W"):
        metrics.feature_metrics(SMALL[0])
    with pytest.raises(KdbenchError, match="non-finite"):
        metrics.feature_metrics(SMALL * float("nan"))


@pytest.mark.parametrize("shape", [(2, 3, 5, 6), (1, 2, 2, 2), (3, 1, 8, 8)])
def test_blur_is_torchvision_gaussian_blur(shape):
    """The legacy residual uses torchvision's GaussianBlur(3, σ=1); kdbench gets it from scipy."""
    from torchvision.transforms.functional import gaussian_blur

    g = torch.Generator().manual_seed(4)
    x = torch.rand(*shape, generator=g, dtype=torch.float64)
    expected = torch.linalg.vector_norm(x - gaussian_blur(x, [3, 3], [1.0, 1.0]))
    m = metrics.feature_metrics(x, "legacy")
    assert m["lowpass_residual"] == pytest.approx(float(expected), rel=1e-12)
