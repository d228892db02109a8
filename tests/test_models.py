"""Architectures, feature taps and the model registry."""
from __future__ import annotations

import ast
import gc
import weakref
from pathlib import Path

import pytest
import torch

from models import resnet_cifar
from models.registry import architecture_names, build_model, parameter_count, tap_shapes
from models.taps import FeatureTaps

# Millions of parameters for 100 classes on 3x32x32, as published in the CRD paper's tables.
PUBLISHED_PARAMETERS = {
    "resnet20": 0.28e6,
    "resnet56": 0.86e6,
    "resnet110": 1.73e6,
    "resnet8x4": 1.23e6,
    "resnet32x4": 7.43e6,
}


@pytest.mark.parametrize("arch", sorted(PUBLISHED_PARAMETERS))
def test_parameter_count_matches_crd_tables(arch: str) -> None:
    with torch.device("meta"):
        model = build_model(arch, num_classes=100, image_shape=(3, 32, 32))
    assert parameter_count(model) == pytest.approx(PUBLISHED_PARAMETERS[arch], rel=0.02)


@pytest.mark.parametrize("arch", sorted(PUBLISHED_PARAMETERS))
@pytest.mark.parametrize("image_shape, num_classes", [((1, 8, 8), 10), ((3, 32, 32), 100)])
def test_forward_gives_one_logit_per_class(arch: str, image_shape: tuple[int, int, int], num_classes: int) -> None:
    model = build_model(arch, num_classes=num_classes, image_shape=image_shape)
    logits = model(torch.randn(2, *image_shape))
    assert logits.shape == (2, num_classes)
    assert torch.isfinite(logits).all()


def test_resnet32_matches_the_crd_table_and_runs_on_cifar() -> None:
    """resnet32, the student of CRD's resnet110 pair: 0.47M parameters at 100 classes in its Table 1."""
    model = build_model("resnet32", num_classes=100, image_shape=(3, 32, 32))
    assert parameter_count(model) == pytest.approx(0.47e6, rel=0.01)
    logits = model(torch.randn(2, 3, 32, 32))
    assert logits.shape == (2, 100)
    assert torch.isfinite(logits).all()


def test_tap_shapes_on_cifar() -> None:
    shapes = tap_shapes("resnet8x4", (3, 32, 32), 100)
    assert {name: shapes[name] for name in ("stem", "layer1", "layer2", "layer3", "pool")} == {
        "stem": (32, 32, 32),
        "layer1": (64, 32, 32),
        "layer2": (128, 16, 16),
        "layer3": (256, 8, 8),
        "pool": (256,),
    }


def test_tap_shapes_on_digits() -> None:
    shapes = tap_shapes("resnet20", (1, 8, 8), 10)
    assert shapes["layer3"] == (64, 2, 2)
    assert shapes["pool"] == (64,)


def test_tap_shapes_agree_with_a_real_forward() -> None:
    model = build_model("resnet56", num_classes=10, image_shape=(3, 32, 32)).eval()
    with FeatureTaps(model, ["stem", "layer1", "layer2", "layer3", "pool"]) as taps:
        _, features = taps(torch.randn(1, 3, 16, 16))
    measured = {name: tuple(feature.shape[1:]) for name, feature in features.items()}
    shapes = tap_shapes("resnet56", (3, 16, 16), 10)
    assert measured == {name: shapes[name] for name in measured}


def test_pool_tap_is_the_classifier_input() -> None:
    model = build_model("resnet20", num_classes=10, image_shape=(1, 8, 8)).eval()
    with FeatureTaps(model, ["pool"]) as taps:
        logits, features = taps(torch.randn(3, 1, 8, 8))
    torch.testing.assert_close(model.fc(features["pool"]), logits)


def test_gradient_flows_from_a_tap_to_the_stem() -> None:
    model = build_model("resnet8x4", num_classes=10, image_shape=(1, 8, 8))
    with FeatureTaps(model, ["layer2"]) as taps:
        _, features = taps(torch.randn(2, 1, 8, 8))
    features["layer2"].pow(2).mean().backward()
    stem_conv = model.stem[0]
    assert stem_conv.weight.grad is not None and stem_conv.weight.grad.abs().sum() > 0
    assert model.fc.weight.grad is None


