"""Hardening p52: the command line as a demanding new user meets it.

Covered: ``~`` in every path option, whatever gives it (``--model=~/m``, a quoted "~/x", a --config file's string
or list, --config itself), expanded by one argparse type (it was expanded only by batch and sort);
``train --method auto --help`` sending the user to a --threshold-percentile auto does not have; two exports to
one ``--out OTHER.onnx`` (no lock: each said it wrote its graph, one replaced the other); the lock of a killed run
(taken over by the next run, also when a worker it forked lives on); two calibrates given one --out FILE.json;
an empty path (``--input "$DIR"``, DIR unset) taken for the working directory (``sort --input ''`` sorted it) or
for the default output; ``calibrate --labels /dev/null`` said 'labels file not found', ``--weights`` given a text
file 'cannot read weights (pop from empty list)'; a config value that is no string for a path or text option
(``model = 5``, ``data = ["a", "b"]``): a TypeError traceback; ``batch --input`` of a URL whose file system is
unknown (``htp://``) or not installed (``http://`` without aiohttp): a traceback; a --config file saved with a
UTF-8 byte-order mark (Windows Notepad): 'not valid TOML (Invalid statement (at line 1, column 1))';
``--threads 100000``: the process was killed for memory (now the machine's core count, with a warning);
``train --config ''`` refused by the pre-parser that reads --method, with a usage line naming ``__main__.py``.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from insightad.cli import COMMANDS, _subparser, build_parser, main
from insightad.cli.options import path_arg
from insightad.errors import InsightADError
from insightad.io import file_lock

# The metavars of options that name a file or folder (a threshold may be a JSON file).
PATH_METAVARS = {"PATH", "MODEL", "DIR", "IMAGE", "SOURCE", "RESULTS.parquet", "FILE.csv", "FILE.json", "FILE.onnx",
                 "FILE.toml", "VALUE|FILE.json", "CERT.pem", "KEY.pem"}


# ----------------------------------------------------------------------------- ~ in paths
@pytest.mark.parametrize("argv", [[c] for c in COMMANDS] + [["train", "--method", m] for m in ("padim", "svdd")])
def test_p52_every_path_option_expands_home(argv):
    """One type for every option that names a file or folder, so that no command is left out again."""
    p = _subparser(build_parser(argv), argv[0])
    paths = [a for a in p._actions if a.metavar in PATH_METAVARS]
    assert paths
    for a in paths:
        assert a.type is path_arg, f"{argv[0]} {a.option_strings or a.dest}"
    if argv[0] == "train" and len(argv) > 1:
        by_dest = {a.dest: a for a in p._actions}
        named = [by_dest[d] for d in ("checkpoint_dir", "weights") if d in by_dest]
        assert named and all(a.type is path_arg for a in named)


def test_p52_tilde_reaches_every_command_expanded(baseline_model, mvtec_dir, tmp_path, monkeypatch, capsys):
    """``predict --model=~/m`` was 'model file not found' (only batch and sort expanded ``~``); a --config file's
    ``model = "~/m"``, its ``images = ["~/a.png"]`` and ``--config=~/c.toml`` as well."""
    home = tmp_path / "home"
    home.mkdir()
    shutil.copy(baseline_model, home / "m.safetensors")
    image = sorted((mvtec_dir / "test" / "good").glob("*.png"))[0]
    shutil.copy(image, home / "a.png")
    (home / "data").symlink_to(mvtec_dir)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(tmp_path)
    assert main(["info", "--model=~/m.safetensors"]) == 0
    capsys.readouterr()
    assert main(["predict", "--json", "--model=~/m.safetensors", "~/a.png", "--image=~/a.png"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 2
    (home / "c.toml").write_text('[predict]\nmodel = "~/m.safetensors"\nimages = ["~/a.png"]\njson = true\n')
    assert main(["predict", "--config=~/c.toml"]) == 0
    assert json.loads(capsys.readouterr().out)["path"] == str(home / "a.png")
    assert main(["evaluate", "--model", "~/m.safetensors", "--data=~/data", "--json", "--report=~/rep"]) == 0
    assert (home / "rep" / "metrics.json").is_file()
    assert not (tmp_path / "~").exists()
    capsys.readouterr()


# ----------------------------------------------------------------------------- help
@pytest.mark.parametrize("method", ["auto", "baseline", "padim", "patchcore", "autoencoder", "svdd", "ensemble"])
def test_p52_threshold_help_names_only_flags_the_method_has(method):
    """``train --method auto --help``: --threshold-strategy's percentile was 'the method's --threshold-percentile',
    a flag auto does not have (its candidates use 99); now it says 99 there, and the flag elsewhere."""
    p = _subparser(build_parser(["train", "--method", method]), "train")
    flags = {s for a in p._actions for s in a.option_strings}
    helps = {a.dest: a.help or "" for a in p._actions}
    for dest in ("threshold_strategy", "threshold_percentile"):
        for flag in re.findall(r"--[a-z][a-z0-9-]*", helps.get(dest, "")):
            assert flag in flags, f"--method {method}: {dest}'s help names {flag}"
    assert ("99th percentile" in helps["threshold_strategy"]) == (method == "auto")


# ----------------------------------------------------------------------------- locks
def test_p52_second_export_to_one_graph_is_refused(baseline_model, tmp_path, capsys):
    """``export --out OTHER.onnx`` took no lock (only the graph beside the model file did, under the model's lock):
    a second writer of one graph is now refused at once, naming the holder's pid, and nothing is written."""
    other = tmp_path / "other.onnx"
    with file_lock(tmp_path / "other.onnx.lock", "a holder"):
        assert main(["export", "--model", str(baseline_model), "--out", str(other)]) == 1
    err = capsys.readouterr().err
    assert f"held by pid {os.getpid()}" in err and "choose another --out" in err and err.count("\n") == 1
    assert not other.exists() and not (tmp_path / "other.onnx.lock").exists()


HOLDER = """
import os, sys, time
from insightad.io import file_lock
with file_lock(sys.argv[1], "x"):
    if sys.argv[2] == "fork":
        r, w = os.pipe()
        if os.fork() == 0:  # a worker that outlives its parent (DataLoader, multiprocessing)
            os.write(w, b"x")  # os.fork has returned here: the at-fork handlers have run
            time.sleep(60)
            os._exit(0)
        os.read(r, 1)
    print("held", flush=True)
    time.sleep(60)
"""


@pytest.mark.parametrize("fork", ["", "fork"])
def test_p52_a_killed_runs_lock_is_taken_over(tmp_path, fork):
    """A run killed with SIGKILL leaves PATH.lock (its pid inside) and its lock ends with it: the next run takes
    the file over. A worker it had forked inherited the lock and kept it (refused, naming a pid that had ended)
    until it exited: forked children now close it."""
    lock = tmp_path / "out.lock"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(lock), fork], stdout=subprocess.PIPE, env=env,
                              start_new_session=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == b"held\n"
        with pytest.raises(InsightADError, match=f"held by pid {holder.pid}"):
            with file_lock(lock, "out"):
                pass
        holder.kill()
        holder.wait()
        assert lock.read_text().strip() == str(holder.pid)  # left behind by the killed run
        with file_lock(lock, "out"):
            assert lock.read_text().strip() == str(os.getpid())
        assert not lock.exists()
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(holder.pid, signal.SIGKILL)  # the forked worker too
        holder.wait()


