"""Hardening p56: the user documentation walked as a new user would (README.md, docs/*.md but benchmarks.md).

What the walk found:

- ``serve --help`` printed ``about 20%% more requests/s`` for ``--memory-arena``: the help text escaped its
  percent sign itself and the option builder escapes every help text again; its figures (20%, 435 MB) also
  differed from docs/serve.md's measurement (28.2 vs 24.5 requests/s: 15%; 594 vs 437 MB).
- The exported graph's decode contract (``decode.formats`` in its ONNX metadata, what a program in another
  language reads) said ``TIFF (first frame)``, while ``load_image`` refuses a TIFF of several pages and an
  animated PNG of several frames, as docs/onnx.md says.
- tests/test_readme.py ran the README's Python examples but not its two set-up commands (``make demo``,
  ``make test``): what they do is checked here from make's dry run, which runs nothing.
- The README's code-layout table had no row for the ``scoring`` layer (``Prediction``, ``Scorer`` and
  ``iter_predict``, which it placed in methods/base.py) nor for ``lazy_imports``.
- The README's CSV guard listed =, +, -, @; cells starting with a tab or a carriage return are guarded too,
  and plain numbers are not.
- docs/decisions.md (no test: prose) said only tiled PatchCore was validated on one held-out fold; every tiled
  model is. docs/onnx.md's C++ example included <regex> (unused) instead of <string>.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from PIL import Image

from insightad.cli import build_parser, main
from insightad.errors import InsightADError

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
COMMANDS = ("train", "predict", "calibrate", "evaluate", "sort", "batch", "demo", "info", "serve", "export",
            "augment")
METHODS = ("baseline", "padim", "patchcore", "svdd", "autoencoder", "ensemble", "ssl", "auto")


def help_text(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """What ``insightad ARGV --help`` prints."""
    with pytest.raises(SystemExit) as e:
        main([*argv, "--help"])
    assert e.value.code == 0
    return capsys.readouterr().out


# ----------------------------------------------------------------------------- help texts
@pytest.mark.parametrize("argv", [[c] for c in COMMANDS] + [["train", "--method", m] for m in METHODS])
def test_p56_no_help_shows_a_doubled_percent_sign(argv, capsys):
    """Help texts are escaped for argparse once, by the option builder: ``20%%`` showed as typed."""
    assert "%%" not in help_text(argv, capsys)


def test_p56_memory_arena_help_quotes_the_serve_docs_figures():
    """``--memory-arena``'s help and docs/serve.md give the same measurement (594 against 437 MB resident)."""
    p = build_parser(["serve"])
    sub = next(a for a in p._actions if isinstance(a, argparse._SubParsersAction)).choices["serve"]
    text = next(a.help for a in sub._actions if "--memory-arena" in a.option_strings) or ""
    docs = (ROOT / "docs" / "serve.md").read_text(encoding="utf-8")
    for figure in ("28.2", "24.5", "594", "437 MB"):  # requests/s and resident MB with and without the arena
        assert figure in text and figure in docs, figure


# ----------------------------------------------------------------------------- the graph's decode contract
def test_p56_graph_decode_contract_refuses_what_load_image_refuses(tmp_path):
    """The contract in the graph's metadata said TIFFs were read on their first frame; load_image refuses a TIFF
    of several pages, and the contract now says so (and the same of animated PNGs)."""
    from insightad.data.images import load_image
    from insightad.inference.export import DECODE_CONTRACT

    pages = [Image.new("RGB", (16, 16), c) for c in ("red", "blue")]
    pages[0].save(tmp_path / "two.tif", save_all=True, append_images=pages[1:])
    with pytest.raises(InsightADError, match="2 pages"):
        load_image(tmp_path / "two.tif")
    formats = DECODE_CONTRACT["formats"]
    assert "TIFF (first frame)" not in formats
    assert "several pages" in formats and "animated PNG" in formats


def test_p56_exported_graph_carries_the_contract(baseline_model, tmp_path):
    """What docs/onnx.md's C++ and Node.js examples read exists in an exported graph: input ``images``, output
    ``scores``, plain keys threshold/score_scale/channels and the JSON entry ``insightad`` with the decode contract."""
    ort = pytest.importorskip("onnxruntime")
    from insightad.inference.export import DECODE_CONTRACT

    out = tmp_path / "m.onnx"
    assert main(["export", "--model", str(baseline_model), "--format", "onnx", "--out", str(out)]) == 0
    s = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert [i.name for i in s.get_inputs()] == ["images"] and [o.name for o in s.get_outputs()] == ["scores"]
    meta = s.get_modelmeta().custom_metadata_map
    assert {"threshold", "score_scale", "channels"} <= set(meta)
    entry = json.loads(meta["insightad"])
    assert entry["decode"] == DECODE_CONTRACT
    assert float(meta["threshold"]) == pytest.approx(entry["threshold"])


