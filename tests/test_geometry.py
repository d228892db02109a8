"""analysis/geometry.py: the order of S and Q on clusters whose separation is known, every term against a
re-computation from the raw features one sample at a time, each legacy switch on a hand-worked example,
the pooling rule, the two intrinsic dimensions on data of known dimension, and the Gram matrix."""
from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from skdim.id import TwoNN

from analysis.geometry import (CLASS_CAP, MAX_FLAT_VALUES, GeometryOptions, LayerGeometry, flatten_for_geometry,
                               gram_matrix, layer_geometry)

ALL_LEGACY = GeometryOptions(legacy_include_diag=True, legacy_summed_count=True, legacy_log5=True, legacy_ambient_d=True)


def _geometry(features: np.ndarray, labels: np.ndarray, train_size: int = 1000,
              options: GeometryOptions = GeometryOptions(), seed: int = 0) -> LayerGeometry:
    return layer_geometry(features @ features.T, labels, train_size, features.shape[1], options, seed)


def _clusters(spread: float, seed: int = 0, classes: int = 4, per_class: int = 60, width: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian clusters of unit variance around ``spread`` times a distinct axis each."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(classes), per_class)
    features = spread * np.eye(width)[labels] + rng.standard_normal((len(labels), width))
    return features, labels


def _entropy(shares: list[float]) -> float:
    return -sum(share * math.log(share) for share in shares if share > 0)


def test_well_separated_clusters_score_higher_separation_and_quality_than_overlapping_ones() -> None:
    separated = _geometry(*_clusters(spread=10.0))
    overlapping = _geometry(*_clusters(spread=0.3))
    assert separated.separation > overlapping.separation + 0.5
    assert separated.quality > overlapping.quality
    assert separated.efficiency > overlapping.efficiency


def _kept(spectrum: np.ndarray) -> int:
    """The released code's loop: the fewest leading eigenvalues whose share reaches 95%."""
    shares = spectrum / spectrum.sum()
    count = 0
    while shares[:count].sum() < 0.95:
        count += 1
    return count


def _direct(features: np.ndarray, labels: np.ndarray, train_size: int, options: GeometryOptions,
            seed: int) -> tuple[float, float, float, int]:
    """S, I, E and the PCA ID straight from the features, one sample at a time, no Gram matrix."""
    norms = np.linalg.norm(features, axis=1)

    def cosines(sample: int, others: np.ndarray) -> np.ndarray:
        return np.abs(features[others] @ features[sample]) / (norms[others] * norms[sample])

    classes = sorted(set(labels.tolist()))
    members = {label: np.flatnonzero(labels == label) for label in classes}
    within, min_intra, between, min_inter, class_norms, spectra = [], [], [], [], [], []
    rng = np.random.default_rng(seed)
    for label in classes:
        own = members[label]
        pair_values = []
        for sample in own:
            others = own if options.legacy_include_diag else own[own != sample]
            pair_values.extend(cosines(sample, others))
        within.append(np.mean(pair_values))
        min_intra.append(min(cosines(sample, own[own != sample]).min() for sample in own))
        for other in classes:
            if other != label:
                between.append(np.mean([cosines(sample, members[other]).mean() for sample in own]))
        rest = np.flatnonzero(labels != label)
        min_inter.append(min(np.linalg.norm(features[rest] - features[sample], axis=1).min() for sample in own))
        class_norms.append(norms[own].mean())
        chosen = rng.choice(own, CLASS_CAP, replace=False) if len(own) > CLASS_CAP else own
        block = features[chosen] - features[chosen].mean(axis=0)
        spectrum = np.zeros(len(chosen))
        singular = np.linalg.svd(block, compute_uv=False)
        spectrum[:len(singular)] = singular**2
        spectra.append(spectrum)
    separation = np.mean(within) - np.mean(between)

    counts = [_kept(spectrum) for spectrum in spectra]
    entropies = []
    for spectrum, count in zip(spectra, counts):
        kept = min(sum(counts), len(spectrum)) if options.legacy_summed_count else count
        head = spectrum[:kept] / spectrum[:kept].sum()
        entropies.append(_entropy(head.tolist()) / (math.log(5) if options.legacy_log5 else math.log(kept)))
    information = (1 - np.mean(min_intra)) * np.mean(entropies)

    whole = np.linalg.svd(features - features.mean(axis=0), compute_uv=False) ** 2
    pca_id = _kept(whole)
    d = min(len(features), features.shape[1]) if options.legacy_ambient_d else pca_id
    efficiency = 2 * np.mean(min_inter) / np.mean(class_norms) * (train_size / math.pi) ** (1 / d)
    return separation, information, efficiency, pca_id


@pytest.mark.parametrize("options", [GeometryOptions(), ALL_LEGACY], ids=["ours", "released-code"])
def test_every_term_matches_a_direct_recomputation_from_the_features(options: GeometryOptions) -> None:
    rng = np.random.default_rng(3)
    sizes = (CLASS_CAP + 12, 31, 20)
    labels = np.repeat(np.array([7, 2, 5]), sizes)
    centres = 4.0 * rng.standard_normal((3, 6)) + 2.0
    features = centres[np.searchsorted([2, 5, 7], labels)] + rng.standard_normal((len(labels), 6)) * [3, 2, 1, 1, 0.5, 0.2]
    result = _geometry(features, labels, train_size=50_000, options=options, seed=11)
    separation, information, efficiency, pca_id = _direct(features, labels, 50_000, options, seed=11)
    assert result.separation == pytest.approx(separation, rel=1e-9, abs=1e-12)
    assert result.information == pytest.approx(information, rel=1e-9, abs=1e-12)
    assert result.efficiency == pytest.approx(efficiency, rel=1e-9)
    assert result.quality == pytest.approx(separation + math.sqrt(information * efficiency), rel=1e-9)
    assert result.pca_id == pca_id
    assert result.twonn == pytest.approx(TwoNN(discard_fraction=0.1).fit(features).dimension_, rel=1e-6)
    assert (result.samples, result.dimension) == (len(labels), 6)


def test_legacy_include_diag_adds_exactly_what_the_self_similarities_add() -> None:
    # Within each class the two samples are orthogonal (a = 0 off the diagonal, 1 on it); every
    # between-class a is 1/sqrt(2). Ours: 0 - 1/sqrt(2). With the diagonal: (0 + 0 + 1 + 1) / 4 = 1/2 more.
    features = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [1.0, -1.0]])
    labels = np.array([0, 0, 1, 1])
    ours = _geometry(features, labels)
    legacy = _geometry(features, labels, options=GeometryOptions(legacy_include_diag=True))
    assert ours.separation == pytest.approx(-1 / math.sqrt(2), abs=1e-12)
    assert legacy.separation - ours.separation == pytest.approx(0.5, abs=1e-12)


