"""Every key a sweep file may set outside method params, with its type, limits and built-in default.

The defaults make a sweep of a name and three axes complete; they follow the CIFAR distillation
benchmarks (CRD's RepDistiller: SGD, lr 0.05, batch 64, weight decay 5e-4, 240 epochs, lr x0.1
after epochs 150, 180 and 210). ``RUNTIME`` keys say where and how fast a job runs, not what it
computes, so they are kept out of stage hashes: moving a run from CPU to GPU, or switching
channels-last or ``torch.compile`` on, must not retrain anything.
"""
from __future__ import annotations

from types import MappingProxyType
from typing import Mapping

from pipeline.fields import Field

STAGE_KINDS = (
    "prepare_data", "train_teacher", "pretrain_paraphraser", "fit_pca", "teacher_outputs", "train_student", "evaluate",
    "analyze",
)
CACHE_DTYPES = ("float16", "float32")
ANALYSIS_SPLITS = ("train", "test")
ANALYSED_MODELS = ("teacher", "student")
TOP_LEVEL_KEYS = ("name", "data_root", "axes", "defaults", "resources")
NAMED_AXES = ("dataset", "pair", "method", "seed")
REQUIRED_AXES = ("dataset", "pair", "method")
DEVICES = ("auto", "cpu", "cuda")
OPTIMIZERS = ("sgd", "adamw", "lion")
LR_SCHEDULES = ("cosine", "step", "constant", "onecycle")

SEED = Field("int", 0, min=0)

RUNTIME = {
    "device": Field("str", "auto", choices=DEVICES),
    "amp": Field("bool", False, help="bfloat16 autocast of the forward passes; CUDA only, off on a CPU"),
    "channels_last": Field(
        "bool", False,
        help="models and input batches in the channels-last (NHWC) memory layout; CUDA only, off on a CPU",
    ),
    "compile": Field(
        "bool", False,
        help="torch.compile of the student, teacher and method calls; where it fails the stage runs eager, "
             "with a one-line warning recorded in log.pkl (compile_fallback)",
    ),
    "cudnn_benchmark": Field(
        "bool", False, help="torch.backends.cudnn.benchmark for the stage process; CUDA only, off on a CPU",
    ),
}
"""Runtime switches of every stage that runs a network: teacher, student (and their pre-stages), evaluate and analyze."""
RUNTIME_KEYS = tuple(RUNTIME)

_TRAINING = {
    "init": Field(
        "init", "scratch",
        help="scratch, {torchvision: WEIGHTS_NAME} (optionally with file: PATH) or {checkpoint: PATH}: the "
             "starting weights (pipeline/initial_weights.py); never downloaded",
    ),
    "epochs": Field("int", 240, min=0, help="0 (teacher only, with init other than scratch): use the imported weights as they are"),
    "batch_size": Field("int", 64, min=1),
    "lr": Field("float", 0.05, min=0.0),
    "optimizer": Field("str", "sgd", choices=OPTIMIZERS),
    "momentum": Field("float", 0.9, min=0.0, max=1.0, help="sgd only"),
    "nesterov": Field("bool", False, help="sgd only, with momentum above 0"),
    "betas": Field(
        "list", None, item_type="float", length=2, min=0.0,
        help="adamw and lion: two numbers in [0, 1); null: the optimiser's own, adamw 0.9, 0.999, lion 0.9, 0.99",
    ),
    "weight_decay": Field("float", 5e-4, min=0.0, help="sgd: added to the gradient; adamw and lion: decoupled"),
    "lr_schedule": Field("str", "step", choices=LR_SCHEDULES),
    "warmup_epochs": Field(
        "int", 0, min=0, help="linear warm-up over the first warmup_epochs epochs, step by step; at most epochs",
    ),
    "pct_start": Field("float", 0.3, help="onecycle schedule: share of the steps spent raising the lr, in (0, 1)"),
    "milestones": Field(
        "list", None, item_type="int", min=1,
        help="step schedule: epochs after which the lr drops by gamma, increasing, each in 1..epochs; "
             "null: the CRD recipe's 150, 180, 210 of 240 epochs, scaled to epochs (halves round up)",
    ),
    "gamma": Field("float", 0.1, min=0.0, max=1.0, help="step schedule: factor of each lr drop"),
    "label_smoothing": Field("float", 0.0, min=0.0, max=1.0),
    "backbone_lr_scale": Field(
        "float", 1.0, min=0.0,
        help="fine-tuning: every layer but the classifier (fc) trains at lr x this (the feature-only KD recipe: 0.01)",
    ),
    "augment": Field("bool", True),
    **RUNTIME,
}

