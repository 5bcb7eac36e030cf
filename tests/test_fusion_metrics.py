"""Fusion metrics (common/fusion_metrics.py) against spec/metrics.md §9 checks 1-11 and independent references."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest

from common import fusion_metrics as fm
from common.fusion_metrics import FusionMetricConfig, FusionMetricWarning, evaluate_triplet


def random_image(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """Random 8-bit values held in float64."""
    return rng.integers(0, 256, (height, width)).astype(np.float64)


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(20240601)


# ---------------------------------------------------------------------------------------------- check 1-2


def test_entropy_closed_forms():
    assert fm.en(np.full((16, 16), 77.0)) == 0.0
    two_levels = np.zeros((8, 8))
    two_levels[:, :4] = 200.0
    assert fm.en(two_levels) == pytest.approx(1.0, abs=1e-12)
    every_level = np.arange(256, dtype=np.float64).reshape(16, 16)
    assert fm.en(every_level) == pytest.approx(8.0, abs=1e-12)


def test_sd_sf_ag_closed_forms():
    checkerboard = 255.0 * (np.indices((32, 32)).sum(axis=0) % 2)
    assert fm.sd(checkerboard) == pytest.approx(127.5, abs=1e-9)
    assert fm.sf(checkerboard) == pytest.approx(360.624458, abs=1e-6)
    rows, columns = np.indices((64, 64)).astype(np.float64)
    ramp = 2.0 * columns + rows
    assert fm.sf(ramp) == pytest.approx(2.236068, abs=1e-6)
    assert fm.ag(ramp) == pytest.approx(1.581139, abs=1e-6)
    assert fm.ag(ramp, norm="matlab") == pytest.approx(1.631732, abs=1e-6)


# ---------------------------------------------------------------------------------------------- check 3


def test_mutual_information_against_entropy_and_scikit_learn(rng):
    from sklearn.metrics import mutual_info_score

    a, b, fused = (random_image(rng, 64, 80) for _ in range(3))
    assert fm.mi(a, a, a) == pytest.approx(2.0 * fm.en(a), abs=1e-10)
    bits = fm.mi(fused, a, b)
    nats = fm.mi(fused, a, b, unit="nats")
    reference = (mutual_info_score(a.astype(int).ravel(), fused.astype(int).ravel())
                 + mutual_info_score(b.astype(int).ravel(), fused.astype(int).ravel()))
    assert nats == pytest.approx(reference, abs=1e-10)
    assert nats == pytest.approx(bits * math.log(2.0), abs=1e-10)


# ---------------------------------------------------------------------------------------------- check 4


def test_scd_and_cc_closed_forms(rng):
    a, b = random_image(rng, 40, 50), random_image(rng, 40, 50)
    assert fm.scd(a + b, a, b) == pytest.approx(2.0, abs=1e-12)
    assert fm.cc(a, a, a) == pytest.approx(1.0, abs=1e-12)
    assert fm.cc(a, a, 255.0 - a) == pytest.approx(0.0, abs=1e-12)
    with pytest.warns(FusionMetricWarning, match="constant"):
        assert math.isnan(fm.cc(b, np.full_like(a, 9.0), b))


# ---------------------------------------------------------------------------------------------- check 5


def test_vif_closed_forms_and_minimum_size(rng):
    a = random_image(rng, 128, 160)
    assert fm.vif(a, a, a) == pytest.approx(2.0, abs=1e-9)
    assert fm.vif(np.full_like(a, 128.0), a, random_image(rng, 128, 160)) == 0.0
    with pytest.warns(FusionMetricWarning, match="41"):
        assert math.isnan(fm.vif(*(random_image(rng, 40, 40) for _ in range(3))))
    assert math.isfinite(fm.vif(*(random_image(rng, 41, 41) for _ in range(3))))


def test_vif_constant_reference_is_nan_or_one_on_request(rng):
    fused, b = random_image(rng, 64, 64), random_image(rng, 64, 64)
    constant = np.full_like(fused, 50.0)
    with pytest.warns(FusionMetricWarning, match="constant reference"):
        assert math.isnan(fm.vif(fused, constant, b))
    assert fm.vif(fused, constant, b, nan_as_one=True) == pytest.approx(1.0 + fm.vifp(b, fused))


# ---------------------------------------------------------------------------------------------- check 6


def test_qabf_closed_forms(rng):
    even = 2.0 * rng.integers(0, 128, (48, 56))
    expected = 0.9994 * 0.9879 / (1.0 + math.exp(-4.4))
    assert expected == pytest.approx(0.9753328, abs=1e-7)
    assert fm.qabf(even, even, even) == pytest.approx(0.9753328, abs=1e-6)
    assert fm.qabf(even, even, even, strict_ratio=True) == pytest.approx(0.9747936, abs=1e-6)
    for _ in range(5):
        value = fm.qabf(*(random_image(rng, 30, 34) for _ in range(3)))
        assert 0.0 <= value <= 1.0
    with pytest.warns(FusionMetricWarning, match="no edges"):
        black = np.zeros((20, 20))  # zero padding gives any other constant image border edges
        assert math.isnan(fm.qabf(random_image(rng, 20, 20), black, black))


# ---------------------------------------------------------------------------------------------- check 7


def sobel8_magnitude_reference(image: np.ndarray) -> np.ndarray:
    """|gradient| with numpy 'reflect' padding and explicit 3x3 correlation (independent of scipy.ndimage)."""
    padded = np.pad(image, 1, mode="reflect")
    windows = np.lib.stride_tricks.sliding_window_view(padded, (3, 3))
    vertical_edges = np.array([[-1, 0, 1], [-2, 0, 2], [-1, 0, 1]]) / 8.0
    horizontal_edges = np.array([[-1, -2, -1], [0, 0, 0], [1, 2, 1]]) / 8.0
    g_v = np.einsum("ijkl,kl->ij", windows, vertical_edges)
    g_h = np.einsum("ijkl,kl->ij", windows, horizontal_edges)
    return np.sqrt(g_v ** 2 + g_h ** 2)


def test_nabf_closed_forms(rng):
    a = random_image(rng, 40, 48)
    a[:10, :10] = 100.0  # a flat patch: gradient 0 there, weight 0.001
    assert fm.nabf(a, a, a) == 0.0
    magnitude = sobel8_magnitude_reference(a)
    weights = np.where(magnitude >= 2.0, magnitude ** 1.5, 0.001)
    loss = 1.0 - math.sqrt((0.9999 / 2.0) * 0.9995 / (1.0 + math.exp(-11.0)))
    assert loss == pytest.approx(0.29311127, abs=1e-8)
    expected = loss * weights[magnitude > 0].sum() / weights.sum()
    assert fm.nabf(2.0 * a, a, a) == pytest.approx(expected, abs=1e-9)


# ---------------------------------------------------------------------------------------------- check 8 + references


def test_ssim_and_ms_ssim_identity_and_sizes(rng):
    a = random_image(rng, 192, 192)
    assert fm.ssim_fusion(a, a, a) == pytest.approx(2.0, abs=1e-12)
    assert fm.ssim_fusion(a, a, a, reduce="mean") == pytest.approx(1.0, abs=1e-12)
    assert fm.ms_ssim_fusion(a, a, a) == pytest.approx(2.0, abs=1e-12)
    with pytest.warns(FusionMetricWarning, match="160"):
        assert math.isnan(fm.ms_ssim_fusion(*(random_image(rng, 160, 200) for _ in range(3))))
    with pytest.warns(FusionMetricWarning, match="SSIM"):
        assert math.isnan(fm.ssim(random_image(rng, 10, 30), random_image(rng, 10, 30)))
    assert math.isfinite(fm.ssim(random_image(rng, 11, 11), random_image(rng, 11, 11)))


def test_ssim_wang_matches_scikit_image_gray_and_rgb(rng):
    from skimage.metrics import structural_similarity

    x, y = random_image(rng, 70, 90), random_image(rng, 70, 90)
    y = np.clip(0.6 * x + 0.4 * y, 0, 255)
    reference = structural_similarity(x, y, gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
                                      data_range=255)
    assert fm.ssim(x, y) == pytest.approx(reference, abs=1e-7)
    x_rgb = rng.integers(0, 256, (50, 60, 3)).astype(np.float64)
    y_rgb = np.clip(x_rgb + rng.normal(0, 20, x_rgb.shape), 0, 255)
    reference_rgb = structural_similarity(x_rgb, y_rgb, gaussian_weights=True, sigma=1.5,
                                          use_sample_covariance=False, data_range=255, channel_axis=-1)
    assert fm.ssim(x_rgb, y_rgb) == pytest.approx(reference_rgb, abs=1e-7)


def test_ssim_cddfuse_matches_scikit_image(rng):
    from skimage.metrics import structural_similarity

    x, y = random_image(rng, 41, 37), random_image(rng, 41, 37)
    y = np.clip(0.7 * x + 0.3 * y, 0, 255)
    assert fm.ssim(x, y, convention="cddfuse") == pytest.approx(structural_similarity(x, y, data_range=2.0),
                                                                abs=1e-7)


@pytest.mark.parametrize("shape", [(192, 192), (177, 203)])
def test_ms_ssim_matches_pytorch_msssim_float64(rng, shape):
    import torch
    from pytorch_msssim import ms_ssim as reference_ms_ssim

    x = random_image(rng, *shape)
    y = np.clip(x + rng.normal(0, 25, shape), 0, 255)
    reference = reference_ms_ssim(torch.from_numpy(x)[None, None], torch.from_numpy(y)[None, None],
                                  data_range=255, size_average=False).item()
    assert fm.ms_ssim(x, y) == pytest.approx(reference, abs=1e-6)


# ---------------------------------------------------------------------------------------------- check 9


def test_mse_and_psnr_closed_forms(rng):
    fused = rng.integers(10, 246, (30, 40)).astype(np.float64)
    shifted = fused + 10.0
    assert fm.mse_fusion(fused, shifted, shifted) == pytest.approx(100.0, abs=1e-9)
    assert fm.mse_fusion(fused, shifted, shifted, scale="unit") == pytest.approx(0.00153787, abs=1e-8)
    assert fm.psnr_fusion(fused, shifted, shifted) == pytest.approx(28.130804, abs=1e-6)
    assert fm.psnr_fusion(fused, shifted, shifted, convention="tang") == pytest.approx(76.261607, abs=1e-6)
    peak = fused.max()
    assert fm.psnr_fusion(fused, shifted, shifted, convention="cddfuse") == pytest.approx(
        10.0 * math.log10(peak ** 2 / 100.0), abs=1e-9)
    assert fm.psnr_fusion(fused, fused, fused) == math.inf


# ---------------------------------------------------------------------------------------------- check 10: FMI


SPEC_A = np.array([[0, 50, 100], [150, 200, 250], [25, 75, 125]], dtype=np.float64)
SPEC_B = np.array([[200, 10, 30], [90, 60, 240], [5, 180, 120]], dtype=np.float64)
SPEC_F = np.array([[100, 30, 65], [120, 130, 245], [15, 128, 122]], dtype=np.float64)


def fmi_window_reference(x: np.ndarray, f: np.ndarray) -> float:
    """One window's fmi written directly from spec/metrics.md §4.5 with the dense 9 x 9 joint (no shortcuts)."""
    if np.array_equal(x, f):
        return 1.0

    def distribution(window):
        values = window.flatten(order="F")
        low, high = values.min(), values.max()
        normalised = np.ones_like(values) if high == low else (values - low) / (high - low)
        return normalised / normalised.sum()

    p, q = distribution(x), distribution(f)
    size = p.size
    cumulative_p = np.concatenate([[0.0], np.cumsum(p)])
    cumulative_q = np.concatenate([[0.0], np.cumsum(q)])
    cross = np.sum((p - p.mean()) * (q - q.mean()))
    correlation = 0.0 if cross == 0 else cross / np.sqrt(np.sum((p - p.mean()) ** 2) * np.sum((q - q.mean()) ** 2))
    index = np.arange(1, size + 1)
    std_p = np.sqrt(max(np.sum(index ** 2 * p) - np.sum(index * p) ** 2, 0.0))
    std_q = np.sqrt(max(np.sum(index ** 2 * q) - np.sum(index * q) ** 2, 0.0))
    q_grid, p_grid = np.meshgrid(cumulative_q, cumulative_p, indexing="ij")
    bound = np.minimum(q_grid, p_grid) if correlation >= 0 else np.maximum(q_grid + p_grid - 1.0, 0.0)
    if correlation == 0 or std_p * std_q == 0:
        phi = 0.0
    else:
        phi = correlation * std_p * std_q / np.sum(bound[1:, 1:] - np.outer(cumulative_q[1:], cumulative_p[1:]))
    mass = bound[1:, 1:] - bound[:-1, 1:] - bound[1:, :-1] + bound[:-1, :-1]
    joint = phi * mass + (1.0 - phi) * np.outer(q, p)
    nonzero = joint != 0
    joint_entropy = -np.sum(joint[nonzero] * np.log2(np.abs(joint[nonzero])))
    entropy_p = -np.sum(p[p > 0] * np.log2(p[p > 0]))
    entropy_q = -np.sum(q[q > 0] * np.log2(q[q > 0]))
    information = entropy_p + entropy_q - joint_entropy
    return 0.0 if information == 0 else 2.0 * information / (entropy_p + entropy_q)


