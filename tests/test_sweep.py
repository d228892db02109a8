"""Sweep files and the catalogue they are checked against.

Most tests run against a small fake repository whose method, model and data files start with an
import that cannot succeed: the catalogue must read their literals without importing them.
"""
from __future__ import annotations

import copy
import json
import textwrap
from pathlib import Path
from typing import Any, Callable

import pytest
import yaml

from pipeline.catalogue import Catalogue, CatalogueError, load_catalogue
from pipeline.sweep import SweepError, load_sweep

REPO = Path(__file__).resolve().parent.parent
_UNIMPORTABLE = "import module_that_does_not_exist  # the catalogue must never import this file\n\n"

FAKE_FILES = {
    "distill/vanilla.py": """
        METHOD = {"name": "vanilla", "summary": "no teacher", "uses_teacher": False, "params": {}, "pre_stage": None}
    """,
    "distill/kd.py": """
        METHOD = {
            "name": "kd",
            "summary": "soft targets",
            "uses_teacher": True,
            "params": {
                "temperature": {"default": 4.0, "min": 0.01, "help": "softmax temperature"},
                "kd_weight": {"default": 0.9, "min": 0.0, "max": 1.0},
            },
            "pre_stage": None,
        }
    """,
    "distill/ft.py": """
        METHOD = {
            "name": "ft",
            "summary": "factor transfer",
            "uses_teacher": True,
            "params": {
                "paraphraser_epochs": {"type": "int", "required": True, "min": 1},
                "factor_rate": {"default": 0.5, "min": 0.01},
                "beta": {"default": 500.0, "min": 0.0},
                "recon_loss": {"default": "l1", "choices": ["l1", "l2"]},
                "teacher_tap": {"default": "layer3", "tap": "teacher"},
                "student_tap": {"default": "layer3", "tap": "student"},
            },
            "pre_stage": {"kind": "pretrain_paraphraser", "params": ["paraphraser_epochs", "factor_rate", "teacher_tap"]},
        }
    """,
    "distill/tucker.py": """
        class Tucker:
            METHOD = "a class attribute is not the module's declaration"

        METHOD = {
            "name": "tucker",
            "summary": "tucker cores",
            "uses_teacher": True,
            "params": {
                "ranks": {"default": [16, 2, 2], "length": 3, "min": 1},
                "teacher_taps": {"default": ["layer2", "layer3"], "type": "list", "tap": "teacher"},
            },
            "pre_stage": None,
        }
    """,
    "distill/base.py": """
        class Method:
            METHOD: dict
    """,
    "models/resnet.py": """
        _TAPS = ["stem", "layer1", "layer2", "layer3", "pool"]
        ARCHITECTURES = {
            "resnet8x4": {"depth": 8, "widths": [32, 64, 128, 256], "taps": ["stem", "layer1", "layer2", "layer3", "pool"], "min_image_size": 1},
            "resnet32x4": {"depth": 32, "widths": [32, 64, 128, 256], "taps": ["stem", "layer1", "layer2", "layer3", "pool"], "min_image_size": 1},
            "resnet56": {"depth": 56, "widths": [16, 16, 32, 64], "taps": ["stem", "layer1", "layer2", "layer3", "pool"], "min_image_size": 1},
        }
    """,
    "models/small.py": """
        ARCHITECTURES = {"resnet20": {"depth": 20, "widths": [16, 16, 32, 64], "taps": ["stem", "layer1", "layer2", "layer3"], "min_image_size": 1}}
    """,
    # The real index's entries for these four names (tests/test_layers.py holds the real one to the networks).
    "models/layer_index.json": json.dumps({
        arch: layers for arch, layers in json.loads((REPO / "models" / "layer_index.json").read_text()).items()
        if arch in ("resnet8x4", "resnet32x4", "resnet56", "resnet20")
    }),
    "data/digits.py": """
        DATASETS = {"digits": {"num_classes": 10, "image_shape": [1, 8, 8], "needs_root": False, "summary": "8x8 digits", "train_images": 1438}}
    """,
    "data/cifar.py": """
        DATASETS = {"cifar100": {"num_classes": 100, "image_shape": [3, 32, 32], "needs_root": True, "summary": "CIFAR-100", "train_images": 50000}}
    """,
}

