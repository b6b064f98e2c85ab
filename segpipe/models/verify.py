"""Checking a package's weights in a child process, so that the caller never imports torch.

The predict driver checks the whole package (weights loaded into the network) before it
writes anything or starts a cluster. Doing that in the driver imported torch there: about
550 MB of resident memory for a process that only plans, submits and tracks tasks, and
hosts the local scheduler (``docs/benchmarks.md``, issue 17). A short-lived child
(``python -m segpipe.models.verify PACKAGE``) loads the weights instead and reports the
package's hash or the error it met, which is raised here with its own class and message.
A process that has already imported torch (an in-process run, a notebook that trained a
model) checks the package itself: a child would save it nothing.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from segpipe import errors
from segpipe.errors import EnvironmentFaultError, ModelPackageError, SegpipeError
from segpipe.models.fetch import local_package
from segpipe.models.loading import validate_package
from segpipe.models.package import model_hash, read_spec
from segpipe.models.spec import ModelSpec

__all__ = ["verify_package"]

# Package hashes a child verified for this process: a flow that predicts many regions
# with one package pays for the child once.
_VERIFIED: set[str] = set()


def verify_package(model_dir: str | Path, here: bool | None = None) -> tuple[ModelSpec, str]:
    """Check a package completely (as :func:`segpipe.models.loading.validate_package`).

    Args:
        model_dir: Package directory or ``s3://`` URL.
        here: Load the weights in this process (True) or in a child process (False);
            default: here only if this process has already imported torch.

    Returns:
        The package's spec and content hash.

    Raises:
        ModelPackageError: What is wrong, naming the package, the file and the field.
        EnvironmentFaultError: The child process could not run or died.
    """
    if here is None:
        here = "torch" in sys.modules
    if here:
        return validate_package(model_dir)
    local = local_package(model_dir)
    digest = model_hash(local)
    spec = read_spec(model_dir)  # a bad description is reported without starting a child
    if digest not in _VERIFIED:
        _check_in_child(str(model_dir), digest)
        _VERIFIED.add(digest)
    return spec, digest


def _check_in_child(model_dir: str, digest: str) -> None:
    """Load the package's weights in a child process; raise what it reports."""
    cmd = [sys.executable, "-m", "segpipe.models.verify", model_dir]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    except OSError as exc:
        msg = f"could not start a process to check model package {model_dir}: {exc}"
        raise EnvironmentFaultError(msg) from exc
    lines = done.stdout.strip().splitlines()
    try:
        report = json.loads(lines[-1]) if lines else None
    except json.JSONDecodeError:
        report = None
    if not isinstance(report, dict):
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise EnvironmentFaultError(
            f"checking model package {model_dir} in a child process failed (exit {done.returncode}): {tail}"
        )
    if "error" in report:
        raise _error_class(str(report["error"]))(str(report["message"]))
    if report.get("hash") != digest:
        raise ModelPackageError(f"model package {model_dir} changed while it was checked: rerun")


def _error_class(name: str) -> type[SegpipeError]:
    """The error class the child named (ModelPackageError for a name this segpipe lacks)."""
    cls = getattr(errors, name, None)
    if isinstance(cls, type) and issubclass(cls, SegpipeError):
        return cls
    return ModelPackageError


def _main(argv: list[str]) -> int:
    """Child side: check one package, print one JSON line with its hash or its error."""
    try:
        _, digest = validate_package(argv[0])
    except SegpipeError as exc:
        print(json.dumps({"error": type(exc).__name__, "message": str(exc)}))
        return 1
    print(json.dumps({"hash": digest}))
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