def _axis_pairs(*squares: float) -> np.ndarray:
    """+-sqrt(s) e_k for each s: a centred class whose spectrum is 2 s_k (and zeros), smallest a_ij = 0."""
    width = len(squares)
    rows = [sign * math.sqrt(square) * np.eye(width)[axis] for axis, square in enumerate(squares) for sign in (1, -1)]
    return np.array(rows)


@pytest.mark.parametrize("summed, log5", [(False, False), (True, False), (False, True), (True, True)])
def test_the_entropy_switches_keep_the_summed_count_and_divide_by_ln5_as_worked_by_hand(summed: bool, log5: bool) -> None:
    # Class 0: 6 samples, spectrum 80, 17, 3 (shares .80, .17, .03): 95% needs 2. Class 1: 4 samples in
    # 3-D, spectrum 6, 2 (shares .75, .25): 2. Summed count 4: class 0 keeps .80, .17, .03, (0); class 1
    # keeps .75, .25, (0, 0). Every class has a pair of opposite samples' orthogonal neighbours, so
    # the smallest a_ij is 0 and I is the mean normalised entropy.
    first = _axis_pairs(40.0, 8.5, 1.5)
    second = _axis_pairs(3.0, 1.0, 0.0)[:4]
    features = np.vstack([first, second])
    labels = np.array([0] * 6 + [1] * 4)
    if summed:
        entropies, kept = [_entropy([0.80, 0.17, 0.03]), _entropy([0.75, 0.25])], [4, 4]
    else:
        entropies, kept = [_entropy([0.80 / 0.97, 0.17 / 0.97]), _entropy([0.75, 0.25])], [2, 2]
    normalisers = [math.log(5)] * 2 if log5 else [math.log(count) for count in kept]
    expected = np.mean([entropy / normaliser for entropy, normaliser in zip(entropies, normalisers)])
    options = GeometryOptions(legacy_summed_count=summed, legacy_log5=log5)
    assert _geometry(features, labels, options=options).information == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("width", [3, 6])
