"""Issue 12 point 14: a closed stdout (``insightad predict --json ... | head``) ends quietly, no traceback."""

from __future__ import annotations

import sys

from insightad.cli import main


class ClosedPipe:
    """A stdout whose reader has gone away, as after ``| head -1``."""

    def write(self, text: str) -> int:
        raise BrokenPipeError(32, "Broken pipe")

    def flush(self) -> None:
        raise BrokenPipeError(32, "Broken pipe")


def test_p14_predict_json_into_closed_pipe(baseline_model, mvtec_dir, monkeypatch, capsys):
    images = sorted((mvtec_dir / "test" / "good").iterdir())[:3]
    monkeypatch.setattr(sys, "stdout", ClosedPipe())
    code = main(["predict", "--model", str(baseline_model), "--engine", "torch", "--json", *map(str, images)])
    assert code == 141 and "Traceback" not in capsys.readouterr().err


def test_p14_info_into_closed_pipe(baseline_model, monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdout", ClosedPipe())
    assert main(["info", "--model", str(baseline_model)]) == 141
    assert capsys.readouterr().err == ""
