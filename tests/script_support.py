"""Loading a script that is not part of a package (a benchmark, a deploy file) as a module."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType


def load_script(path: Path, name: str) -> ModuleType:
    """Import the file at ``path`` as the module ``name``.

    The module is registered in ``sys.modules`` before it runs: dataclasses look their
    module up while the class is built.
    """
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec and spec.loader, path
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module