# ----------------------------------------------------------------------------- the README's set-up commands
def setup_commands() -> list[str]:
    """The commands of the README's set-up block (``make demo``, ``make test``)."""
    text = README.read_text(encoding="utf-8")
    block = text[text.index("## Install, demo, test"):]
    block = re.search(r"```bash\n(.*?)```", block, flags=re.S)
    assert block, "the README's set-up block was not found"
    return [ln.split("#")[0].strip() for ln in block.group(1).splitlines() if ln.strip()]


def dry_run(target: str, venv: Path) -> str:
    """What ``make TARGET`` would run with a venv that does not exist yet (make -n runs nothing)."""
    done = subprocess.run(["make", "-n", "--no-print-directory", "-C", str(ROOT), f"VENV={venv}", target], capture_output=True,
                          text=True, timeout=60, check=True)
    return done.stdout


def test_p56_readme_setup_commands_are_make_targets():
    assert setup_commands() == ["make demo", "make test"]


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_p56_make_demo_installs_pinned_then_runs_the_demo(tmp_path):
    """``make demo``: creates the venv, installs with the constraints and the README's own extras, runs the demo."""
    venv = tmp_path / "venv"
    lines = dry_run("demo", venv).splitlines()
    extras = re.search(r'pip install -c constraints\.txt -e "(\.\[[^\]]+\])"', README.read_text(encoding="utf-8"))
    assert extras, "the README's own install command was not found"
    assert any(ln.endswith(f"-m venv {venv}") for ln in lines)
    assert any(f'-m pip install --quiet -c constraints.txt -e "{extras.group(1)}"' in ln for ln in lines)
    assert lines[-1] == f"{venv}/bin/insightad demo"
    assert not venv.exists()


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_p56_make_test_runs_every_check_the_readme_names(tmp_path):
    """``make test``: the same install, then ruff, the import layers, mypy, the test suite and the wheel test."""
    venv = tmp_path / "venv"
    text = dry_run("test", venv)
    order = [f"{venv}/bin/ruff check src tests", f"{venv}/bin/lint-imports", f"{venv}/bin/mypy",
             f"{venv}/bin/python -m pytest\n", "tests/test_runtime_only.py::test_runtime_only_install"]
    at = [text.find(step) for step in order]
    assert -1 not in at and at == sorted(at), dict(zip(order, at))
    assert "-m pip install --quiet -c constraints.txt" in text
    assert not venv.exists()


# ----------------------------------------------------------------------------- the README's code layout
def layout_rows() -> list[list[str]]:
    """The modules each row of the README's code-layout table names, top to bottom (``cli``, ``model_file``, ...)."""
    text = README.read_text(encoding="utf-8")
    table = text[text.index("| layer (top to bottom)"):].split("\n\n")[0].splitlines()[2:]
    return [[n.rstrip("/").removesuffix(".py") for n in re.findall(r"`([^`]+)`", row.split("|")[1])] for row in table]


def test_p56_readme_code_layout_names_every_package_in_layer_order():
    """The table left out the ``scoring`` layer (and ``lazy_imports``) and put ``iter_predict`` in methods/base.py."""
    tomllib = pytest.importorskip("tomllib")
    config = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    layers = next(c["layers"] for c in config["tool"]["importlinter"]["contracts"] if c["type"] == "layers")
    order = {m.strip().removeprefix("insightad."): i for i, layer in enumerate(layers) for m in layer.split("|")}
    rows = layout_rows()
    named = [m for row in rows for m in row]
    pkg = ROOT / "src" / "insightad"
    present = {p.stem for p in pkg.glob("*.py") if not p.stem.startswith("__")} | {
        p.name for p in pkg.iterdir() if (p / "__init__.py").exists()}
    assert present - set(named) == set() and set(named) - present == set()
    assert [order[m] for m in named] == sorted(order[m] for m in named)
    assert "iter_predict" in next(ln for ln in README.read_text(encoding="utf-8").splitlines()
                                  if ln.startswith("| `scoring/`"))


# ----------------------------------------------------------------------------- the README's CSV guard
def test_p56_readme_names_every_character_the_csv_guard_escapes():
    """The README listed =, +, -, @ as the starts that get a ``'``; tab and carriage return get one too."""
    from insightad.io import FORMULA_START, csv_cell

    text = README.read_text(encoding="utf-8")
    para = text[text.index("Every CSV the tool writes"):].split("\n\n")[0]
    words = {"\t": "a tab", "\r": "a carriage return"}
    for c in FORMULA_START:
        assert (words.get(c) or f"`{c}`") in para, repr(c)
        assert csv_cell(c + "x.png") == "'" + c + "x.png"
    assert "`-1.5`" in para and csv_cell("-1.5") == "-1.5"
