"""Make ``import timm`` work with a CPU torch next to a CUDA build of torchvision.

timm imports torchvision, whose import registers fake kernels for the C++ ops
``torchvision::nms``/``qnms``. When torchvision's compiled extension does not
match the installed torch (a CPU torch beside the PyPI CUDA torchvision), those
ops are missing and the import raises. Declaring just the two op schemas lets
torchvision import (none of its ops are used here). On a machine where
torchvision loads normally nothing is defined, so there is no clash.
"""

from __future__ import annotations

import torch

_LIB: torch.library.Library | None = None  # kept alive: a collected Library unregisters its ops


def ensure_torchvision_importable() -> None:
    """Import torchvision, declaring its missing ``nms``/``qnms`` schemas only if the import fails."""
    global _LIB
    try:
        import torchvision  # noqa: F401

        return
    except RuntimeError as err:
        if "torchvision::" not in str(err):
            raise
    if _LIB is None:
        _LIB = torch.library.Library("torchvision", "DEF")
        _LIB.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        _LIB.define("qnms(Tensor qdets, Tensor scores, float iou_threshold) -> Tensor")
    import torchvision  # noqa: F401,F811
