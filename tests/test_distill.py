"""Distillation methods: each loss against numbers worked out by hand, Tucker's decomposition on tensors
whose decomposition is known, FT's paraphraser plumbing, the METHOD literals, and that every method
actually trains a student-side tensor."""
from __future__ import annotations

import ast
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from distill.base import Batch, MethodConfigError, MethodContext, ModelOutput, method_class
from distill.ft import PARAPHRASER_FILE, build_paraphraser, ft_term, reconstruction_loss
from distill.tucker import aligned_l1, fix_signs, samplewise_tucker_cores, tucker_cores
from pipeline.catalogue import load_catalogue

METHOD_NAMES = tuple(sorted(load_catalogue().methods))  # every method file, so a new one is checked too
DISTILL_DIR = Path(__file__).resolve().parent.parent / "distill"


def defaults(name: str, **overrides: object) -> dict[str, object]:
    """The method's declared defaults, plus the settings a sweep would have to give."""
    params = {key: spec["default"] for key, spec in method_class(name).METHOD["params"].items() if "default" in spec}
    if name == "ft":
        params["paraphraser_epochs"] = 1
    params.update(overrides)
    return params


def context(teacher: tuple[int, ...], student: tuple[int, ...], pre_stage_dir: str | None = None) -> MethodContext:
    return MethodContext(num_classes=3, teacher_tap_shapes={"layer3": teacher, "pool": (teacher[0],)},
                         student_tap_shapes={"layer3": student, "pool": (student[0],)}, pre_stage_dir=pre_stage_dir)


def orthonormal(rows: int, columns: int, generator: torch.Generator) -> torch.Tensor:
    return torch.linalg.qr(torch.randn(rows, columns, generator=generator, dtype=torch.float64))[0]


# --- the METHOD declarations and the registry ---------------------------------------------------------

@pytest.mark.parametrize("name", METHOD_NAMES)
def test_method_literal_is_plain_data_and_is_the_class_declaration(name: str) -> None:
    tree = ast.parse((DISTILL_DIR / f"{name}.py").read_text())
    nodes = [node.value for node in tree.body
             if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "METHOD" for t in node.targets)]
    assert len(nodes) == 1
    declared = ast.literal_eval(nodes[0])
    assert declared == method_class(name).METHOD
    assert declared["name"] == name
    for key, spec in declared["params"].items():
        assert spec["help"], key
        assert ("default" in spec) != spec.get("required", False), key
        if "choices" in spec:
            assert spec["default"] in spec["choices"], key
    if declared["pre_stage"] is not None:
        assert set(declared["pre_stage"]["params"]) <= set(declared["params"])


def test_registry_finds_methods_by_name_and_rejects_unknown_ones() -> None:
    assert method_class("kd").METHOD["name"] == "kd"
    with pytest.raises(KeyError):
        method_class("nope")


# --- losses against hand-worked numbers ---------------------------------------------------------------

def test_vanilla_is_label_smoothed_cross_entropy() -> None:
    # logits [1, 2, 3], label 0, smoothing 0.1 over 3 classes: target q = [0.9 + 0.1/3, 0.1/3, 0.1/3];
    # log softmax = [1, 2, 3] - log(e + e^2 + e^3) = [-2.40761, -1.40761, -0.40761];
    # -sum q log p = 0.93333 x 2.40761 + 0.03333 x (1.40761 + 0.40761) = 2.30761
    method = method_class("vanilla")(defaults("vanilla"), context((4, 2, 2), (4, 2, 2)))
    terms = method.loss(ModelOutput(torch.tensor([[1.0, 2.0, 3.0]])), None, Batch(torch.zeros(1), torch.tensor([0])))
    assert list(terms) == ["ce"]
    assert terms["ce"].item() == pytest.approx(2.3076060, abs=1e-6)


