"""analysis/feature_stats.py on maps whose statistics are known in closed form: constant maps, a
checkerboard, single Fourier modes, seeded Gaussian noise and a smooth bump; the statistics at a
smaller size, checked against pooling done by hand; our moments and half-spectrum entropy against
scipy and the full FFT; and the figures' arrays (histogram, log-power spectrum)."""
from __future__ import annotations

import dataclasses
import math
import warnings

import numpy as np
import pytest
import scipy.special
import scipy.stats
import torch

from analysis.feature_stats import LOWPASS_SIGMA, TapStatistics, histogram, mean_log_power, tap_statistics, tap_statistics_at

SPATIAL = ("wavelet_high_ratio", "spectral_entropy", "lowpass_residual_ratio")
EULER_GAMMA = 0.5772156649015329


def _checkerboard(size: int) -> np.ndarray:
    rows, columns = np.mgrid[0:size, 0:size]
    return np.where((rows + columns) % 2 == 0, 1.0, -1.0)


def _tap(single_map: np.ndarray, samples: int = 2, channels: int = 3) -> np.ndarray:
    return np.broadcast_to(single_map, (samples, channels, *single_map.shape)).copy()


@pytest.mark.parametrize("value", [0.1, 0.0])
def test_a_constant_map_has_no_spread_and_nan_for_every_shape_and_spatial_term_without_warnings(value: float) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = tap_statistics(np.full((3, 2, 8, 8), value))
    assert result.std == pytest.approx(0.0, abs=1e-12)
    assert result.cv == pytest.approx(0.0, abs=1e-12)
    assert result.iqr == 0.0
    assert math.isnan(result.skew) and math.isnan(result.excess_kurtosis)
    assert all(math.isnan(getattr(result, name)) for name in SPATIAL)


def test_constant_channels_get_the_nan_scipy_gives_even_where_rounding_hides_them_from_scipy() -> None:
    """scipy answers NaN (with a warning) when the values' spread is below its rounding threshold, but
    the mean of 100 copies of 0.1 rounds off enough to pass it: the module checks min == max itself."""
    with pytest.warns(RuntimeWarning, match="Precision loss"):
        assert math.isnan(scipy.stats.skew(np.full(1000, 0.1), bias=True))
        assert math.isnan(scipy.stats.kurtosis(np.full(1000, 0.1), fisher=True, bias=True))
        assert scipy.stats.skew(np.full(100, 0.1), bias=True) == pytest.approx(1.0)
    result = tap_statistics(np.full((100, 1), 0.1))
    assert math.isnan(result.skew) and math.isnan(result.excess_kurtosis)


def test_a_checkerboard_has_all_its_wavelet_energy_in_the_high_bands_and_a_two_point_distribution() -> None:
    result = tap_statistics(_tap(_checkerboard(8)))
    assert result.wavelet_high_ratio == pytest.approx(1.0, abs=1e-12)
    # Values +-1 in equal numbers: sigma 1, mean 0, no skew, excess kurtosis 1 - 3, quartiles -1 and 1.
    assert (result.std, result.skew, result.excess_kurtosis, result.iqr) == pytest.approx((1.0, 0.0, -2.0, 2.0), abs=1e-12)
    assert result.cv == pytest.approx(1.0 / 1e-8)


def test_spatial_terms_ignore_the_maps_offset() -> None:
    """The wavelet and low-pass ratios are taken on the mean-removed map, as the spectral entropy is."""
    rows, columns = np.mgrid[0:16, 0:16]
    bump = np.exp(-((rows - 7.5) ** 2 + (columns - 7.5) ** 2) / (2 * 3.0**2))
    for pattern in (_checkerboard(16), bump):
        plain, lifted = tap_statistics(_tap(pattern)), tap_statistics(_tap(pattern + 10.0))
        for name in SPATIAL:
            assert getattr(lifted, name) == pytest.approx(getattr(plain, name), abs=1e-9)
    assert tap_statistics(_tap(_checkerboard(16) + 10.0)).wavelet_high_ratio == pytest.approx(1.0, abs=1e-12)