BASE_SWEEP: dict[str, Any] = {
    "name": "unit",
    "axes": {"dataset": ["digits"], "pair": ["resnet32x4:resnet8x4"], "method": ["vanilla", "kd", "ft", "tucker"]},
    "defaults": {"methods": {"ft": {"paraphraser_epochs": 2}}},
}


def write_fake_repo(root: Path, files: dict[str, str] = FAKE_FILES) -> Path:
    for relative, source in files.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(source if path.suffix == ".json" else _UNIMPORTABLE + textwrap.dedent(source))
    return root


def write_sweep(folder: Path, sweep: dict[str, Any], name: str = "sweep.yaml") -> Path:
    path = folder / name
    path.write_text(yaml.safe_dump(sweep, sort_keys=False))
    return path


def sweep_with(change: Callable[[dict[str, Any]], Any]) -> dict[str, Any]:
    """A copy of BASE_SWEEP after ``change`` (which edits it in place)."""
    sweep = copy.deepcopy(BASE_SWEEP)
    change(sweep)
    return sweep


@pytest.fixture(scope="session")
def fake_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_fake_repo(tmp_path_factory.mktemp("repo"))


@pytest.fixture(scope="session")
def catalogue(fake_repo: Path) -> Catalogue:
    return load_catalogue(fake_repo)


def test_real_repository_catalogue() -> None:
    """The shipped declarations parse; others may be added beside these."""
    catalogue = load_catalogue()
    assert set(catalogue.methods) >= {"vanilla", "kd", "ft", "tucker"}
    assert set(catalogue.architectures) >= {"resnet8x4", "resnet32x4", "resnet20", "resnet56", "resnet110"}
    assert set(catalogue.datasets) >= {"digits", "cifar10", "cifar100"}


def test_catalogue_reads_top_level_literals_without_importing(catalogue: Catalogue) -> None:
    assert set(catalogue.methods) == {"vanilla", "kd", "ft", "tucker"}
    assert set(catalogue.architectures) == {"resnet8x4", "resnet32x4", "resnet56", "resnet20"}
    assert catalogue.architectures["resnet20"].taps == ("stem", "layer1", "layer2", "layer3")
    assert catalogue.datasets["cifar100"].needs_root
    ft = catalogue.methods["ft"]
    assert ft.pre_stage is not None and ft.pre_stage.params == ("paraphraser_epochs", "factor_rate", "teacher_tap")
    assert ft.params["paraphraser_epochs"].required
    assert catalogue.methods["kd"].params["temperature"].type == "float"
    assert catalogue.methods["tucker"].params["ranks"].type == "list"


@pytest.mark.parametrize(
    ("relative", "source", "fragment"),
    [
        ("distill/kd.py", 'METHOD = {"name": "kdd", "uses_teacher": True}', "METHOD.name: must equal the file name 'kd'"),
        ("distill/kd.py", 'METHOD = {"name": "kd", "uses_teacher": True, "params": {"t": {"default": "x", "min": 1}}}',
         "METHOD.params.t.default: must be a number"),
        ("distill/kd.py", 'METHOD = {"name": "kd", "uses_teacher": True, "params": {"t": {"help": "no default"}}}',
         "METHOD.params.t: needs a default or required: true"),
        ("distill/kd.py", 'T = 4.0\nMETHOD = {"name": "kd", "uses_teacher": True, "params": {"t": {"default": T}}}',
         "METHOD: must be a plain literal"),
        ("models/other.py", 'ARCHITECTURES = {"resnet8x4": {"depth": 8, "widths": [1], "taps": ["stem"]}}', "also declared in"),
        ("data/broken.py", "DATASETS = {", "syntax error"),
    ],
    ids=["name-not-file", "bad-default", "no-default", "not-literal", "declared-twice", "syntax"],
)
def test_catalogue_errors_name_the_file(tmp_path: Path, relative: str, source: str, fragment: str) -> None:
    write_fake_repo(tmp_path, {**FAKE_FILES, relative: source})
    with pytest.raises(CatalogueError) as caught:
        load_catalogue(tmp_path)
    assert str(tmp_path / relative) in str(caught.value) and fragment in str(caught.value)