def test_each_call_gets_a_fresh_dict_and_nothing_is_kept() -> None:
    model = build_model("resnet20", num_classes=10, image_shape=(1, 8, 8))
    taps = FeatureTaps(model, ["layer3"])
    first_logits, first = taps(torch.randn(2, 1, 8, 8))
    _, second = taps(torch.randn(2, 1, 8, 8))
    assert first is not second and first["layer3"] is not second["layer3"]
    released = weakref.ref(first["layer3"])
    del first_logits, first
    gc.collect()
    assert released() is None
    taps.remove()


def test_plain_forward_is_not_recorded_and_dotted_taps_work() -> None:
    model = build_model("resnet20", num_classes=10, image_shape=(1, 8, 8))
    with FeatureTaps(model, ["layer1.0.bn2"]) as taps:
        model(torch.randn(2, 1, 8, 8))
        _, features = taps(torch.randn(2, 1, 8, 8))
    assert set(features) == {"layer1.0.bn2"}
    assert (features["layer1.0.bn2"] < 0).any(), "a later in-place ReLU would have clipped this tap"


def test_unknown_tap_names_it_and_lists_the_available_ones() -> None:
    model = build_model("resnet20", num_classes=10, image_shape=(1, 8, 8))
    with pytest.raises(ValueError, match=r"'layer4'.*stem, layer1, layer2, layer3, pool, fc"):
        FeatureTaps(model, ["layer4"])
    assert all(not module._forward_hooks for module in model.modules())


def test_remove_takes_every_hook_off() -> None:
    model = build_model("resnet20", num_classes=10, image_shape=(1, 8, 8))
    taps = FeatureTaps(model, ["stem", "layer3", "pool"])
    assert sum(len(module._forward_hooks) for module in model.modules()) == 3
    taps.remove()
    taps.remove()
    assert all(not module._forward_hooks for module in model.modules())
    with pytest.raises(RuntimeError, match="removed"):
        taps(torch.randn(1, 1, 8, 8))


def test_context_manager_removes_hooks_even_on_error() -> None:
    model = build_model("resnet20", num_classes=10, image_shape=(1, 8, 8))
    with pytest.raises(RuntimeError, match="boom"):
        with FeatureTaps(model, ["layer2"]):
            raise RuntimeError("boom")
    assert all(not module._forward_hooks for module in model.modules())


def test_unknown_architecture_lists_the_allowed_names() -> None:
    with pytest.raises(KeyError, match="resnet8x4.*resnet20|resnet20.*resnet8x4") as raised:
        build_model("resnet7", num_classes=10, image_shape=(3, 32, 32))
    assert "resnet7" in str(raised.value)
    with pytest.raises(KeyError, match="resnet7"):
        tap_shapes("resnet7", (3, 32, 32), 10)


def test_architectures_literal_is_readable_without_torch() -> None:
    source = Path(resnet_cifar.__file__).read_text()
    assignments = [
        node for node in ast.parse(source).body
        if isinstance(node, ast.Assign) and any(getattr(target, "id", None) == "ARCHITECTURES" for target in node.targets)
    ]
    assert len(assignments) == 1
    declared = ast.literal_eval(assignments[0].value)
    assert set(declared) <= set(architecture_names())
    for arch, entry in declared.items():
        assert set(entry["taps"]) <= set(tap_shapes(arch, (3, 32, 32), 10))


def test_models_package_does_not_import_torch() -> None:
    assert Path(resnet_cifar.__file__).with_name("__init__.py").read_text().strip() == ""


def test_a_cifar_stage_never_imports_torchvision():
    """torchvision's import costs a process 160 MB of resident memory (its C extension): the stage
    modules, a CIFAR network and the CIFAR reader must work without it, and a torchvision network
    must still build once asked for."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "import stages.train_teacher, stages.train_student, stages.evaluate, stages.prepare_data, stages.preflight\n"
        "import stages.fit_pca, stages.pretrain_paraphraser, data.registry, models.registry\n"
        "models.registry.build_model('resnet8x4', 100, (3, 32, 32))\n"
        "print('torchvision' in sys.modules)\n"
        "models.registry.build_model('resnet18', 10, (3, 32, 32))\n"
        "models.registry.build_model('resnet9', 10, (3, 32, 32))\n"
        "print('torchvision' in sys.modules)\n"
    )
    root = Path(__file__).resolve().parent.parent
    finished = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=True)
    assert finished.stdout.split() == ["False", "True"]
