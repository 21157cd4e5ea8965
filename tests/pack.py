"""Import this repository as a package under a fixed name, whatever its folder is called.

ComfyUI imports the pack by its folder name (any name); tests and benchmarks import it as ``sparse_video_attn``
without running the top-level ``__init__`` (which registers ComfyUI nodes), so kernels/ and core/ can be tested
on a machine without ComfyUI.
"""

import importlib
import sys
import types
from pathlib import Path

PACK_NAME = "sparse_video_attn"
REPO_ROOT = Path(__file__).resolve().parent.parent


def import_pack(submodule: str):
    if PACK_NAME not in sys.modules:
        pkg = types.ModuleType(PACK_NAME)
        pkg.__path__ = [str(REPO_ROOT)]
        sys.modules[PACK_NAME] = pkg
    return importlib.import_module(f"{PACK_NAME}.{submodule}")
