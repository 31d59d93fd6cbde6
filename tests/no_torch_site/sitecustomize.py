"""Loaded by Python at start-up when this folder is on PYTHONPATH (tests/test_runtime_only.py): from then
on importing PyTorch, timm, torchvision or kornia raises, as in an install without the [train] extra."""

import sys

BLOCKED = ("torch", "timm", "torchvision", "kornia")


class _NoTorch:
    """A meta-path finder that refuses the blocked packages and their submodules."""

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {name!r} (blocked: runtime-only test)", name=name)
        return None


sys.meta_path.insert(0, _NoTorch())