def test_kd_is_weighted_t_squared_kl_plus_weighted_cross_entropy() -> None:
    # T = 2. Sample 1: s/T = [.5, 1, 1.5] and t/T = [1.5, 1, .5] share a normaliser, so
    # log p_t - log p_s = [1, 0, -1] and KL = p_t[0] - p_t[2] = 0.50648 - 0.18632 = 0.32016.
    # Sample 2: p_s uniform, p_t = softmax([.5, 0, -.5]), KL = log 3 + sum p_t log p_t = 0.07842.
    # batchmean 0.19929, x T^2 = 0.79716. CE with labels [2, 1]: (0.40761 + log 3) / 2 = 0.75311.
    method = method_class("kd")(defaults("kd", temperature=2.0, kd_weight=0.9, ce_weight=0.1),
                                context((4, 2, 2), (4, 2, 2)))
    student = ModelOutput(torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]]))
    teacher = ModelOutput(torch.tensor([[3.0, 2.0, 1.0], [1.0, 0.0, -1.0]]))
    terms = method.loss(student, teacher, Batch(torch.zeros(2), torch.tensor([2, 1])))
    assert terms["kd"].item() == pytest.approx(0.9 * 0.7971552, abs=1e-6)
    assert terms["ce"].item() == pytest.approx(0.1 * 0.7531091, abs=1e-6)


# Two samples of 4 factor entries, normalised by hand:
#   sample 1: s = [1, 2, 2, 4] / 5 = [.2, .4, .4, .8], t = [2, 0, 0, 0] / 2 = [1, 0, 0, 0];
#             t - s = [.8, -.4, -.4, -.8]: L1 2.4, L2 sqrt(1.6)
#   sample 2: s = [1, 1, 1, 1] / 2 = [.5, .5, .5, .5], t = [0, 3, 0, 4] / 5 = [0, .6, 0, .8];
#             t - s = [-.5, .1, -.5, .3]: L1 1.4, L2 sqrt(.6)
FT_STUDENT = [[1.0, 2.0, 2.0, 4.0], [1.0, 1.0, 1.0, 1.0]]
FT_TEACHER = [[2.0, 0.0, 0.0, 0.0], [0.0, 3.0, 0.0, 4.0]]


def test_ft_code_form_is_beta_times_the_mean_absolute_difference_over_batch_and_entries() -> None:
    # The authors' train_student.py: BETA x nn.L1Loss(F.normalize(s.view(N, -1)), F.normalize(t.view(N, -1))).
    # L1Loss averages all 8 entries: (2.4 + 1.4) / 8 = .475, x 500 = 237.5 (p plays no part).
    student, teacher = torch.tensor(FT_STUDENT).reshape(2, 1, 2, 2), torch.tensor(FT_TEACHER).reshape(2, 1, 2, 2)
    for p in (1, 2):
        assert ft_term(student, teacher, 500.0, "code", p).item() == pytest.approx(500 * 3.8 / 8)


def test_ft_paper_form_is_half_beta_times_the_per_sample_p_norm_averaged_over_the_batch() -> None:
    # beta / 2 x ||u_t - u_s||_p per sample, then the batch mean: p=1 250 x (2.4 + 1.4) / 2 = 475;
    # p=2 250 x (sqrt(1.6) + sqrt(.6)) / 2 = 254.94.
    student, teacher = torch.tensor(FT_STUDENT).reshape(2, 4, 1, 1), torch.tensor(FT_TEACHER).reshape(2, 4, 1, 1)
    assert ft_term(student, teacher, 500.0, "paper", 1).item() == pytest.approx(250 * 1.9)
    assert ft_term(student, teacher, 500.0, "paper", 2).item() == pytest.approx(250 * (math.sqrt(1.6) + math.sqrt(0.6)) / 2)
    with pytest.raises(ValueError):
        ft_term(student, teacher, 500.0, "per_entry", 1)


def test_ft_defaults_are_the_authors_code_term_with_beta_500_and_a_unit_cross_entropy() -> None:
    method = method_class("ft")(defaults("ft", factor_rate=1.0), context((4, 1, 1), (4, 1, 1)))
    method.translator = nn.Identity()
    method.paraphraser.encoder = nn.Identity()
    student = ModelOutput(torch.zeros(2, 3), {"layer3": torch.tensor(FT_STUDENT).reshape(2, 4, 1, 1)})
    teacher = ModelOutput(torch.zeros(2, 3), {"layer3": torch.tensor(FT_TEACHER).reshape(2, 4, 1, 1)})
    terms = method.loss(student, teacher, Batch(torch.zeros(2), torch.tensor([0, 1])))
    assert terms["ft"].item() == pytest.approx(237.5)  # the old default, beta / 2 x the same mean, gave 118.75
    assert terms["ce"].item() == pytest.approx(math.log(3))


