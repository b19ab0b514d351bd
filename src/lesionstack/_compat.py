"""Make timm importable offline next to a CPU-only torch, without touching a working CUDA install.

Two problems, both fixed here before the first `import timm`:

* Every torchvision wheel on PyPI is a CUDA build. Next to the CPU torch its C++ extension fails to load,
  and `import torchvision` dies with "operator torchvision::nms does not exist" while registering the
  fake (meta) kernels of `nms`/`qnms`. Defining those two op schemas first lets torchvision import; only
  its compiled ops (nms, roi_align...) stay unavailable, and lesionstack uses none of them. The patch is
  applied only when the extension really fails to load, so a user's matching CUDA torch+torchvision pair
  is left untouched.
* timm and huggingface_hub try the network for pretrained weights; `HF_HUB_OFFLINE=1` makes them fail at
  once instead of retrying for 45 s. lesionstack loads weights only from local files.
"""

from __future__ import annotations

import importlib.util
import os

_done = False


def set_offline_env() -> None:
    """Keep every library off the network (they honour these variables when they are imported)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")


def _torchvision_extension_loads() -> bool:
    import torch

    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return True  # no torchvision: nothing to patch
    for folder in spec.submodule_search_locations:
        for name in os.listdir(folder):
            if name.startswith("_C") and name.endswith((".so", ".pyd")):
                try:
                    torch.ops.load_library(os.path.join(folder, name))
                    return True
                except (OSError, RuntimeError):
                    return False
    return False


def ensure_timm_importable() -> None:
    """Call before importing timm or torchvision. Idempotent and cheap after the first call."""
    global _done
    if _done:
        return
    set_offline_env()
    import torch

    if not _torchvision_extension_loads():
        try:
            lib = torch.library.Library("torchvision", "DEF")  # noqa: F841 - must stay alive
            lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
            lib.define(
                "qnms(Tensor dets, Tensor scores, float iou_threshold)"
                " -> Tensor"
            )
            globals()["_torchvision_lib"] = lib
        except RuntimeError:
            pass  # already defined (another copy of this shim ran first)
    _done = True
