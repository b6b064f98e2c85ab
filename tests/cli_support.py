"""Running the ``segpipe`` command in-process, as a user's shell would: its exit code and stderr."""

from __future__ import annotations

import sys
from dataclasses import dataclass

import pytest


@dataclass
class Outcome:
    code: int
    stderr: str

    @property
    def errors(self) -> list[str]:
        return [ln for ln in self.stderr.splitlines() if ln.lower().startswith("error:")]


def run_inprocess(
    args: list[str], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> Outcome:
    from segpipe.cli import main

    monkeypatch.setattr(sys, "argv", ["segpipe", *args])
    monkeypatch.delenv("SEGPIPE_DEBUG", raising=False)
    capsys.readouterr()
    try:
        main()
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    return Outcome(code, capsys.readouterr().err)