def test_p52_readme_says_which_runs_lock_and_what_a_killed_one_leaves():
    """No user documentation said that writing commands refuse a second run on one output, nor what to do with
    a lock file a killed run left behind."""
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    section = text[text.index("### Two runs, one output"):text.index("## Data layouts")]
    for word in ("train", "calibrate", "export", "augment", "predict", "evaluate", "batch", "sort", ".lock",
                 ".insightad.lock", "pid", "killed", "takes the"):
        assert word in " ".join(section.split()), word


def test_p52_second_calibrate_to_one_threshold_file_is_refused(baseline_model, mvtec_dir, tmp_path, capsys):
    """``calibrate --out FILE.json`` took no lock of its own (only the model file's, not with --dry-run): two
    calibrates of two models given one --out each said they had written it. The second is now refused at once."""
    out = tmp_path / "t.json"
    with file_lock(tmp_path / "t.json.lock", "a holder"):
        assert main(["calibrate", "--model", str(baseline_model), "--data", str(mvtec_dir), "--dry-run",
                     "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert f"held by pid {os.getpid()}" in err and "choose another --out" in err and err.count("\n") == 1
    assert not out.exists() and not (tmp_path / "t.json.lock").exists()


# ----------------------------------------------------------------------------- bad inputs
@pytest.mark.parametrize("argv", [["sort", "--model", "m.safetensors", "--input", ""],
                                  ["predict", "--model", "m.safetensors", ""],
                                  ["info", "--model", ""],
                                  ["export", "--model", "m.safetensors", "--out", ""],
                                  ["train", "--data", ""]])
def test_p52_empty_path_is_refused(argv, tmp_path, monkeypatch, capsys):
    """An empty word for a path named the working directory ('.: no images found', ``sort --input ''`` sorted the
    working directory's images; ``info --model ''``: '.: is a folder') or, for an optional output, the default
    (``export --out ''`` wrote beside the model)."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    assert "expected a file or folder name, got an empty string" in capsys.readouterr().err


def test_p52_empty_path_in_config_file_is_refused(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a.toml").write_text('[sort]\nmodel = "m.safetensors"\ninput = "in"\nout = ""\n')
    (tmp_path / "b.toml").write_text('[predict]\nmodel = "m.safetensors"\nimages = [""]\n')
    assert main(["sort", "--config", "a.toml"]) == 1
    assert "key 'out'" in capsys.readouterr().err
    assert main(["predict", "--config", "b.toml"]) == 1
    assert "IMAGE: expected a file or folder name, got an empty string" in capsys.readouterr().err


def test_p52_labels_and_weights_that_are_no_regular_file(tmp_path):
    from insightad.backbones.weights import _load_file
    from insightad.decide.labels import read_labels

    with pytest.raises(InsightADError, match="not a regular file .* expected a labels file"):
        read_labels("/dev/null")
    with pytest.raises(InsightADError, match="is a folder, expected a labels file"):
        read_labels(tmp_path)
    with pytest.raises(InsightADError, match="is a folder, expected a weights file"):
        _load_file(tmp_path)
    (tmp_path / "notes.pth").write_text("some text\n")
    with pytest.raises(InsightADError, match=r"expected a \.safetensors file or a \.pth of tensors"):
        _load_file(tmp_path / "notes.pth")


@pytest.mark.parametrize("text, command, message", [
    ('model = 5\n', "info", "5: model file not found"),
    ('data = ["a", "b"]\n', "train", "key 'data': expected a file or folder name, got [\"a\", \"b\"]"),
    ('[info]\nmodel = true\n', "info", "key 'model': expected a file or folder name, got true"),
    ('[serve]\nmodel = "m.safetensors"\nhost = ["a"]\n', "serve", "key 'host': expected a string, got [\"a\"]"),
])
def test_p52_config_value_of_the_wrong_kind_for_a_path(text, command, message, tmp_path, monkeypatch, capsys):
    """A TOML number, boolean or list where a path (or another text) goes reached os.fspath: a traceback."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "c.toml").write_text(text)
    assert main([command, "--config", "c.toml"]) == 1
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_p52_config_threshold_number_still_a_number(baseline_model, mvtec_dir, tmp_path, capsys):
    """``threshold = 0.5`` in a config file (a number, not a path) still overrides the threshold."""
    (tmp_path / "c.toml").write_text("threshold = 0.5\n")
    image = sorted((mvtec_dir / "test" / "good").glob("*.png"))[0]
    assert main(["predict", "--config", str(tmp_path / "c.toml"), "--model", str(baseline_model), "--json",
                 str(image)]) == 0
    assert json.loads(capsys.readouterr().out)["threshold"] == 0.5


def test_p52_batch_url_of_an_unknown_or_missing_file_system(tmp_path, monkeypatch):
    pytest.importorskip("fsspec")
    import fsspec

    from insightad.apps.batch_sources import list_source

    with pytest.raises(InsightADError, match="htp://x/a.png: Protocol not known: htp .*expected a local path"):
        list_source("htp://x/a.png")

    def missing(spec):
        raise ImportError('HTTPFileSystem requires "requests" and "aiohttp" to be installed')

    monkeypatch.setattr(fsspec.core, "url_to_fs", missing)
    with pytest.raises(InsightADError, match="reading http:// inputs needs a package this install does not have"):
        list_source("http://example.com/a.png")


def test_p52_config_file_with_a_byte_order_mark(tmp_path):
    from insightad.cli.options import load_config_file

    (tmp_path / "c.toml").write_bytes(b"\xef\xbb\xbfimage_size = 64\r\n[train]\r\nholdout = 0.25\r\n")
    cfg = load_config_file(tmp_path / "c.toml", "train")
    assert cfg["__flat__"] == {"image_size": 64} and cfg["__section__"] == {"holdout": 0.25}


def test_p52_more_threads_than_cores_are_capped(monkeypatch):
    import argparse

    import insightad.inference.load as load
    from insightad.cli.common import load_inference_model

    seen = []
    monkeypatch.setattr(load, "load_for_inference", lambda model, engine, threads, device: seen.append(threads))
    monkeypatch.setattr(os, "cpu_count", lambda: 4)
    args = argparse.Namespace(model="m.safetensors", engine="auto", threads=100000, device="auto")
    with pytest.warns(UserWarning, match="--threads 100000 is more than the 4 CPU cores of this machine; using 4"):
        load_inference_model(args)
    args.threads = 3
    load_inference_model(args)
    assert seen == [4, 3]


def test_p52_train_empty_config_refused_with_trains_usage(capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", "--config", "", "--data", "x"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "insightad train: error: argument --config: expected a file or folder name" in err
    assert "__main__" not in err


def test_p52_serve_threads_above_the_cores_are_capped(monkeypatch, baseline_model, capsys):
    """serve --threads / --decode-threads 100000 asked for that many threads (killed for memory, no message):
    capped to the cores with a warning line each, as predict's --threads; 0 (automatic) stays 0."""
    import insightad.apps.serve as serve_app

    seen = []

    def stop(model, settings, threshold=None):
        seen.append((settings.threads, settings.decode_threads))
        raise InsightADError("stopped before serving")

    monkeypatch.setattr(serve_app, "create_app", stop)
    monkeypatch.setattr(os, "cpu_count", lambda: 4)
    args = ["serve", "--model", str(baseline_model), "--threads", "100000", "--decode-threads", "100000"]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "--threads 100000 is more than the 4 CPU cores" in err and "--decode-threads 100000 is more" in err, err
    assert main(["serve", "--model", str(baseline_model), "--decode-threads", "3"]) == 1
    assert seen == [(4, 4), (0, 3)]