def test_constant_channels_and_maps_are_skipped_by_the_averages() -> None:
    tap = np.stack([np.full((8, 8), 0.1), _checkerboard(8)])[None].repeat(2, axis=0)
    result = tap_statistics(tap)
    assert result.wavelet_high_ratio == pytest.approx(1.0, abs=1e-12)
    assert result.spectral_entropy == pytest.approx(0.0, abs=1e-12)
    assert (result.skew, result.excess_kurtosis) == pytest.approx((0.0, -2.0), abs=1e-12)
    assert result.std == pytest.approx(0.5, abs=1e-12)


def test_the_nyquist_mode_has_one_non_dc_frequency_bin_so_spectral_entropy_zero() -> None:
    columns = np.arange(16)
    result = tap_statistics(_tap(np.tile((-1.0) ** columns, (16, 1))))
    assert result.spectral_entropy == pytest.approx(0.0, abs=1e-12)


def test_a_real_cosine_splits_its_power_over_two_bins_so_spectral_entropy_is_ln2_over_ln_of_hw_minus_1() -> None:
    columns = np.arange(16)
    result = tap_statistics(_tap(np.tile(5.0 + np.cos(2 * np.pi * columns / 16), (16, 1))))
    assert result.spectral_entropy == pytest.approx(math.log(2) / math.log(16 * 16 - 1), abs=1e-12)


def test_gaussian_noise_has_its_sigma_no_skew_no_excess_kurtosis_and_the_normal_iqr() -> None:
    samples, channels, side, mean, sigma = 256, 4, 16, 3.0, 2.0
    noise = np.random.default_rng(7).normal(mean, sigma, size=(samples, channels, side, side))
    result = tap_statistics(noise)
    values_per_channel = samples * side * side
    assert abs(result.skew) < 4 * math.sqrt(6 / values_per_channel)
    assert abs(result.excess_kurtosis) < 4 * math.sqrt(24 / values_per_channel)
    assert result.std == pytest.approx(sigma, rel=0.01)
    assert result.cv == pytest.approx(sigma / mean, rel=0.01)
    assert result.iqr / sigma == pytest.approx(2 * scipy.stats.norm.ppf(0.75), rel=0.01)


def test_white_noise_spreads_its_spectrum_and_wavelet_energy_as_independent_values_do() -> None:
    side = 16
    result = tap_statistics(np.random.default_rng(8).normal(size=(128, 2, side, side)))
    # Normalised exponential powers over n bins have entropy about ln n - (1 - Euler's gamma).
    bins = side * side - 1
    assert result.spectral_entropy == pytest.approx(1 - (1 - EULER_GAMMA) / math.log(bins), abs=0.005)
    assert result.spectral_entropy > 0.9
    # An orthonormal transform of white noise gives each of the four bands a quarter of the energy;
    # the removed mean takes one value's worth out of the total.
    assert result.wavelet_high_ratio == pytest.approx(0.75 * side * side / bins, abs=0.005)


def test_a_wide_smooth_bump_leaves_far_less_low_pass_residual_than_white_noise() -> None:
    rows, columns = np.mgrid[0:32, 0:32]
    bump = np.exp(-((rows - 15.5) ** 2 + (columns - 15.5) ** 2) / (2 * 6.0**2))
    smooth = tap_statistics(_tap(bump))
    noisy = tap_statistics(np.random.default_rng(9).normal(size=(16, 2, 32, 32)))
    assert 0 < smooth.lowpass_residual_ratio < 0.01 * noisy.lowpass_residual_ratio
    assert noisy.lowpass_residual_ratio > 0.5
    assert smooth.lowpass_sigma == noisy.lowpass_sigma == LOWPASS_SIGMA == 1.0


