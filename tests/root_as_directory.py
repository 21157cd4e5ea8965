"""pytest plugin (loaded with -p from pyproject.toml): collect the repository root as a plain directory.

The root holds ComfyUI's entry point (__init__.py imports the nodes, which import comfy). Collect the root as a
plain directory, not as a Python package, so tests never import that entry point (they import the pack
through tests/pack.py) and run on machines without ComfyUI.
"""

from pathlib import Path

import pytest


def pytest_collect_directory(path, parent):
    if path == Path(__file__).resolve().parent.parent:
        return pytest.Dir.from_parent(parent, path=path)
    return None