def test_legacy_ambient_d_takes_min_samples_and_width_where_ours_takes_the_pca_id(width: int) -> None:
    # Four samples on the first axis: PCA ID 1, min(N, D') = min(4, width). The classes' nearest
    # samples are 2 apart (both classes), the class-mean norms 1.5 and 4.5: 2 * 2 / 3 before the factor.
    features = np.zeros((4, width))
    features[:, 0] = [1.0, 2.0, 4.0, 5.0]
    labels = np.array([0, 0, 1, 1])
    ours = _geometry(features, labels, train_size=100)
    legacy = _geometry(features, labels, train_size=100, options=GeometryOptions(legacy_ambient_d=True))
    assert ours.pca_id == 1
    assert ours.efficiency == pytest.approx(4 / 3 * (100 / math.pi), rel=1e-12)
    assert legacy.efficiency == pytest.approx(4 / 3 * (100 / math.pi) ** (1 / min(4, width)), rel=1e-12)


def test_a_zero_sample_is_orthogonal_to_everything_and_gives_no_nan() -> None:
    # Class 0 holds e1 and a zero sample, class 1 holds e1 twice: within a = 0 and 1, between a = 1, 0.
    features = np.array([[1.0, 0.0], [0.0, 0.0], [1.0, 0.0], [1.0, 0.0]])
    labels = np.array([0, 0, 1, 1])
    result = _geometry(features, labels)
    assert all(math.isfinite(value) for name, value in result.as_dict().items() if name != "twonn")
    assert result.separation == pytest.approx((0.0 + 1.0) / 2 - 0.5, abs=1e-12)


def test_a_map_over_the_limit_is_max_pooled_with_the_smallest_kernel_that_fits() -> None:
    maps = torch.randn(1, 128, 64, 64)
    assert maps[0].numel() == 2 * MAX_FLAT_VALUES
    flat = flatten_for_geometry(maps)
    assert flat.shape == (1, 131_072) and flat.dtype == torch.float32
    assert torch.equal(flat, F.max_pool2d(maps, 2).reshape(1, -1))


def test_a_small_map_is_only_flattened() -> None:
    maps = torch.randn(3, 4, 8, 8, dtype=torch.float64)
    flat = flatten_for_geometry(maps)
    assert flat.dtype == torch.float32
    assert torch.equal(flat, maps.reshape(3, -1).float())


def test_the_pca_id_of_data_spanning_k_dimensions_is_k() -> None:
    rng = np.random.default_rng(1)
    basis = np.linalg.qr(rng.standard_normal((30, 5)))[0]
    features = rng.standard_normal((200, 5)) @ basis.T + 3.0
    labels = np.arange(200) % 4
    assert _geometry(features, labels).pca_id == 5


def test_twonn_finds_two_dimensions_in_a_plane_embedded_in_ten() -> None:
    rng = np.random.default_rng(2)
    basis = np.linalg.qr(rng.standard_normal((10, 2)))[0]
    features = rng.uniform(size=(1500, 2)) @ basis.T + 1.0
    labels = np.arange(1500) % 3
    assert _geometry(features, labels).twonn == pytest.approx(2.0, abs=0.3)


def test_gram_matrix_is_flat_times_its_transpose_in_float64() -> None:
    flat = torch.randn(300, 2_500)
    gram = gram_matrix(flat, chunk=512)
    exact = (flat.double() @ flat.double().T).numpy()
    assert gram.dtype == np.float64 and gram.shape == (300, 300)
    np.testing.assert_allclose(gram, exact, rtol=1e-5, atol=1e-3)
    # The CPU path (numpy's syrk: one triangle, mirrored) is symmetric to the bit.
    np.testing.assert_array_equal(gram, gram.T)


def test_as_dict_holds_every_field_and_one_class_is_refused() -> None:
    features, labels = _clusters(spread=5.0, classes=2, per_class=10)
    result = _geometry(features, labels)
    assert result.as_dict() == dataclasses.asdict(result)
    with pytest.raises(ValueError, match="two classes"):
        _geometry(features, np.zeros(len(labels), dtype=int))