def fmi_reference(fused, a, b, window=3):
    height, width = fused.shape
    values = [0.5 * (fmi_window_reference(a[r:r + window, c:c + window], fused[r:r + window, c:c + window])
                     + fmi_window_reference(b[r:r + window, c:c + window], fused[r:r + window, c:c + window]))
              for r in range(height - window + 1) for c in range(width - window + 1)]
    return float(np.mean(values))


def test_fmi_spec_reference_triple():
    assert fm.fmi(SPEC_F, SPEC_A, SPEC_B) == pytest.approx(0.515313208920, abs=1e-9)
    assert fm.fmi(SPEC_F, SPEC_A, SPEC_A) == pytest.approx(0.490201505167, abs=1e-9)  # fmi_AF
    assert fm.fmi(SPEC_F, SPEC_B, SPEC_B) == pytest.approx(0.540424912673, abs=1e-9)  # fmi_BF
    # transposing turns column-major flattening into row-major: the spec's row-major value
    assert fm.fmi(SPEC_F.T, SPEC_A.T, SPEC_B.T) == pytest.approx(0.495461400078, abs=1e-9)
    assert fmi_reference(SPEC_F, SPEC_A, SPEC_B) == pytest.approx(0.515313208920, abs=1e-9)


def test_fmi_closed_forms(rng):
    a, b = random_image(rng, 24, 30), random_image(rng, 24, 30)
    assert fm.fmi(a, a, a) == pytest.approx(1.0, abs=1e-12)
    assert fm.fmi(a, a, a, feature="dct") == pytest.approx(1.0, abs=1e-12)
    assert abs(fm.fmi(np.full_like(a, 60.0), a, b)) < 1e-9
    with pytest.warns(FusionMetricWarning, match="FMI"):
        assert math.isnan(fm.fmi(a[:2], a[:2], b[:2]))