@pytest.mark.parametrize("mode", [1, 4, 11])
def test_a_half_sample_cosine_keeps_the_blurs_frequency_response_as_its_low_pass_residual(mode: int) -> None:
    """cos(pi k (x + 1/2) / W) is even about both edges, so the 'reflect' blur scales it by the kernel's
    response at that frequency: scipy's sigma-1 kernel, exp(-j^2 / 2) for |j| <= 4 (truncate 4) scaled
    to sum 1. The residual is then (1 - response)^2 of the map's energy, and the mean is 0."""
    width = 16
    pattern = np.tile(np.cos(np.pi * mode * (np.arange(width) + 0.5) / width), (12, 1))
    offsets = np.arange(-4, 5)
    weights = np.exp(-(offsets**2) / 2)
    response = (weights * np.cos(np.pi * mode * offsets / width)).sum() / weights.sum()
    result = tap_statistics(_tap(pattern))
    assert result.lowpass_residual_ratio == pytest.approx((1 - response) ** 2, rel=1e-9)


def test_maps_too_small_for_a_term_give_nan_for_it_and_odd_sizes_are_measured() -> None:
    rng = np.random.default_rng(10)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        one_by_two = tap_statistics(rng.normal(size=(4, 2, 1, 2)))
    assert math.isnan(one_by_two.wavelet_high_ratio) and math.isnan(one_by_two.spectral_entropy)
    assert 0 < one_by_two.lowpass_residual_ratio
    assert 0 < tap_statistics(rng.normal(size=(4, 2, 1, 3))).spectral_entropy <= 1
    odd = tap_statistics(rng.normal(size=(4, 2, 5, 7)))
    assert all(0 < getattr(odd, name) < 1 for name in SPATIAL)


def test_float32_and_torch_inputs_are_measured_in_float64() -> None:
    maps32 = np.random.default_rng(11).normal(100.0, 0.01, size=(8, 3, 6, 6)).astype(np.float32)
    expected = tap_statistics(maps32.astype(np.float64))
    assert tap_statistics(maps32) == expected
    assert tap_statistics(torch.from_numpy(maps32)) == expected
    assert all(type(value) is float for value in dataclasses.astuple(expected))


def test_embeddings_get_the_distribution_statistics_over_samples_and_no_spatial_terms() -> None:
    embeddings = np.random.default_rng(12).exponential(size=(200, 3))
    result = tap_statistics(torch.from_numpy(embeddings))
    assert result.std == pytest.approx(embeddings.std(axis=0).mean(), abs=1e-12)
    assert result.skew == pytest.approx(scipy.stats.skew(embeddings, axis=0).mean(), abs=1e-12)
    assert result.excess_kurtosis == pytest.approx(scipy.stats.kurtosis(embeddings, axis=0).mean(), abs=1e-12)
    assert result.iqr == pytest.approx(scipy.stats.iqr(embeddings, axis=0).mean(), abs=1e-12)
    assert all(math.isnan(getattr(result, name)) for name in SPATIAL)


def test_shapes_other_than_maps_or_embeddings_are_refused() -> None:
    with pytest.raises(ValueError, match=r"\(N, C, H, W\) maps or \(N, D\) embeddings"):
        tap_statistics(np.zeros((2, 3, 4)))


def test_statistics_at_a_smaller_size_pool_by_2x2_means_and_match_one_size_at_a_time() -> None:
    """What the report compares a teacher's larger map at: its 2x2-mean pooled statistics, the same
    from one call for several sizes (one float64 conversion per channel)."""
    large = np.random.default_rng(14).normal(size=(5, 3, 16, 16))
    pooled_by_hand = large.reshape(5, 3, 8, 2, 8, 2).mean(axis=(3, 5))
    native, pooled = tap_statistics_at(large, [None, (8, 8)])
    for name in (field.name for field in dataclasses.fields(TapStatistics)):
        assert getattr(pooled, name) == pytest.approx(getattr(tap_statistics(pooled_by_hand), name), abs=1e-12)
        assert getattr(native, name) == pytest.approx(getattr(tap_statistics(large), name), abs=1e-12)
        assert getattr(pooled, name) == pytest.approx(getattr(tap_statistics(large, (8, 8)), name), abs=1e-12)


