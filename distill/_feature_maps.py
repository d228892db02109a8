"""Shape checks shared by the methods that compare feature maps (FT, Tucker, AT, VID, feature_only).

The planner already knows each tap name is valid; what it cannot know without building the models
is whether the tap is a (C, H, W) map, and pooled taps such as "pool" are (D,). The leading
underscore keeps this file out of the method registry.
"""
from __future__ import annotations

from typing import Any, Mapping

from distill.base import MethodConfigError, MethodContext


def feature_map_shape(context: MethodContext, params: Mapping[str, Any], key: str) -> tuple[int, int, int]:
    """The per-sample (C, H, W) of the tap named by ``params[key]`` ("teacher_tap" or "student_tap")."""
    side = key.split("_", 1)[0]
    shapes = context.teacher_tap_shapes if side == "teacher" else context.student_tap_shapes
    tap = params[key]
    if tap not in shapes:
        raise MethodConfigError(key, f"the {side} has no tap {tap!r}; it has {', '.join(sorted(map(str, shapes)))}")
    shape = tuple(shapes[tap])
    if len(shape) != 3:
        raise MethodConfigError(key, f"the {side} tap {tap!r} has shape {shape}; this method needs a (C, H, W) feature map")
    channels, height, width = shape
    return channels, height, width


def tap_shape(context: MethodContext, side: str, tap: str, key: str) -> tuple[int, ...]:
    """The per-sample shape of ``side``'s ("teacher" or "student") tap ``tap``; ``key`` names the setting
    that chose it, for the error when the model has no such tap."""
    shapes = context.teacher_tap_shapes if side == "teacher" else context.student_tap_shapes
    if tap not in shapes:
        raise MethodConfigError(key, f"the {side} has no tap {tap!r}; it has {', '.join(sorted(map(str, shapes)))}")
    return tuple(shapes[tap])


def map_shape(context: MethodContext, side: str, tap: str, key: str) -> tuple[int, int, int]:
    """The per-sample (C, H, W) of ``side``'s tap ``tap``, refusing taps that are not feature maps."""
    shape = tap_shape(context, side, tap, key)
    if len(shape) != 3:
        raise MethodConfigError(key, f"the {side} tap {tap!r} has shape {shape}; this method needs a (C, H, W) feature map")
    channels, height, width = shape
    return channels, height, width


def embedding_size(context: MethodContext, params: Mapping[str, Any], key: str) -> int:
    """The length D of the (D,) embedding tap named by ``params[key]`` ("teacher_tap" or "student_tap")."""
    side = key.split("_", 1)[0]
    shape = tap_shape(context, side, params[key], key)
    if len(shape) != 1:
        raise MethodConfigError(key, f"the {side} tap {params[key]!r} has shape {shape}; this method needs a (D,) embedding such as 'pool'")
    return shape[0]


def map_pairs(context: MethodContext, params: Mapping[str, Any]) -> list[tuple[tuple[int, int, int], tuple[int, int, int]]]:
    """The (teacher, student) (C, H, W) shapes of each pair of ``teacher_taps`` / ``student_taps``,
    refusing an empty list, lists of different lengths and taps that are not feature maps."""
    teacher_taps, student_taps = list(params["teacher_taps"]), list(params["student_taps"])
    if not teacher_taps:
        raise MethodConfigError("teacher_taps", "teacher_taps is empty; name at least one feature map")
    if len(teacher_taps) != len(student_taps):
        raise MethodConfigError(
            "student_taps",
            f"student_taps has {len(student_taps)} taps and teacher_taps {len(teacher_taps)}; they pair up in order",
        )
    return [
        (map_shape(context, "teacher", t_tap, "teacher_taps"), map_shape(context, "student", s_tap, "student_taps"))
        for t_tap, s_tap in zip(teacher_taps, student_taps)
    ]