def test_minimal_sweep_gets_every_default(tmp_path: Path, catalogue: Catalogue) -> None:
    sweep = load_sweep(write_sweep(tmp_path, BASE_SWEEP), catalogue)
    assert sweep.axes["seed"] == (0,)
    assert sweep.defaults["teacher"]["seed"] == 0 and "seed" not in sweep.defaults["student"]
    assert sweep.defaults["data"] == {"val_fraction": 0.1, "split_seed": 0, "subset_size": None}
    assert sweep.defaults["methods"]["kd"] == {"temperature": 4.0, "kd_weight": 0.9}
    assert sweep.defaults["methods"]["ft"]["paraphraser_epochs"] == 2
    assert sweep.resources["train_student"] == {"time_min": 60, "cpus": 2, "gpus": 0, "mem_gb": 4.0}


def test_ints_for_floats_become_floats(tmp_path: Path, catalogue: Catalogue) -> None:
    path = write_sweep(tmp_path, sweep_with(lambda s: s["defaults"]["methods"].update(kd={"temperature": 2})))
    temperature = load_sweep(path, catalogue).defaults["methods"]["kd"]["temperature"]
    assert temperature == 2.0 and isinstance(temperature, float)


def test_numbers_spelled_as_in_papers_and_peer_configs_are_floats(tmp_path: Path) -> None:
    # RepDistiller, mdistiller and torchdistill configs write these; YAML 1.1 (PyYAML) reads them as strings.
    text = textwrap.dedent("""\
        name: spellings
        axes:
          dataset: [digits]
          pair: ["resnet20:resnet8x0.25"]
          method: [vanilla]
          student.lr: [1e-3, .5, 5E-2, 1.e-1]
        defaults:
          teacher: {weight_decay: 5e-4, lr: 1e-1, epochs: 240, momentum: .9}
          student: {weight_decay: 1e-4}
          data: {val_fraction: .1}
        """)
    path = tmp_path / "spellings.yaml"
    path.write_text(text)
    sweep = load_sweep(path, load_catalogue())
    assert sweep.axes["student.lr"] == (0.001, 0.5, 0.05, 0.1)
    assert sweep.defaults["teacher"]["weight_decay"] == 5e-4 and sweep.defaults["teacher"]["lr"] == 0.1
    assert sweep.defaults["teacher"]["momentum"] == 0.9 and sweep.defaults["data"]["val_fraction"] == 0.1
    assert sweep.defaults["student"]["weight_decay"] == 1e-4
    epochs = sweep.defaults["teacher"]["epochs"]
    assert epochs == 240 and isinstance(epochs, int)  # integers stay integers
    assert yaml.safe_load("x: 5e-4") == {"x": "5e-4"}  # the resolver is kdbench's own, PyYAML's is untouched


def test_required_param_of_an_unused_method_may_stay_unset(tmp_path: Path, catalogue: Catalogue) -> None:
    def drop_ft(sweep: dict[str, Any]) -> None:
        sweep["axes"]["method"] = ["kd"]
        del sweep["defaults"]["methods"]["ft"]

    assert load_sweep(write_sweep(tmp_path, sweep_with(drop_ft)), catalogue).axes["method"] == ("kd",)


