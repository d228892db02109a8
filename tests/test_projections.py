"""The shared projections of distill/_projections.py: their layers, their refusals, and the channel PCA
(fit on synthetic vectors of known covariance, and the teacher projection worked out by hand)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from distill._projections import PCAProjection, build_projection, fit_channel_pca, projected_side, projection_problem


def test_conv1x1_is_one_bias_free_1x1_convolution_into_the_teacher_channels() -> None:
    projection = build_projection("conv1x1", (4, 8, 8), (16, 8, 8))
    assert isinstance(projection, nn.Conv2d)
    assert (projection.in_channels, projection.out_channels, projection.kernel_size) == (4, 16, (1, 1))
    assert projection.bias is None
    assert projected_side("conv1x1") == "student"


def test_three_layer_conv_has_exactly_the_specified_layers_and_twice_the_teacher_channels_in_the_middle() -> None:
    projection = build_projection("three_layer_conv", (4, 8, 8), (16, 8, 8))
    layers = list(projection.children())
    assert [type(layer) for layer in layers] == [
        nn.Conv2d, nn.BatchNorm2d, nn.ReLU, nn.Conv2d, nn.BatchNorm2d, nn.ReLU, nn.Conv2d,
    ]
    first, second, last = layers[0], layers[3], layers[6]
    assert (first.in_channels, first.out_channels, first.kernel_size) == (4, 32, (1, 1))
    assert (second.in_channels, second.out_channels, second.kernel_size, second.padding) == (32, 32, (3, 3), (1, 1))
    assert (last.in_channels, last.out_channels, last.kernel_size) == (32, 16, (1, 1))
    assert layers[1].num_features == layers[4].num_features == 32
    assert all(conv.bias is None for conv in (first, second, last))
    assert projection(torch.randn(2, 4, 5, 5)).shape == (2, 16, 5, 5)


def test_none_is_identity_and_refused_across_channel_counts() -> None:
    assert isinstance(build_projection("none", (8, 4, 4), (8, 2, 2)), nn.Identity)
    assert "none" in projection_problem("none", 4, 8)
    with pytest.raises(ValueError, match="allowed: conv1x1, three_layer_conv, pca"):
        build_projection("none", (4, 4, 4), (8, 4, 4))


def test_pca_projects_the_teacher_and_refuses_more_student_channels_than_the_teacher_has() -> None:
    assert projected_side("pca") == "teacher"
    assert isinstance(build_projection("pca", (4, 4, 4), (8, 4, 4)), PCAProjection)
    with pytest.raises(ValueError, match="only 4 channels"):
        build_projection("pca", (8, 4, 4), (4, 4, 4))
    with pytest.raises(ValueError, match="allowed: conv1x1, three_layer_conv, pca, none"):
        build_projection("linear", (8, 4, 4), (8, 4, 4))


def test_channel_pca_recovers_a_known_covariance_from_maps_streamed_in_batches() -> None:
    # Channel vectors x = mean + z diag(sqrt(variances)) R^T for a fixed rotation R: covariance R diag(v) R^T.
    generator = torch.Generator().manual_seed(0)
    rotation, _ = torch.linalg.qr(torch.randn(4, 4, generator=generator, dtype=torch.float64))
    variances = torch.tensor([9.0, 4.0, 1.0, 0.25], dtype=torch.float64)
    mean = torch.tensor([1.0, -2.0, 0.5, 3.0], dtype=torch.float64)
    vectors = mean + torch.randn(200_000, 4, generator=generator, dtype=torch.float64) * variances.sqrt() @ rotation.T
    maps = vectors.reshape(500, 20, 20, 4).movedim(-1, 1)  # each position of each map is one vector
    fit = fit_channel_pca(maps[start : start + 64] for start in range(0, 500, 64))
    assert torch.allclose(fit["mean"], mean, atol=0.02)
    assert torch.allclose(fit["explained_variance"], variances, rtol=0.02)
    cosines = (fit["components"] * rotation.T).sum(1).abs()  # sign-insensitive: rows against R's columns
    assert torch.all(cosines > 0.999)
    assert torch.allclose(fit["components"] @ fit["components"].T, torch.eye(4, dtype=torch.float64), atol=1e-10)


def test_channel_pca_matches_the_unbiased_covariance_of_a_small_sample_exactly() -> None:
    vectors = torch.tensor([[1.0, 0.0], [3.0, 2.0], [5.0, 0.0], [7.0, 2.0]], dtype=torch.float64)
    fit = fit_channel_pca([vectors.reshape(1, 2, 2, 2).movedim(-1, 1)])
    # Mean (4, 1); deviations (-3, -1), (-1, 1), (1, -1), (3, 1): covariance [[20, 4], [4, 4]] / 3.
    assert fit["mean"].tolist() == pytest.approx([4.0, 1.0])
    expected = torch.linalg.eigvalsh(torch.tensor([[20.0, 4.0], [4.0, 4.0]], dtype=torch.float64) / 3).flip(0)
    assert fit["explained_variance"].tolist() == pytest.approx(expected.tolist())
    assert all(row[row.abs().argmax()] > 0 for row in fit["components"])  # each component's sign fixed


def test_pca_projection_is_the_centred_map_times_the_top_components_by_hand() -> None:
    fit = {
        "mean": torch.tensor([1.0, 2.0, 3.0]),
        "components": torch.tensor([[0.0, 1.0, 0.0], [0.6, 0.0, 0.8], [0.8, 0.0, -0.6]]),
        "explained_variance": torch.tensor([3.0, 2.0, 1.0]),
    }
    projection = PCAProjection(teacher_channels=3, components=2)
    projection.load_fit(fit)
    teacher = torch.tensor([[[[2.0, 1.0]], [[4.0, 2.0]], [[8.0, 3.0]]]])  # (1, 3, 1, 2): vectors (2,4,8), (1,2,3)
    projected = projection(teacher)
    # (2,4,8) - mean = (1,2,5): top-2 coordinates (2, 0.6 + 4.0) = (2, 4.6); (1,2,3) - mean = 0: (0, 0).
    assert projected.shape == (1, 2, 1, 2)
    assert projected[0, :, 0, 0].tolist() == pytest.approx([2.0, 4.6])
    assert projected[0, :, 0, 1].tolist() == pytest.approx([0.0, 0.0])
    assert set(projection.state_dict()) == {"mean", "components"}
