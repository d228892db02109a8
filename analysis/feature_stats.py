"""Statistics of one tap's feature maps, and the arrays its figures draw (histogram, log-power spectrum).

A tap's maps F are (N, C, H, W), or (N, D) for an embedding; every statistic is computed in float64
from whatever dtype or device they come in (the figures' histogram and spectrum in float32). The
work goes one channel at a time, and within a channel a block of values or maps at a time, so the
temporaries (the FFT, the wavelet bands, the blurred copy) stay a few MB. ``tap_statistics`` and
``histogram`` take a whole tap; they are made of parts (``channel_terms`` and
``combine_channel_terms``; ``histogram_counts`` and ``histogram_density``) that a caller holding
only a few channels at a time, as the analyze stage does, uses directly.

Distribution statistics are taken per channel over its N*H*W values (N for an embedding) and then
averaged over channels; spread uses the biased (population) moments throughout, as ``scipy.stats``
does with ``bias=True``. A constant channel has no skewness or kurtosis. scipy gives NaN (and a
precision-loss warning) when the spread it computes is under its rounding threshold, but the mean
of 100 copies of 0.1 rounds off enough to get skewness 1.0 from it; so a channel whose values are
all equal gets NaN here without calling scipy, and the channel average skips NaN, so one dead
channel does not blank the whole tap.

Spatial statistics are per map, one channel of one sample (H, W), then averaged over the maps that
have a value. All three look at the map with its own mean removed. The issue fixes that for the
spectral entropy; for the wavelet and low-pass ratios it is our choice. A map's mean is an offset,
not spatial structure (post-ReLU maps have a large one), and on the raw map the whole offset lands
in the Haar approximation band and in the low-pass denominator: both ratios would shrink as the
activations shift up, and a student whose maps sit higher than its teacher's would look smoother
when only its offset differs (which ``cv`` already reports). The price: our wavelet ratio is not
the raw-map figure the Distillation Benchmarks project measures. A constant map (all values equal,
zeros included) has no spatial structure, so its three terms are NaN and skipped; a tap where every
map is constant gives NaN, without numpy's all-NaN warning.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pywt
import torch
import torch.nn.functional as F
from scipy import ndimage, special

CV_EPS = 1e-8
LOWPASS_SIGMA = 1.0
HISTOGRAM_BINS = 100
SPECTRUM_SAMPLES = 1000
VALUES_PER_BLOCK = 1 << 18
"""How many float64 values (2 MB) the statistics' elementwise work takes at a time."""


@dataclass(frozen=True)
class TapStatistics:
    """One tap's statistics (student minus teacher is taken from the stored numbers, in
    ``pipeline/analysis_report.py``).

    ``lowpass_sigma`` is not a statistic but the Gaussian blur's sigma the low-pass ratio used; a
    difference keeps it as it is. The spatial fields are NaN for (N, D) embeddings.
    """

    std: float
    cv: float
    skew: float
    excess_kurtosis: float
    iqr: float
    wavelet_high_ratio: float
    spectral_entropy: float
    lowpass_residual_ratio: float
    lowpass_sigma: float = LOWPASS_SIGMA


def _float64(maps: np.ndarray | torch.Tensor) -> np.ndarray:
    if isinstance(maps, torch.Tensor):
        return maps.detach().to(device="cpu", dtype=torch.float64).numpy()
    return np.asarray(maps, dtype=np.float64)


def _nanmean(values: np.ndarray) -> float:
    """The mean of the non-NaN values, NaN when there are none (numpy's nanmean would warn)."""
    kept = values[~np.isnan(values)]
    return float(kept.mean()) if kept.size else math.nan


def _distribution(values: np.ndarray) -> tuple[float, float, float, float, float]:
    """(std, cv, skew, excess kurtosis, IQR) of one channel's values.

    Skewness and excess kurtosis are the biased moment ratios m3 / m2^1.5 and m4 / m2^2 - 3 that
    ``scipy.stats.skew`` and ``kurtosis`` (``bias=True``) return, by the same float64 operations
    (centre, square, then multiply), with their NaN below the same rounding threshold. scipy centres
    the whole channel afresh for each moment; here the centred powers are summed ``VALUES_PER_BLOCK``
    values at a time, so the temporaries stay small (a 5,000 x 80 x 80 channel is 256 MB in float64)
    and the sums differ from whole-array ones by float rounding only.
    """
    mean = values.mean()
    second = third = fourth = 0.0
    for start in range(0, values.size, VALUES_PER_BLOCK):
        centred = values[start:start + VALUES_PER_BLOCK] - mean
        squared = centred * centred
        second += squared.sum()
        third += (squared * centred).sum()
        fourth += (squared * squared).sum()
    second, third, fourth = second / values.size, third / values.size, fourth / values.size
    std = math.sqrt(second)
    if values.min() == values.max() or second <= (np.finfo(np.float64).eps * mean) ** 2:
        skew = kurtosis = math.nan
    else:
        skew = third / second**1.5
        kurtosis = fourth / second**2 - 3.0
    # scipy.stats.iqr's value (linear interpolation), with both quartiles from one selection: 4x faster
    lower, upper = np.quantile(values, [0.25, 0.75])
    return std, float(std / (abs(mean) + CV_EPS)), float(skew), float(kurtosis), float(upper - lower)