def test_required_param_set_by_an_axis_is_enough(tmp_path: Path, catalogue: Catalogue) -> None:
    def epochs_axis(sweep: dict[str, Any]) -> None:
        del sweep["defaults"]["methods"]["ft"]
        sweep["axes"]["methods.ft.paraphraser_epochs"] = [1, 3]

    assert load_sweep(write_sweep(tmp_path, sweep_with(epochs_axis)), catalogue).axes["methods.ft.paraphraser_epochs"] == (1, 3)


def test_resources_merge_kind_over_default_over_built_in(tmp_path: Path, catalogue: Catalogue) -> None:
    resources = {
        "default": {"cpus": 4, "partition": "cpu"},
        "train_teacher": {"gpus": 1, "partition": "gpu", "extra_sbatch": ["--requeue"]},
        "evaluate": {"partition": None},
    }
    sweep = load_sweep(write_sweep(tmp_path, sweep_with(lambda s: s.update(resources=resources))), catalogue)
    assert sweep.resources["train_teacher"] == {
        "time_min": 60, "cpus": 4, "gpus": 1, "mem_gb": 4.0, "partition": "gpu", "extra_sbatch": ["--requeue"]
    }
    assert sweep.resources["train_student"]["partition"] == "cpu"
    assert "partition" not in sweep.resources["evaluate"]