@pytest.mark.parametrize("window", [3, 4])
def test_fmi_vectorised_equals_dense_reference_on_hard_windows(rng, window):
    """Constant windows, equal windows, zero entries, negative and zero correlations, ties in the cumsums."""
    a, b = random_image(rng, 17, 19), random_image(rng, 17, 19)
    fused = np.rint(0.5 * (a + b))
    fused[:5, :5] = 7.0
    a[9:14, 9:14] = 3.0
    b[:4] = a[:4]
    fused[13:] = a[13:]
    fused[6:9] = rng.integers(0, 3, (3, 19))
    b[10:] = 255.0 - fused[10:]
    assert fm.fmi(fused, a, b, window=window) == pytest.approx(fmi_reference(fused, a, b, window), abs=1e-12)
    features = [fm.fmi_feature(image, "dct") for image in (fused, a, b)]
    assert fm.fmi(fused, a, b, feature="dct", window=window) == pytest.approx(
        fmi_reference(*features, window), abs=1e-12)


def test_fmi_is_identical_for_any_thread_count_and_chunking(rng, monkeypatch):
    a, b = random_image(rng, 60, 50), random_image(rng, 60, 50)
    fused = np.rint(0.3 * a + 0.7 * b)
    single = fm.fmi(fused, a, b)
    assert fm.fmi(fused, a, b, threads=2) == single
    monkeypatch.setattr(fm, "_FMI_CHUNK_WINDOWS", 100)  # many small chunks: same windows, other grouping
    assert fm.fmi(fused, a, b) == pytest.approx(single, abs=1e-13)
    assert fm.fmi(fused, a, b, threads=3) == fm.fmi(fused, a, b)