def _spectrum_weights(height: int, width: int) -> np.ndarray:
    """How many bins of a real map's full (H, W) spectrum each bin of its ``rfft2`` half stands for: the
    columns numpy drops are the complex conjugates (same power) of columns 1 .. ceil(W/2) - 1, so those
    count twice; column 0, and column W/2 of an even W, are their own mirror. The DC bin counts 0: the
    spectral entropy leaves it out."""
    weights = np.full((height, width // 2 + 1), 2.0)
    weights[:, 0] = 1.0
    if width % 2 == 0:
        weights[:, -1] = 1.0
    weights[0, 0] = 0.0
    return weights


def _spatial(maps: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per map of (N, H, W): the Haar high-band energy ratio, the spectral entropy and the low-pass
    residual ratio, NaN where a map is constant or too small for the term.

    Each map's terms are its own, so the maps go ``VALUES_PER_BLOCK`` values' worth at a time, to
    the same result: the FFT's, the wavelet bands' and the blurred copy's temporaries stay a few MB,
    where a whole channel's would be several times its size (GBs a thread, at 80 x 80).
    """
    step = max(1, VALUES_PER_BLOCK // (maps.shape[1] * maps.shape[2]))
    blocks = [_spatial_block(maps[start:start + step]) for start in range(0, len(maps), step)]
    wavelet, entropy, lowpass = (np.concatenate(term) for term in zip(*blocks))
    return wavelet, entropy, lowpass


def _spatial_block(maps: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``_spatial`` of a few maps."""
    count, height, width = maps.shape
    structured = maps.min(axis=(1, 2)) < maps.max(axis=(1, 2))
    centred = maps - maps.mean(axis=(1, 2), keepdims=True)

    def ratio(part: np.ndarray, whole: np.ndarray) -> np.ndarray:
        """part / whole where the map has structure (whole > 0 there), NaN elsewhere, without 0/0."""
        return np.where(structured, part / np.where(structured, whole, 1.0), np.nan)

    wavelet = np.full(count, np.nan)
    if height >= 2 and width >= 2:
        # Periodization keeps ceil(H/2) x ceil(W/2) coefficients, an odd side extended by its last
        # sample; the Haar transform is then not energy-preserving, so the total is the four bands'.
        approximation, details = pywt.dwt2(centred, "haar", mode="periodization", axes=(1, 2))
        high = sum((band**2).sum(axis=(1, 2)) for band in details)
        wavelet = ratio(high, high + (approximation**2).sum(axis=(1, 2)))

    entropy = np.full(count, np.nan)
    if height * width - 1 >= 2:
        # The half spectrum a real map needs, each bin weighted by the full-spectrum bins it stands for.
        half = np.fft.rfft2(centred, axes=(1, 2))
        power = half.real**2 + half.imag**2
        weights = _spectrum_weights(height, width)
        total = np.where(structured, (power * weights).sum(axis=(1, 2)), 1.0)
        terms = special.entr(power / total[:, None, None]) * weights
        entropy = np.where(structured, terms.sum(axis=(1, 2)), np.nan) / math.log(height * width - 1)

    # scipy's default boundary, 'reflect' (the edge sample repeated), keeps a constant map constant.
    blurred = ndimage.gaussian_filter(maps, sigma=LOWPASS_SIGMA, mode="reflect", axes=(1, 2))
    lowpass = ratio(((maps - blurred)**2).sum(axis=(1, 2)), (centred**2).sum(axis=(1, 2)))
    return wavelet, entropy, lowpass


def tap_statistics(maps: np.ndarray | torch.Tensor, size: tuple[int, int] | None = None) -> TapStatistics:
    """The statistics of one tap's (N, C, H, W) maps or (N, D) embeddings (spatial terms then NaN).

    With ``size``, each channel is first average-pooled in float64 to that (height, width)
    (``adaptive_avg_pool2d``, as the feature losses in ``distill/`` pool), so a teacher's maps are
    measured at a student's smaller size. Only one channel is ever held in float64: 5,000 CIFAR
    maps of 64 channels at 32 x 32 are 2.7 GB in float64 at once, 42 MB a channel.
    """
    return tap_statistics_at(maps, [size])[0]


ChannelTerms = list[tuple[tuple[float, ...], tuple[np.ndarray, ...] | None]]
"""One channel's terms at each asked size: its distribution statistics and, for a map, its per-map
spatial terms; ``combine_channel_terms`` averages them into a tap's statistics."""


def tap_statistics_at(maps: np.ndarray | torch.Tensor, sizes: Sequence[tuple[int, int] | None]) -> list[TapStatistics]:
    """``tap_statistics`` at each of ``sizes`` (None: the maps' own), each channel converted to
    float64 once for all of them; the analyze stage runs the same parts on a few channels at a
    time, on threads (numpy's FFT, scipy's filters and PyWavelets release the GIL in their loops)."""
    if maps.ndim not in (2, 4):
        raise ValueError(f"tap_statistics takes (N, C, H, W) maps or (N, D) embeddings, not shape {tuple(maps.shape)}")
    return combine_channel_terms([channel_terms(maps[:, channel], sizes) for channel in range(maps.shape[1])], len(sizes))


def channel_terms(channel: np.ndarray | torch.Tensor, sizes: Sequence[tuple[int, int] | None]) -> ChannelTerms:
    """One channel's terms, (N, H, W) values of a map or (N,) of an embedding, at each of ``sizes``
    (ignored for an embedding): a caller streaming a tap's channels keeps these and hands them all
    to ``combine_channel_terms``."""
    block = _float64(channel)
    terms = []
    for size in sizes:
        pooled = block
        if block.ndim == 3 and size is not None and tuple(block.shape[1:]) != tuple(size):
            pooled = F.adaptive_avg_pool2d(torch.from_numpy(block)[:, None], size)[:, 0].numpy()
        terms.append((_distribution(pooled.ravel()), _spatial(pooled) if block.ndim == 3 else None))
    return terms


def combine_channel_terms(per_channel: Sequence[ChannelTerms], size_count: int) -> list[TapStatistics]:
    """A tap's statistics at each of its ``size_count`` sizes from every channel's terms: the
    distribution statistics averaged over channels, the spatial terms over all maps (NaN skipped)."""
    results = []
    for index in range(size_count):
        distribution = np.array([terms[index][0] for terms in per_channel]).reshape(-1, 5)
        std, cv, skew, kurtosis, iqr = (_nanmean(column) for column in distribution.T)
        wavelet = entropy = lowpass = math.nan
        spatial = [terms[index][1] for terms in per_channel]
        if spatial and spatial[0] is not None:
            wavelet, entropy, lowpass = (_nanmean(np.concatenate(term)) for term in zip(*spatial))
        results.append(TapStatistics(std, cv, skew, kurtosis, iqr, wavelet, entropy, lowpass))
    return results


def histogram(features: torch.Tensor) -> dict[str, np.ndarray]:
    """Density of every activation value of the tap, over ``HISTOGRAM_BINS`` equal bins from its min to max."""
    low, high = float(features.min()), float(features.max())
    return histogram_density(histogram_counts(features, low, high), low, high)


def histogram_counts(features: torch.Tensor, low: float, high: float) -> np.ndarray:
    """How many of ``features`` fall in each of ``histogram``'s bins from ``low`` to ``high`` (the whole
    tap's range), in float64: a tap streamed in parts adds its parts' counts."""
    edges = _bin_edges(low, high)
    return torch.histc(features, bins=HISTOGRAM_BINS, min=edges[0], max=edges[-1]).double().numpy()


def histogram_density(counts: np.ndarray, low: float, high: float) -> dict[str, np.ndarray]:
    """``histogram``'s bin edges and density from its counts."""
    edges = _bin_edges(low, high)
    return {"edges": edges, "density": counts / (counts.sum() * (edges[1] - edges[0]))}


def _bin_edges(low: float, high: float) -> np.ndarray:
    """``HISTOGRAM_BINS`` equal bins from ``low`` to ``high``, one unit wide in all when they are equal."""
    return np.linspace(low, high if high > low else low + 1.0, HISTOGRAM_BINS + 1)


def mean_log_power(features: torch.Tensor, chunk: int = 256) -> np.ndarray:
    """The mean over samples (the first ``SPECTRUM_SAMPLES``) and channels of log10 of each
    mean-removed map's power spectrum, zero frequency at the centre (fftshift). 1e-12 keeps a
    constant map's log finite. A figure's array: float32, and 1,000 samples x C channels are
    plenty of maps for a mean, at a fifth of 5,000's time."""
    features = features[:SPECTRUM_SAMPLES]
    total = None
    for start in range(0, len(features), chunk):
        maps = features[start : start + chunk]
        maps = maps - maps.mean(dim=(-2, -1), keepdim=True)
        power = torch.log10(torch.fft.fft2(maps).abs() ** 2 + 1e-12).sum(dim=(0, 1))
        total = power if total is None else total + power
    count = features.shape[0] * features.shape[1]
    return torch.fft.fftshift(total / count).numpy()