def test_reconstruction_loss_is_mean_absolute_or_mean_squared_error() -> None:
    reconstruction, features = torch.tensor([1.0, 2.0]), torch.tensor([0.0, 4.0])
    assert reconstruction_loss(reconstruction, features, "l1").item() == pytest.approx(1.5)
    assert reconstruction_loss(reconstruction, features, "l2").item() == pytest.approx(2.5)
    with pytest.raises(ValueError):
        reconstruction_loss(reconstruction, features, "huber")


# --- FT's paraphraser ---------------------------------------------------------------------------------

@pytest.mark.parametrize(("rate", "factor_channels"), [(0.5, 3), (0.3, 2), (1.0, 6)])
def test_paraphraser_encodes_to_round_c_times_rate_channels_and_reconstructs_the_input_shape(rate: float, factor_channels: int) -> None:
    paraphraser = build_paraphraser((6, 4, 4), defaults("ft", factor_rate=rate))
    features = torch.randn(2, 6, 4, 4)
    assert paraphraser.encode(features).shape == (2, factor_channels, 4, 4)
    assert paraphraser(features).shape == features.shape
    convolutions = [module for module in paraphraser.modules() if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d))]
    assert [type(module) for module in convolutions] == [nn.Conv2d] * 3 + [nn.ConvTranspose2d] * 3


def test_paraphraser_and_translator_are_the_authors_layers_without_batch_norm_by_default() -> None:
    # Models/FeatureProjection.py: 3x3 stride-1 convolutions with bias, each followed by LeakyReLU(0.1),
    # encoder C -> C -> kC -> kC, decoder kC -> kC -> C -> C; the translator is the encoder's shape.
    method = method_class("ft")(defaults("ft"), context((8, 2, 2), (6, 2, 2)))
    layers = [*method.paraphraser.modules(), *method.translator.modules()]
    assert not any(isinstance(module, nn.BatchNorm2d) for module in layers)
    convolutions = [module for module in layers if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d))]
    assert [(module.in_channels, module.out_channels) for module in convolutions] == [
        (8, 8), (8, 4), (4, 4), (4, 4), (4, 8), (8, 8), (6, 6), (6, 4), (4, 4)]
    assert all(module.kernel_size == (3, 3) and module.stride == (1, 1) and module.padding == (1, 1)
               and module.bias is not None for module in convolutions)
    assert [module.negative_slope for module in layers if isinstance(module, nn.LeakyReLU)] == [0.1] * 9
    with_batch_norm = method_class("ft")(defaults("ft", batch_norm=True), context((8, 2, 2), (6, 2, 2)))
    assert sum(isinstance(module, nn.BatchNorm2d) for module in with_batch_norm.modules()) == 9


def test_ft_loads_the_pre_stage_paraphraser_frozen_and_keeps_it_frozen_in_train_mode(tmp_path: Path) -> None:
    params = defaults("ft", batch_norm=True)  # with batch norm, so its running statistics can be watched
    trained = build_paraphraser((4, 2, 2), params)
    with torch.no_grad():
        for parameter in trained.parameters():
            parameter.add_(1.0)
    torch.save({"paraphraser": trained.state_dict(), "epoch": 3}, tmp_path / PARAPHRASER_FILE)
    method = method_class("ft")(params, context((4, 2, 2), (6, 2, 2), pre_stage_dir=str(tmp_path)))
    for name, value in trained.state_dict().items():
        assert torch.equal(method.paraphraser.state_dict()[name], value), name

    method.train()
    assert method.translator.training
    assert not any(module.training for module in method.paraphraser.modules())
    assert not any(parameter.requires_grad for parameter in method.paraphraser.parameters())
    running_means = [module.running_mean.clone() for module in method.paraphraser.modules() if isinstance(module, nn.BatchNorm2d)]
    assert len(running_means) == 6
    method.loss(ModelOutput(torch.zeros(3, 3), {"layer3": torch.randn(3, 6, 2, 2)}),
                ModelOutput(torch.zeros(3, 3), {"layer3": torch.randn(3, 4, 2, 2)}), Batch(torch.zeros(3), torch.tensor([0, 1, 2])))
    after = [module.running_mean for module in method.paraphraser.modules() if isinstance(module, nn.BatchNorm2d)]
    assert all(torch.equal(before, now) for before, now in zip(running_means, after))


