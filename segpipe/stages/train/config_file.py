"""Settings files: a YAML mapping of settings, read with one-line errors naming the file.

``segpipe train --config`` reads its training settings with :func:`read_mapping`, and
the flows read region descriptions and manifests with it, so every settings file is
refused the same way: missing, a folder, not text, not YAML (with the line), empty,
or not a mapping.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from segpipe.errors import InputError, MissingInputError

__all__ = ["read_mapping"]


def read_mapping(path: str | Path) -> dict[str, Any]:
    """The mapping of settings a YAML file holds.

    Raises:
        MissingInputError: The file does not exist.
        InputError: It is a folder, not text, not valid YAML, empty, or holds something
            other than a mapping (a list, a number, ...).
    """
    p = Path(path)
    if p.is_dir():
        raise InputError(f"{p} is a folder: name a YAML file")
    if not p.is_file():
        raise MissingInputError(f"{p} does not exist")
    try:
        data = yaml.safe_load(p.read_text())
    except UnicodeDecodeError:
        raise InputError(f"{p} is not a text file: expected YAML") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise InputError(f"{p} is not valid YAML{where}: {' '.join(str(problem).split())}") from exc
    if data is None:
        raise InputError(f"{p} is empty: it must hold a mapping of settings")
    if not isinstance(data, dict):
        raise InputError(f"{p} must hold a mapping of settings (name: value), not a {type(data).__name__}")
    return data