def test_data_root_is_relative_to_the_sweep_file_else_the_environment(
    tmp_path: Path, catalogue: Catalogue, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KDBENCH_DATA", str(tmp_path / "from-env"))
    assert load_sweep(write_sweep(tmp_path, BASE_SWEEP), catalogue).data_root == str(tmp_path / "from-env")
    path = write_sweep(tmp_path, sweep_with(lambda s: s.update(data_root="cache")))
    assert load_sweep(path, catalogue).data_root == str(tmp_path / "cache")
    monkeypatch.delenv("KDBENCH_DATA")
    assert load_sweep(write_sweep(tmp_path, BASE_SWEEP), catalogue).data_root is None


def _set(*keys: str, value: Any) -> Callable[[dict[str, Any]], None]:
    """An edit that sets the nested key ``keys`` of a sweep to ``value``."""

    def change(sweep: dict[str, Any]) -> None:
        node = sweep
        for key in keys[:-1]:
            node = node.setdefault(key, {})
        node[keys[-1]] = value

    return change


def _both(*changes: Callable[[dict[str, Any]], None]) -> Callable[[dict[str, Any]], None]:
    def change(sweep: dict[str, Any]) -> None:
        for each in changes:
            each(sweep)

    return change


def _without_ft_epochs(sweep: dict[str, Any]) -> None:
    del sweep["defaults"]["methods"]["ft"]


BAD_SWEEPS = [
    pytest.param(_set("axes", "method", value=["vanilla", "kdd"]), "axes.method[1]",
                 ["unknown method 'kdd'", "did you mean 'kd'", "allowed: ft, kd, tucker, vanilla"], id="unknown-method"),
    pytest.param(_set("axes", "pair", value=["resnet32x4:resnet9x4"]), "axes.pair[0]",
                 ["unknown student architecture 'resnet9x4'", "allowed: resnet20, resnet32x4, resnet56, resnet8x4"],
                 id="unknown-arch"),
    pytest.param(_set("axes", "pair", value=["resnet32x4"]), "axes.pair[0]", ["'teacher:student'"], id="pair-format"),
    pytest.param(_set("axes", "dataset", value=["cifar1000"]), "axes.dataset[0]",
                 ["unknown dataset 'cifar1000'", "allowed: cifar100, digits"], id="unknown-dataset"),
    pytest.param(_set("defaults", "student", "lrr", value=0.1), "defaults.student.lrr",
                 ["unknown key 'lrr'", "did you mean 'lr'", "allowed: init, epochs, batch_size, lr,"], id="typo-key"),
    pytest.param(_set("resourcs", value={}), "resourcs", ["did you mean 'resources'"], id="typo-top-level"),
    pytest.param(_set("defaults", "methods", "kd", "temprature", value=2), "defaults.methods.kd.temprature",
                 ["unknown kd param 'temprature'", "did you mean 'temperature'", "allowed: temperature, kd_weight"], id="typo-method-param"),
    pytest.param(_set("defaults", "methods", "fitnet", value={}), "defaults.methods.fitnet",
                 ["unknown method 'fitnet'", "allowed: ft, kd, tucker, vanilla"], id="unknown-method-defaults"),
    pytest.param(_set("defaults", "student", "seed", value=3), "defaults.student.seed", ["'seed' axis"], id="student-seed"),
    pytest.param(_set("defaults", "student", "epochs", value="ten"), "defaults.student.epochs",
                 ["must be an int, got str 'ten'"], id="wrong-type"),
    pytest.param(_set("defaults", "teacher", "epochs", value=True), "defaults.teacher.epochs",
                 ["must be an int, got bool True"], id="bool-for-int"),
    pytest.param(_set("defaults", "data", "val_fraction", value=1.5), "defaults.data.val_fraction",
                 ["above the maximum 0.9"], id="out-of-range"),
    pytest.param(_set("defaults", "evaluate", "compile", value="yes"), "defaults.evaluate.compile",
                 ["must be true or false, got str 'yes'"], id="bad-runtime-switch"),
    pytest.param(_set("defaults", "evaluate", "channel_last", value=True), "defaults.evaluate.channel_last",
                 ["did you mean 'channels_last'", "cudnn_benchmark"], id="misspelt-runtime-switch"),
    pytest.param(_set("defaults", "teacher", "lr_schedule", value="linear"), "defaults.teacher.lr_schedule",
                 ["'linear' is not allowed", "allowed: cosine, step, constant"], id="bad-choice"),
    pytest.param(_set("defaults", "methods", "tucker", "ranks", value=[4, 4]), "defaults.methods.tucker.ranks",
                 ["list of 3 items"], id="list-length"),
    pytest.param(_without_ft_epochs, "defaults.methods.ft.paraphraser_epochs",
                 ["required by method ft", "set it here or as axis methods.ft.paraphraser_epochs"], id="ft-without-epochs"),
    pytest.param(_set("defaults", "methods", "ft", "teacher_tap", value="layer9"), "defaults.methods.ft.teacher_tap",
                 ["'layer9' is not a tap of teacher resnet32x4", "allowed: 0..17, stem, layer1, layer2, layer3, pool"], id="bad-tap"),
    pytest.param(_set("axes", "methods.ft.student_tap", value=["layer3", "layer9"]), "axes.methods.ft.student_tap[1]",
                 ["'layer9' is not a tap of student resnet8x4"], id="bad-tap-axis"),
    pytest.param(_both(_set("axes", "pair", value=["resnet32x4:resnet8x4", "resnet20:resnet8x4"]),
                       _set("defaults", "methods", "ft", "teacher_tap", value=15)),
                 "defaults.methods.ft.teacher_tap", ["15 is out of range for teacher resnet20's 12 generalised layers", "allowed: 0..11, stem, layer1,"],
                 id="tap-of-one-pair-only"),
    pytest.param(_set("defaults", "methods", "tucker", "teacher_taps", value=["layer2", "pool", "layer7"]),
                 "defaults.methods.tucker.teacher_taps", ["'layer7' is not a tap of teacher resnet32x4"], id="bad-tap-in-list"),
    pytest.param(_set("resources", "train_teacher", "gpu", value=1), "resources.train_teacher.gpu",
                 ["did you mean 'gpus'", "allowed: time_min, cpus, gpus, tasks, nodes, mem_gb, partition"], id="bad-resources-key"),
    pytest.param(_set("resources", "train_techer", value={"gpus": 1}), "resources.train_techer",
                 ["unknown stage kind", "did you mean 'train_teacher'"], id="bad-resources-kind"),
    pytest.param(_set("resources", "default", "pbs_dialect", value="openpbs"), "resources.default.pbs_dialect",
                 ["allowed: pro, torque"], id="bad-pbs-dialect"),
    pytest.param(_set("axes", "student.lrate", value=[0.1]), "axes.student.lrate",
                 ["unknown axis 'student.lrate'", "did you mean 'student.lr'", "methods.kd.temperature"], id="bad-axis-key"),
    pytest.param(_set("axes", "student.seed", value=[1]), "axes.student.seed", ["'seed' axis"], id="student-seed-axis"),
    pytest.param(_set("axes", "seed", value=[]), "axes.seed", ["must be a non-empty list"], id="empty-axis"),
    pytest.param(_set("axes", "seed", value=0), "axes.seed", ["must be a non-empty list"], id="scalar-axis"),
    pytest.param(_set("axes", "seed", value=[0, 0]), "axes.seed[1]", ["listed twice"], id="duplicate-axis-value"),
    pytest.param(_set("axes", "student.lr", value=[0.1, -1]), "axes.student.lr[1]", ["below the minimum 0.0"],
                 id="bad-axis-value"),
    pytest.param(lambda s: s["axes"].pop("pair"), "axes.pair", ["missing"], id="missing-axis"),
    pytest.param(_set("name", value="my demo"), "name", ["must match [A-Za-z0-9_-]+"], id="bad-name"),
    pytest.param(lambda s: s.pop("name"), "name", ["missing"], id="missing-name"),
]


@pytest.mark.parametrize(("change", "key", "fragments"), BAD_SWEEPS)
def test_bad_sweep_gives_one_line_naming_file_and_key(
    tmp_path: Path, catalogue: Catalogue, change: Callable, key: str, fragments: list[str]
) -> None:
    path = write_sweep(tmp_path, sweep_with(change))
    with pytest.raises(SweepError) as caught:
        load_sweep(path, catalogue)
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(f"{path}: {key}: ")
    for fragment in fragments:
        assert fragment in message


@pytest.mark.parametrize(
    ("text", "key", "fragment"),
    [
        ("name: demo\naxes: {dataset: [digits]\n", "line 3 column 1", "YAML syntax error"),
        ("name: demo\naxes:\n  dataset: [digits]\n\tpair: [x]\n", "line 4 column 1", "YAML syntax error"),
        ("name: demo\nname: other\n", "line 2 column 1", "duplicate key 'name'"),
        ("- just\n- a list\n", "(top level)", "must be a mapping"),
    ],
    ids=["unclosed-brace", "tab", "duplicate-key", "not-a-mapping"],
)
def test_unreadable_yaml_gives_one_line(tmp_path: Path, catalogue: Catalogue, text: str, key: str, fragment: str) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text(text)
    with pytest.raises(SweepError) as caught:
        load_sweep(path, catalogue)
    message = str(caught.value)
    assert "\n" not in message and message.startswith(f"{path}: {key}: ") and fragment in message


def test_missing_file_is_a_sweep_error(tmp_path: Path, catalogue: Catalogue) -> None:
    with pytest.raises(SweepError, match="cannot read it"):
        load_sweep(tmp_path / "absent.yaml", catalogue)


def test_list_items_are_typed_by_the_declared_default(tmp_path: Path) -> None:
    real = load_catalogue()  # tucker's ranks default is a list of ints
    sweep = {"name": "ranks", "axes": {"dataset": ["digits"], "pair": ["resnet20:resnet8x0.25"], "method": ["tucker"]},
             "defaults": {"methods": {"tucker": {"ranks": [2.5, 2, 2]}}}}
    path = write_sweep(tmp_path, sweep)
    with pytest.raises(SweepError, match=r"defaults\.methods\.tucker\.ranks: must be an int, got float 2\.5"):
        load_sweep(path, real)