def test_ft_rejects_taps_of_different_spatial_size_and_taps_that_are_not_feature_maps() -> None:
    with pytest.raises(MethodConfigError) as error:
        method_class("ft").check(defaults("ft"), context((4, 2, 2), (4, 4, 4)))
    assert error.value.key == "student_tap"
    with pytest.raises(MethodConfigError) as error:
        method_class("ft").check(defaults("ft", teacher_tap="pool"), context((4, 2, 2), (4, 2, 2)))
    assert error.value.key == "teacher_tap"


# --- Tucker -------------------------------------------------------------------------------------------

def known_tucker_batch(scales: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """X = G x1 U x2 V x3 W with a superdiagonal core G[n, i, i, i] = scales[n, i].

    Every unfolding of G then has orthogonal rows whose norms are the column norms of ``scales``; when
    those differ, the Tucker decomposition is unique up to the signs of the factor columns.
    """
    samples, rank = scales.shape
    core = torch.zeros(samples, rank, rank, rank, dtype=torch.float64)
    for i in range(rank):
        core[:, i, i, i] = scales[:, i]
    factors = [orthonormal(6, rank, generator), orthonormal(4, rank, generator), orthonormal(5, rank, generator)]
    return torch.einsum("nijk,ci,hj,wk->nchw", core, *factors), core, factors


def test_full_mode_recovers_a_known_core_with_spatial_signs_fixed_and_channel_signs_left_open() -> None:
    generator = torch.Generator().manual_seed(0)
    scales = torch.tensor([[5.0, 3.0, 1.0], [4.0, -2.0, 0.5]], dtype=torch.float64)
    features, core, (_, height, width) = known_tucker_batch(scales, generator)
    # The spatial rule: negate core slice j along a spatial mode where column j's largest entry is negative.
    height_signs = torch.sign(height.gather(0, height.abs().argmax(0, keepdim=True)))[0]
    width_signs = torch.sign(width.gather(0, width.abs().argmax(0, keepdim=True)))[0]
    expected = core * height_signs.view(1, 1, 3, 1) * width_signs.view(1, 1, 1, 3)
    found = tucker_cores(features, [3, 3, 3], n_iter_max=3)
    channel_signs = torch.sign((found * expected).sum(dim=(0, 2, 3)))  # a channel slice may come negated
    assert torch.allclose(found * channel_signs.view(1, 3, 1, 1), expected, atol=1e-10)


def test_spatial_sign_rule_makes_each_columns_largest_entry_positive() -> None:
    factor = torch.tensor([[0.6, -0.1], [-0.8, 0.3], [0.0, -0.9]])
    assert torch.equal(fix_signs(factor), torch.tensor([[-0.6, 0.1], [0.8, -0.3], [0.0, 0.9]]))
    assert torch.equal(fix_signs(-factor), fix_signs(factor))


def test_aligned_l1_compares_each_channel_slice_as_is_or_negated_whichever_is_closer() -> None:
    # Cores (N=2, rc=2, 1, 2). Sample 1: slice 0 |s - t| = 0 + 1 = 1, |s + t| = 2 + 3 = 5;
    # slice 1 |s - t| = 6 + 2 = 8, |s + t| = 0. Sample 2: slice 0 2 vs 0; slice 1 0 vs 2.
    student = torch.tensor([[[[1.0, 2.0]], [[3.0, -1.0]]], [[[1.0, 0.0]], [[0.0, 1.0]]]])
    teacher = torch.tensor([[[[1.0, 1.0]], [[-3.0, 1.0]]], [[[-1.0, 0.0]], [[0.0, 1.0]]]])
    # Full mode: one sign per channel column for the batch: min(1 + 2, 5 + 0) + min(8 + 0, 0 + 2) = 5, / 8 entries.
    assert aligned_l1(student, teacher, per_sample=False).item() == pytest.approx(5 / 8)
    # Samplewise: one per sample and column: min(1, 5) + min(8, 0) + min(2, 0) + min(0, 2) = 1, / 8.
    assert aligned_l1(student, teacher, per_sample=True).item() == pytest.approx(1 / 8)
    assert aligned_l1(student, -student, per_sample=False).item() == 0.0


@pytest.mark.parametrize("mode", ["full", "samplewise"])
def test_tucker_scores_a_student_equal_to_its_teacher_exactly_zero(mode: str) -> None:
    # Both cores are the same projection now; the old teacher core (tensorly's own) left 1.9e-7 here in full mode.
    method = method_class("tucker")(defaults("tucker", mode=mode), context((8, 4, 4), (8, 4, 4)))
    assert isinstance(method.projection, nn.Identity)
    features = torch.randn(6, 8, 4, 4, generator=torch.Generator().manual_seed(3))
    terms = method.loss(ModelOutput(torch.zeros(6, 3), {"layer3": features.clone().requires_grad_()}),
                        ModelOutput(torch.zeros(6, 3), {"layer3": features}), Batch(torch.zeros(6), torch.zeros(6, dtype=torch.long)))
    assert terms["tucker"].item() == 0.0


@pytest.mark.parametrize("mode", ["full", "samplewise"])
def test_tucker_scores_a_channel_rotated_copy_of_the_teacher_near_zero(mode: str) -> None:
    # The student's map is the teacher's with its channels mixed by an orthogonal Q, a change of basis
    # that a 1x1 projection could undo. In float64 the term comes out near 3e-14 in both modes; the old
    # rule, signs read off each channel factor column, scored this 1.80 (full) and 1.29 (samplewise).
    generator = torch.Generator().manual_seed(0)
    teacher_features = torch.randn(6, 8, 4, 4, generator=generator, dtype=torch.float64)
    rotation = torch.linalg.qr(torch.randn(8, 8, generator=generator, dtype=torch.float64))[0]
    student_features = torch.einsum("dc,nchw->ndhw", rotation, teacher_features)
    method = method_class("tucker")(defaults("tucker", mode=mode), context((8, 4, 4), (8, 4, 4)))
    terms = method.loss(ModelOutput(torch.zeros(6, 3), {"layer3": student_features.requires_grad_()}),
                        ModelOutput(torch.zeros(6, 3), {"layer3": teacher_features}), Batch(torch.zeros(6), torch.zeros(6, dtype=torch.long)))
    assert terms["tucker"].item() < 1e-10
    # The cores do differ by channel-slice signs: compared without the alignment they are far apart.
    with torch.no_grad():
        assert F.l1_loss(method.cores(student_features), method.cores(teacher_features)).item() > 0.05


def test_full_mode_keeps_samples_separate() -> None:
    # Rescaling sample 0 keeps the column norms of the scales in the same order, so the shared factors
    # stay put and sample 1's core must not move.
    scales = torch.tensor([[5.0, 3.0, 1.0], [4.0, -2.0, 0.5]], dtype=torch.float64)
    features, _, _ = known_tucker_batch(scales, torch.Generator().manual_seed(2))
    changed = features.clone()
    changed[0] *= 1.5
    assert torch.allclose(tucker_cores(features, [3, 3, 3], 3)[1], tucker_cores(changed, [3, 3, 3], 3)[1], atol=1e-5)
    # And through the gradient: the batch mode is never mixed, so sample 1's core does not read sample 0.
    noisy = torch.randn(3, 6, 4, 5, requires_grad=True)
    tucker_cores(noisy, [3, 2, 2], 2)[1].abs().sum().backward()
    assert noisy.grad is not None
    assert torch.count_nonzero(noisy.grad[0]) == 0 and torch.count_nonzero(noisy.grad[1]) > 0


def test_samplewise_and_full_cores_have_the_same_shape() -> None:
    features = torch.randn(4, 6, 4, 5)
    assert samplewise_tucker_cores(features, [3, 2, 2], 2).shape == tucker_cores(features, [3, 2, 2], 2).shape == (4, 3, 2, 2)


@pytest.mark.parametrize(("mode", "ranks", "teacher", "student"), [
    ("full", [5, 2, 2], (4, 2, 2), (8, 2, 2)),  # channel rank above the teacher's channels
    ("full", [3, 3, 2], (8, 4, 4), (8, 2, 2)),  # height rank above the student's height
    ("samplewise", [5, 2, 2], (8, 2, 2), (8, 2, 2)),  # one (8, 2, 2) sample has channel rank at most 4
])
def test_tucker_rejects_ranks_larger_than_the_tensors(mode: str, ranks: list[int], teacher: tuple[int, ...], student: tuple[int, ...]) -> None:
    with pytest.raises(MethodConfigError) as error:
        method_class("tucker")(defaults("tucker", mode=mode, ranks=ranks), context(teacher, student))
    assert error.value.key == "ranks"


@pytest.mark.parametrize("mode", ["full", "samplewise"])
def test_tucker_projects_a_channel_mismatch_and_sends_gradients_to_the_student_only(mode: str) -> None:
    method = method_class("tucker")(defaults("tucker", mode=mode, ranks=[3, 2, 2]), context((8, 2, 2), (6, 2, 2)))
    assert isinstance(method.projection, nn.Conv2d)
    student_features = torch.randn(4, 6, 2, 2, requires_grad=True)
    teacher_features = torch.randn(4, 8, 2, 2, requires_grad=True)
    terms = method.loss(ModelOutput(torch.zeros(4, 3), {"layer3": student_features}),
                        ModelOutput(torch.zeros(4, 3), {"layer3": teacher_features}), Batch(torch.zeros(4), torch.tensor([0, 1, 2, 0])))
    terms["tucker"].backward()
    assert teacher_features.grad is None
    assert student_features.grad is not None and torch.isfinite(student_features.grad).all()
    assert student_features.grad.abs().sum() > 0
    assert method.projection.weight.grad is not None and method.projection.weight.grad.abs().sum() > 0


# --- every method trains ------------------------------------------------------------------------------

@pytest.mark.parametrize(("name", "overrides"), [
    ("vanilla", {}), ("kd", {}), ("ft", {}), ("tucker", {"ranks": [4, 2, 2]}), ("tucker", {"mode": "samplewise", "ranks": [4, 2, 2]}),
])
def test_a_few_steps_on_student_side_tensors_lower_the_total_loss(name: str, overrides: dict[str, object]) -> None:
    torch.manual_seed(0)
    method = method_class(name)(defaults(name, **overrides), context((8, 2, 2), (6, 2, 2)))
    logits = torch.randn(8, 3, requires_grad=True)
    features = torch.randn(8, 6, 2, 2, requires_grad=True)
    teacher = ModelOutput(torch.randn(8, 3), {"layer3": torch.relu(torch.randn(8, 8, 2, 2))})
    batch = Batch(torch.zeros(8), torch.randint(0, 3, (8,)))
    optimizer = torch.optim.Adam([logits, features, *method.parameters()], lr=0.01)
    method.train()
    totals = []
    for _ in range(15):
        total = sum(method.loss(ModelOutput(logits, {"layer3": features}), teacher, batch).values())
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
        totals.append(total.item())
    assert all(math.isfinite(value) for value in totals)
    assert totals[-1] < totals[0]


@pytest.mark.parametrize("name", ["kd", "ft", "tucker"])
def test_the_teacher_output_never_receives_gradients(name: str) -> None:
    method = method_class(name)(defaults(name, ranks=[4, 2, 2]) if name == "tucker" else defaults(name), context((8, 2, 2), (6, 2, 2)))
    teacher_logits = torch.randn(4, 3, requires_grad=True)
    teacher_features = torch.randn(4, 8, 2, 2, requires_grad=True)
    student = ModelOutput(torch.randn(4, 3, requires_grad=True), {"layer3": torch.randn(4, 6, 2, 2, requires_grad=True)})
    terms = method.loss(student, ModelOutput(teacher_logits, {"layer3": teacher_features}), Batch(torch.zeros(4), torch.tensor([0, 1, 2, 0])))
    sum(terms.values()).backward()
    assert teacher_logits.grad is None and teacher_features.grad is None
