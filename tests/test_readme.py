"""Every Python example of the README runs as written (issue 12 point 30), on generated images placed
where the examples expect them: good/*.png (normal images), a.png and b.png (images to score)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)


def test_readme_has_python_examples():
    assert python_blocks(), "the README's Python examples were not found"


@pytest.mark.parametrize("i", range(len(python_blocks())))
def test_p30_readme_python_example_runs(i, tmp_path, monkeypatch, capsys):
    from insightad.data.synthetic import make_image

    (tmp_path / "good").mkdir()
    for k in range(6):
        make_image("disc", None, size=64, seed=100 + k)[0].save(tmp_path / "good" / f"{k:03d}.png")
    make_image("disc", None, size=64, seed=200)[0].save(tmp_path / "a.png")
    make_image("disc", "blob", size=64, seed=201)[0].save(tmp_path / "b.png")
    monkeypatch.chdir(tmp_path)
    exec(compile(python_blocks()[i], f"README.md python block {i + 1}", "exec"), {"__name__": "__readme__"})


def paragraph(start: str) -> str:
    """The README paragraph (up to the next blank line) that begins with ``start``."""
    text = README.read_text(encoding="utf-8")
    i = text.index(start)
    end = text.find("\n\n", i)
    return text[i:end if end >= 0 else len(text)]


def test_readme_names_every_batch_column():
    """The README's list of batch's columns is the table's schema (map and overlay were left out)."""
    pytest.importorskip("pyarrow")
    from insightad.apps.batch_store import SCHEMA

    listed = paragraph("`batch` writes one Parquet row per input")
    assert [c for c in SCHEMA.names if not re.search(rf"\b{c}\b", listed)] == []


def test_readme_serve_answer_has_the_answers_fields():
    """The example answer of `/infer` in the README holds every field an answer without a heatmap has."""
    import json

    from insightad.apps.serve.schemas import InferResponse

    line = next(ln for ln in README.read_text(encoding="utf-8").splitlines() if ln.startswith('# {"Anomaly"'))
    shown = set(json.loads(line[2:]))
    assert shown == {k for k in InferResponse.model_fields if not k.startswith("heatmap")}
