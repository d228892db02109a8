"""Analysis figures from synthetic analyze records: the panels and titles they promise, the files
``save_analysis_figures`` writes (and only those), and "n/a" for NaN cells of the statistics table."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib.image
import numpy as np
import pytest
from matplotlib.figure import Figure

from pipeline.analysis_plots import (LAYERS_FILE, layer_curves, save_analysis_figures, statistics_heatmap,
                                     tap_comparison, tap_file_name)

TEACHER_SHAPES = {"stem": [32, 32, 32], "layer1.0": [64, 32, 32], "layer2.0": [128, 16, 16],
                  "layer3.0": [256, 8, 8], "layer3.1": [256, 8, 8], "pool": [256]}
STUDENT_SHAPES = {"stem": [16, 32, 32], "layer1.0": [32, 16, 16], "layer2.0": [64, 8, 8],
                  "layer3.0": [128, 4, 4], "pool": [128]}
STATISTICS = ["std", "cv", "skew", "excess_kurtosis", "iqr", "wavelet_high_ratio", "spectral_entropy",
              "lowpass_residual_ratio", "lowpass_sigma"]


def analysis_record(role: str = "teacher", shapes: dict[str, list[int]] = TEACHER_SHAPES, arch: str = "resnet32x4",
                    method: str | None = None, geometry: bool = True, seed: int = 0) -> dict[str, Any]:
    """A record shaped like the analyze stage's, with random values; (C, H, W) taps get maps, (D,) taps none."""
    generator = np.random.default_rng(seed)
    splits = {}
    for split, samples in (("train", 5000), ("test", 1000)):
        taps = {}
        for depth, (tap, shape) in enumerate(shapes.items()):
            values = np.maximum(generator.normal(0.2, 1.0, 20_000), 0)
            density, edges = np.histogram(values, bins=60, density=True)
            spatial = len(shape) == 3
            log_power = None
            if spatial:
                side = shape[1]
                radius = np.hypot(*np.meshgrid(np.arange(side) - side // 2, np.arange(side) - side // 2))
                log_power = -radius / side + 0.1 * generator.normal(size=(side, side))
                log_power[side // 2, side // 2] = -np.inf
            taps[tap] = {
                "shape": shape,
                "stats": {name: float(generator.normal()) for name in STATISTICS},
                "geometry": None if not geometry else {
                    "separation": 0.1 * depth + generator.uniform(0, 0.05), "information": generator.uniform(1, 4),
                    "efficiency": generator.uniform(0, 1), "quality": generator.uniform(0, 1),
                    "pca_id": 10 + 30 * np.sin(np.pi * depth / len(shapes)),
                    "twonn": 6 + 12 * np.sin(np.pi * depth / len(shapes)) + generator.uniform(0, 2),
                    "dimension": int(np.prod(shape)), "samples": samples},
                "histogram": {"edges": edges, "density": density},
                "mean_map": generator.uniform(0, 1, shape[1:]) if spatial else None,
                "log_power": log_power,
            }
        splits[split] = {"samples": samples, "per_class": samples // 100, "taps": taps}
    return {"model_stage": f"train_{role}-cifar100-{arch}-abcd1234", "arch": arch, "role": role, "method": method,
            "dataset": "cifar100", "num_classes": 100, "taps": list(shapes), "splits": splits}


def student_record(**changes: Any) -> dict[str, Any]:
    return analysis_record(**{"role": "student", "shapes": STUDENT_SHAPES, "arch": "resnet8x4", "method": "kd",
                              "seed": 1, **changes})


def titles(figure: Figure) -> str:
    return " | ".join([figure.get_suptitle(), *(axes.get_title() for axes in figure.axes)])


def test_layer_curves_draws_four_geometry_panels_and_the_dimensions() -> None:
    figure = layer_curves(analysis_record(), split="test")
    assert len(figure.axes) == 5
    assert "resnet32x4 teacher on cifar100" in figure.get_suptitle()
    assert "test split, 1,000 images" in figure.get_suptitle()
    dimension = next(axes for axes in figure.axes if axes.get_title() == "intrinsic dimension")
    assert [line.get_label() for line in dimension.get_lines()] == ["PCA ID", "TwoNN"]
    assert [label.get_text() for label in dimension.get_xticklabels()] == list(TEACHER_SHAPES)
    assert all(axes.get_ylabel() for axes in figure.axes)


def test_layer_curves_refuses_a_record_without_geometry() -> None:
    with pytest.raises(ValueError, match="no tap of split 'train' has geometry"):
        layer_curves(analysis_record(geometry=False))


def test_tap_comparison_draws_both_models_with_colourbars() -> None:
    figure = tap_comparison(analysis_record(), student_record(), "layer3.0")
    assert len(figure.axes) == 5 + 4
    text = titles(figure)
    for expected in ("resnet32x4 256×8×8", "resnet8x4 128×4×4", "tap layer3.0", "resnet8x4 student (kd)"):
        assert expected in text
    histogram = figure.axes[0]
    assert [patch.get_label().splitlines()[1] for patch in histogram.patches] == ["5,000 images", "5,000 images"]
    assert histogram.get_xlabel() == "activation value"
    colourbar_labels = {axes.get_ylabel() for axes in figure.axes[5:]}
    assert colourbar_labels == {"mean activation", "log10 power"}
    spectrum = next(axes for axes in figure.axes if "log10 power, mean removed" in axes.get_title())
    assert spectrum.get_xlabel() == "horizontal frequency (cycles/pixel)"


def test_tap_comparison_of_a_vector_tap_is_the_histogram_alone() -> None:
    figure = tap_comparison(analysis_record(), student_record(), "pool")
    assert len(figure.axes) == 1
    assert figure.axes[0].get_xlabel() == "activation value"
    assert "teacher resnet32x4 256-vector" in figure.axes[0].patches[0].get_label()


def test_tap_comparison_says_which_model_has_no_map() -> None:
    student = student_record()
    vector = {"shape": [8192], "mean_map": None, "log_power": None}
    student["splits"]["train"]["taps"]["layer3.0"].update(vector)
    figure = tap_comparison(analysis_record(), student, "layer3.0")
    assert len(figure.axes) == 5 + 2
    blank = [axes for axes in figure.axes if not axes.axison]
    assert len(blank) == 2 and all("student resnet8x4 8192-vector" in axes.get_title() for axes in blank)
    assert all(axes.texts[0].get_text().startswith("no spatial map") for axes in blank)


def test_statistics_heatmap_annotates_raw_values_and_nan_as_na() -> None:
    values = np.array([[0.123456, np.nan, -2.0], [1e-4, 5.0, np.nan]])
    figure = statistics_heatmap(["kd", "fitnet"], ["std", "skew", "iqr"], values, "student − teacher at layer3.0")
    assert len(figure.axes) == 2
    texts = [text.get_text() for text in figure.axes[0].texts]
    assert texts == ["0.123", "n/a", "-2", "0.0001", "5", "n/a"]
    negative_zero = statistics_heatmap(["kd"], ["std"], np.array([[-0.0]]), "negative zero")
    assert [text.get_text() for text in negative_zero.axes[0].texts] == ["0"]
    assert figure.axes[1].get_ylabel() == "student − teacher, scaled per column"
    scaled = figure.axes[0].images[0].get_array()
    assert scaled[0, 2] == -1.0 and scaled[1, 0] == pytest.approx(1e-4 / 0.123456)


def test_statistics_heatmap_refuses_values_of_the_wrong_shape() -> None:
    with pytest.raises(ValueError, match=r"values have shape \(2, 2\)"):
        statistics_heatmap(["kd", "fitnet"], ["std", "skew", "iqr"], np.zeros((2, 2)), "wrong")


def test_save_writes_layers_and_one_file_per_tap_pair(tmp_path: Path) -> None:
    shared = ["stem", "layer1.0", "layer2.0", "layer3.0", "pool"]
    written = save_analysis_figures(student_record(), tmp_path, teacher=analysis_record(),
                                    pairs=[(tap, tap) for tap in shared])
    expected = [LAYERS_FILE, *(f"Tap-{tap}.png" for tap in shared)]
    assert written == [tmp_path / name for name in expected]
    assert sorted(path.name for path in tmp_path.iterdir()) == sorted(expected)
    for path in written:
        image = matplotlib.image.imread(path)
        assert image.ndim == 3 and image.shape[0] > 400 and image.shape[1] > 1000


def test_save_draws_each_given_pair_of_differently_named_taps(tmp_path: Path) -> None:
    """``taps: [1, 3]`` across architectures: the teacher's layer1.0 against the student's stem, and so on."""
    pairs = [("layer1.0", "stem"), ("layer3.0", "layer3.0")]
    written = save_analysis_figures(student_record(), tmp_path, teacher=analysis_record(), pairs=pairs, layers=False)
    assert written == [tmp_path / "Tap-layer1.0-vs-stem.png", tmp_path / "Tap-layer3.0.png"]
    figure = tap_comparison(analysis_record(), student_record(), "layer1.0", student_tap="stem")
    text = titles(figure)
    assert "teacher tap layer1.0 vs student tap stem" in text
    assert "resnet32x4 64×32×32" in text and "resnet8x4 16×32×32" in text


def test_save_without_teacher_or_geometry_writes_nothing(tmp_path: Path) -> None:
    assert save_analysis_figures(student_record(geometry=False), tmp_path) == []
    assert list(tmp_path.iterdir()) == []


def test_save_without_geometry_still_writes_the_tap_files(tmp_path: Path) -> None:
    teacher = analysis_record(shapes={"stem": [32, 32, 32], "head": [100], "pool": [256]})
    written = save_analysis_figures(student_record(geometry=False), tmp_path, teacher=teacher,
                                    pairs=[("stem", "stem"), ("pool", "pool")])
    assert written == [tmp_path / "Tap-stem.png", tmp_path / "Tap-pool.png"]
    assert sorted(path.name for path in tmp_path.iterdir()) == ["Tap-pool.png", "Tap-stem.png"]


def test_a_tap_without_geometry_is_a_gap_in_the_curves() -> None:
    record = analysis_record()
    record["splits"]["train"]["taps"]["layer2.0"]["geometry"] = None
    separation = next(axes for axes in layer_curves(record).axes if axes.get_title() == "separation S")
    heights = separation.get_lines()[0].get_ydata()
    assert np.isnan(heights[2]) and not np.isnan(heights).any(where=np.arange(len(heights)) != 2)


def test_tap_names_become_safe_file_names() -> None:
    assert tap_file_name("layer1.0") == "Tap-layer1.0.png"
    assert tap_file_name("blocks/3:conv") == "Tap-blocks_3_conv.png"
    assert tap_file_name("layer1", "layer1") == "Tap-layer1.png"
    assert tap_file_name("layer1", "blocks/3") == "Tap-layer1-vs-blocks_3.png"