SECTIONS: Mapping[str, Mapping[str, Field]] = MappingProxyType({
    "data": {
        "val_fraction": Field("float", 0.1, min=0.0, max=0.9),
        "split_seed": Field("int", 0, min=0),
        "subset_size": Field(
            "int", None, min=1,
            help="the student trains on this many images of the training split, stratified and seeded by "
                 "split_seed (the teacher on all of it); null: all of it",
        ),
    },
    # The student's label smoothing belongs to its method (vanilla's label_smoothing param), so
    # that KD's cross-entropy term keeps its published, unsmoothed form.
    "teacher": {**_TRAINING, "seed": SEED},
    "student": {key: field for key, field in _TRAINING.items() if key != "label_smoothing"},
    # A teacher_outputs stage (stages/teacher_outputs.py) per teacher and batch sequence, read by
    # every student of a method that reads only the teacher's logits (METHOD teacher_outputs_only,
    # no teacher taps), and with features: true by those that read its tapped features too.
    "teacher_cache": {
        "enabled": Field(
            "bool", False,
            help="compute the teacher's logits once per (teacher, data, seed, batch size, augmentation, epochs) "
                 "and let every logit-only student (kd, dkd, dist, ckd) read them instead of running the teacher",
        ),
        "dtype": Field("str", "float16", choices=CACHE_DTYPES,
                       help="float32 gives the uncached run's losses bit for bit (on a CPU), at twice the size"),
        "limit_gb": Field("float", 20.0, min=0.0, help="plan refuses a sweep whose cache stages hold more than this"),
        "methods": Field(
            "list", None, item_type="str",
            help="the methods (axis values, e.g. kd or kd+dist) whose students read the cache; null: every one that can",
        ),
        "features": Field(
            "bool", False,
            help="also cache the teacher's features at its students' taps, for methods that read nothing else of it "
                 "(METHOD teacher_outputs_only with teacher taps): large, so meant for augmentation off (one row)",
        ),
        "top_k": Field(
            "int", None, min=1,
            help="keep each sample's k largest teacher logits (and one stand-in logit for the other classes) "
                 "instead of all: ImageNet's 1,000 logits take 2 kB a sample an epoch, 10 take 44 bytes",
        ),
    },
    "evaluate": {"batch_size": Field("int", 256, min=1), **RUNTIME},
    # An analyze stage (stages/analyze.py) per trained model, when stats or geometry is on.
    "analysis": {
        "stats": Field("bool", False, help="feature-map statistics per tap (analysis/feature_stats.py)"),
        "geometry": Field(
            "bool", False, help="layer geometry per tap: separation, information, efficiency, quality, intrinsic "
                                "dimension (analysis/geometry.py)",
        ),
        "taps": Field(
            "list", None, tap="model",
            help="tap names or generalised-layer indices, of every analysed model; null: every generalised layer",
        ),
        "models": Field("list", list(ANALYSED_MODELS), item_type="str", choices=ANALYSED_MODELS,
                        help="which trained models get an analyze stage"),
        "samples": Field(
            "int", 5000, min=1,
            help="images per split, class-balanced (samples // classes per class) and seeded; at most the split",
        ),
        "splits": Field("list", list(ANALYSIS_SPLITS), item_type="str", choices=ANALYSIS_SPLITS,
                        help="train: the un-augmented training split (validation hold-out excluded)"),
        "seed": Field("int", 0, min=0, help="draws the sample; teacher and student of one data set see the same images"),
        # The feature-only KD code's formulas, where ours differ (analysis/geometry.py says why).
        "legacy_include_diag": Field(
            "bool", False, help="separation counts i = j in the within-class mean, as the feature-only KD code does",
        ),
        "legacy_summed_count": Field(
            "bool", False, help="information keeps, in every class, as many eigenvalues as the classes' 95% counts "
                                "summed, as the code does",
        ),
        "legacy_log5": Field(
            "bool", False, help="information divides the entropy by ln 5, as the code does, not by the log of the "
                                "eigenvalues kept (which bounds it by 1)",
        ),
        "legacy_ambient_d": Field(
            "bool", False, help="efficiency's (N_train / pi)^(1/d) takes d = min(samples, flattened length), as the "
                                "code does, instead of the PCA intrinsic dimension",
        ),
        "batch_size": Field(
            "int", 64, min=1, help="images per forward pass; on 2 CPU cores 64 runs resnet32x4 1.4x faster "
                                   "than 256, whose activations overflow the caches",
        ),
        # No amp: bfloat16 features would change the float64 statistics under the same hash. No
        # compile: the forward passes are few, and each stops early from a hook.
        **{key: field for key, field in RUNTIME.items() if key not in ("amp", "compile")},
    },
})
"""Sections of ``defaults`` besides ``methods``; the student's seed is the ``seed`` axis."""

DEFAULTS_KEYS = (*SECTIONS, "methods")

RESOURCE_FIELDS: Mapping[str, Field] = MappingProxyType({
    "time_min": Field("int", 60, min=1),
    "cpus": Field("int", 2, min=1),
    "gpus": Field("int", 0, min=0, help="GPUs per node; train_teacher runs one rank per GPU (DDP) unless tasks says otherwise"),
    "tasks": Field("int", None, min=1, help="ranks per node of a train_teacher stage (default: gpus, or 1); "
                                           "gloo on CPUs, NCCL on GPUs"),
    "nodes": Field("int", None, min=1, help="nodes of a train_teacher stage's job (default 1)"),
    "mem_gb": Field("float", 4.0, min=0.0),
    "partition": Field("str"),
    "account": Field("str"),
    "qos": Field("str"),
    "constraint": Field("str"),
    "extra_sbatch": Field("list", item_type="str"),
    "queue": Field("str"),
    "pbs_dialect": Field("str", choices=("pro", "torque")),
})
"""Scheduler requests. Keys without a default are optional; null removes one set under ``default``."""

MULTI_RANK_KINDS = ("train_teacher", "train_student")
"""Stage kinds that may run as several ranks (stages/distributed.py). A student's method may keep
per-sample state (CRD's memory banks) that ranks would each update with only their own samples."""


def tasks_per_node(resources: Mapping[str, object]) -> int:
    """Ranks per node a stage's resources ask for: ``tasks``, else one per GPU, else one."""
    return int(resources.get("tasks") or max(int(resources.get("gpus") or 0), 1))


def rank_count(resources: Mapping[str, object]) -> int:
    """All ranks of a stage's job: nodes x tasks per node."""
    return int(resources.get("nodes") or 1) * tasks_per_node(resources)

RESOURCE_SECTIONS = ("default", *STAGE_KINDS)