def test_fmi_wavelet_needs_pywavelets(rng):
    a = random_image(rng, 40, 40)
    try:
        import pywt  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="PyWavelets"):
            evaluate_triplet(a, a, a, metrics=["FMI_w"])
    else:
        assert evaluate_triplet(a, a, a, metrics=["FMI_w"])["FMI_w"] == pytest.approx(1.0, abs=1e-12)


# ---------------------------------------------------------------------------------------------- check 11 and API


def test_unit_range_inputs_warn(rng):
    unit = rng.random((20, 20))
    with pytest.warns(FusionMetricWarning, match=r"max <= 1"):
        fm.sd(unit)
    with pytest.warns(FusionMetricWarning, match=r"max <= 1"):
        evaluate_triplet(unit, unit, unit, metrics=["MSE"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fm.sd(unit * 255.0)


def test_evaluate_triplet_columns_and_conventions(rng):
    a = random_image(rng, 170, 180)
    b = np.clip(255.0 - a + rng.normal(0, 30, a.shape), 0, 255)
    fused = np.rint(0.5 * (a + b))
    default = evaluate_triplet(fused, a, b)
    assert tuple(default) == fm.METRIC_COLUMNS
    assert all(math.isfinite(value) for value in default.values())
    other = evaluate_triplet(fused, a, b, FusionMetricConfig(
        mi_unit="nats", ssim_reduce="mean", psnr_convention="tang", mse_scale="unit", ag_norm="matlab"))
    assert other["MI"] == pytest.approx(default["MI"] * math.log(2.0), rel=1e-12)
    assert other["SSIM"] == pytest.approx(default["SSIM"] / 2.0, rel=1e-12)
    assert other["MS_SSIM"] == pytest.approx(default["MS_SSIM"] / 2.0, rel=1e-12)
    assert other["PSNR"] == pytest.approx(default["PSNR"] + 20.0 * math.log10(255.0), rel=1e-12)
    assert other["MSE"] == pytest.approx(default["MSE"] / 255.0 ** 2, rel=1e-12)
    assert other["AG"] == pytest.approx(default["AG"] * 170 * 180 / (169 * 179), rel=1e-12)
    unchanged = ("EN", "SD", "SF", "FMI_pixel", "FMI_dct", "SCD", "VIF", "Qabf", "Nabf", "CC")
    assert all(other[name] == default[name] for name in unchanged)
    subset = evaluate_triplet(fused, a, b, metrics=["CC", "EN,MI"])
    assert list(subset) == ["EN", "MI", "CC"]
    with pytest.raises(ValueError, match="unknown fusion metric"):
        evaluate_triplet(fused, a, b, metrics=["PSNRX"])
    with pytest.raises(ValueError, match="shapes differ"):
        evaluate_triplet(fused, a[:-1], b)


def test_mean_row_skips_nan_and_counts_it():
    rows = {"a": {"CC": 0.5, "VIF": math.nan}, "b": {"CC": 0.7, "VIF": 0.9}, "c": {"CC": math.nan, "VIF": 0.3}}
    means, nan_counts = fm.summarize(rows, ["CC", "VIF"])
    assert means == {"CC": pytest.approx(0.6), "VIF": pytest.approx(0.6)}
    assert nan_counts == {"CC": 1, "VIF": 1}
    assert fm.format_value(math.nan) == "nan" and fm.format_value(math.inf) == "inf"
    assert fm.format_value(1.0 / 3.0) == "0.3333333333"