def test_skew_and_kurtosis_are_scipys_biased_values_per_channel_nan_where_scipy_gives_nan() -> None:
    """Our one-centring moments against scipy.stats itself, channel by channel, on skewed maps; and a
    channel whose spread is under scipy's rounding threshold (but not all equal) is NaN, as in scipy."""
    maps = np.random.default_rng(15).exponential(size=(40, 3, 5, 7)) ** 2
    channels = maps.transpose(1, 0, 2, 3).reshape(3, -1)
    result = tap_statistics(maps)
    assert result.skew == pytest.approx(scipy.stats.skew(channels, axis=1, bias=True).mean(), rel=1e-12)
    assert result.excess_kurtosis == pytest.approx(
        scipy.stats.kurtosis(channels, axis=1, fisher=True, bias=True).mean(), rel=1e-12)
    nearly_constant = np.full((50, 1, 2, 2), 1e8)
    nearly_constant[0, 0, 0, 0] += 1e-8
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert math.isnan(scipy.stats.skew(nearly_constant.ravel(), bias=True))
    assert math.isnan(tap_statistics(nearly_constant).skew)


@pytest.mark.parametrize("height,width", [(6, 8), (5, 7), (4, 1), (1, 6)])
def test_spectral_entropy_from_the_half_spectrum_equals_the_full_fft2_formula(height: int, width: int) -> None:
    """The rfft2 half spectrum with conjugate bins weighted twice gives the entropy of the full
    spectrum's power (DC bin left out) for even and odd sides."""
    maps = np.random.default_rng(16).normal(size=(6, 2, height, width))
    centred = maps - maps.mean(axis=(2, 3), keepdims=True)
    power = (np.abs(np.fft.fft2(centred)) ** 2).reshape(6, 2, -1)[:, :, 1:]
    share = power / power.sum(axis=2, keepdims=True)
    expected = (scipy.special.entr(share).sum(axis=2) / math.log(height * width - 1)).mean()
    assert tap_statistics(maps).spectral_entropy == pytest.approx(expected, rel=1e-12)


def test_the_log_power_spectrum_of_one_fourier_mode_peaks_at_its_frequency() -> None:
    grid = torch.arange(8, dtype=torch.float32)
    mode = torch.cos(2 * math.pi * 2 * grid / 8).expand(8, 8)  # two cycles along the width
    power = mean_log_power(mode.reshape(1, 1, 8, 8).repeat(3, 2, 1, 1))
    peaks = {tuple(index) for index in np.argwhere(power > power.max() - 1e-6)}
    assert peaks == {(4, 2), (4, 6)}, "fftshift puts frequency 0 at index 4; +-2 cycles at 4 +- 2"


def test_the_histogram_is_a_density_over_every_value() -> None:
    values = torch.randn(4000, 3)
    result = histogram(values)
    widths = np.diff(result["edges"])
    assert result["density"].shape == (100,) and result["edges"][0] == pytest.approx(float(values.min()))
    assert float((result["density"] * widths).sum()) == pytest.approx(1.0)
    dead = histogram(torch.zeros(50, 3))  # a constant tap: one unit-wide range from its value
    assert dead["edges"][[0, -1]].tolist() == [0.0, 1.0] and dead["density"][0] == pytest.approx(100.0)


def test_a_channel_taken_a_block_at_a_time_gives_the_whole_channel_s_statistics(monkeypatch: pytest.MonkeyPatch) -> None:
    """Moments summed block by block and maps' spatial terms block by block (uneven blocks: 7 maps of
    6 x 6 in 100 values' worth, 2 maps a block) against the whole channel at once."""
    from analysis import feature_stats

    maps = np.random.default_rng(16).exponential(size=(7, 2, 6, 6)) ** 2
    whole = tap_statistics(maps)
    monkeypatch.setattr(feature_stats, "VALUES_PER_BLOCK", 100)
    blocked = tap_statistics(maps)
    for name in ("std", "cv", "skew", "excess_kurtosis", "iqr"):
        assert getattr(blocked, name) == pytest.approx(getattr(whole, name), rel=1e-13), name
    for name in SPATIAL:
        assert getattr(blocked, name) == getattr(whole, name), name
