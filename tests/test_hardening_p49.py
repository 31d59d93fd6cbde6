"""Issue 49: the README and docs/ followed literally by a new user; where the product disagreed with a page that
described the better behaviour, the product was changed, and each change is checked here."""

from __future__ import annotations

import argparse

import pytest

from insightad.cli import _parse, build_parser
from insightad.data import discover
from insightad.data.synthetic import make_image
from insightad.errors import InsightADError


def parsed(*argv: str) -> argparse.Namespace:
    """The command line as ``insightad`` parses it (no sub-command run)."""
    return _parse(build_parser(list(argv)), list(argv))


def test_train_ray_workers_do_not_become_the_models_decoding_threads():
    """train --workers is the number of Ray workers; the detector's own ``workers`` (image-decoding threads,
    -1: automatic) kept its default instead of taking the Ray flag's 2 (stored in every model file)."""
    from insightad.apps.train import params_class
    from insightad.cli.options import gather

    args = parsed("train", "--method", "baseline", "--data", "x", "--workers", "5")
    assert args.ray_workers == 5
    assert gather(args, params_class("baseline")).workers == -1
    assert gather(parsed("train", "--data", "x"), params_class("baseline")).workers == -1


def test_predict_takes_batch_spelling_of_overlays():
    """batch writes overlays with --overlays; predict refused that spelling of its --overlay ('unrecognized
    arguments'), so a user moving from one command to the other tripped on one letter."""
    assert parsed("predict", "--model", "m.safetensors", "--overlays", "ov", "a.png").overlay == "ov"
    assert parsed("batch", "--model", "m.safetensors", "--input", "x", "--out", "r.parquet",
                  "--overlay", "ov").overlays == "ov"


def test_dataset_without_any_image_says_so_not_set_layout(tmp_path):
    """train --data on a folder holding no image at all (empty, or only empty sub-folders) said 'cannot tell the
    dataset layout ... set --layout'; no --layout helps there: it now says no images were found. A folder whose
    images all lie in sub-folders of no known layout still gets the layout message."""
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    with pytest.raises(InsightADError, match="empty: no images found") as e:
        discover(tmp_path / "empty")
    assert "--layout" not in str(e.value)
    (tmp_path / "nested" / "sub").mkdir(parents=True)
    make_image("disc", None, size=32, seed=0)[0].save(tmp_path / "nested" / "sub" / "a.png")
    with pytest.raises(InsightADError, match="cannot tell the dataset layout"):
        discover(tmp_path / "nested")


def test_info_counts_the_training_hashes_without_full():
    """info without --full counted the training and held-out files but still listed one sha256 per training
    image (a page of hex for a real dataset); the hashes are counted too, and --full keeps everything."""
    from insightad.cli.info import _short_split

    meta = {"split": {"root": "/d", "train": ["a.png", "b.png"], "train_sha256": ["0" * 64, "1" * 64],
                      "holdout": ["c.png"], "holdout_fraction": 0.2}}
    _short_split(meta)
    assert meta["split"] == {"root": "/d", "train": "2 files", "train_sha256": "2 hashes", "holdout": "1 files",
                             "holdout_fraction": 0.2}


def test_training_image_refusal_fits_calibrate_too(tmp_path):
    """The refusal of a training image, shared by evaluate, calibrate --data and calibrate --labels, told a user of
    calibrate to 'evaluate on held-out or new images'; it now says what to give whichever command refused."""
    from insightad.data.layouts import refuse_training_images

    (tmp_path / "a.png").write_bytes(b"x")
    with pytest.raises(InsightADError, match="this image was used to train the model") as e:
        refuse_training_images([tmp_path / "a.png"], {"root": str(tmp_path), "train": ["a.png"]})
    assert "evaluate on" not in str(e.value) and "not trained on" in str(e.value)


def test_every_command_with_out_takes_output_too():
    """train, sort, augment, calibrate and export take --output for --out; batch and demo refused it."""
    assert parsed("batch", "--model", "m.safetensors", "--input", "x", "--output", "r.parquet").out == "r.parquet"
    assert parsed("demo", "--output", "d").out == "d"


def test_decisions_page_states_the_demos_budget():
    """decisions.md says which --time-budget the demo gives --method auto; the number is the code's."""
    from pathlib import Path

    from insightad.cli.demo import DEMO_BUDGET_S

    page = (Path(__file__).resolve().parents[1] / "docs" / "decisions.md").read_text()
    assert f"The demo uses it with a {DEMO_BUDGET_S:.0f} s budget" in page


def test_auto_table_says_its_seconds_include_validation():
    """--method auto's table showed 'fit s' 26.5 for the baseline the demo then reported 'trained ... in 12.5 s':
    the row's seconds are the fit and the out-of-fold validation together, and the header now says so."""
    from insightad.apps.auto import format_table

    rows = [{"method": "baseline", "synthetic_auroc": 1.0, "fit_seconds": 26.5, "predict_ms_per_image": 41.5,
             "size_mb": 3.8},
            {"method": "patchcore", "synthetic_auroc": None, "fit_seconds": None, "skipped": "time budget spent (95 s)"}]
    head, base, skipped = format_table(rows, "baseline").splitlines()
    assert "fit+val s" in head and "fit s" not in head.replace("fit+val s", "")
    assert base.index("26.5") + len("26.5") == head.index("fit+val s") + len("fit+val s")  # aligned under it
    assert skipped.startswith("patchcore") and "skipped: time budget spent" in skipped


def test_train_help_says_when_threshold_percentile_counts(capsys):
    """Every method's help said '--threshold-percentile: default threshold: this percentile of the training scores',
    but train replaces that threshold by the out-of-fold one: the percentile counts only with --threshold-strategy
    percentile (the default, fpr, ignores it)."""
    from insightad.cli import main

    for method in ("baseline", "padim", "autoencoder"):
        with pytest.raises(SystemExit):
            main(["train", "--method", method, "--help"])
        text = " ".join(capsys.readouterr().out.split()).replace("- ", "-")
        assert "train uses it only with --threshold-strategy percentile, on the out-of-fold normal scores" in text


def test_train_names_the_method_an_unknown_flag_belongs_to(tmp_path, capsys):
    """README lists --epochs and --lr among the accepted flags; with the default method (baseline) they answered
    only 'unrecognized arguments: --epochs 3' under a screen of usage. The error now names the methods that take
    the flag, and the method it was given to (from --config when the command line names none)."""
    from insightad.cli import main

    with pytest.raises(SystemExit):
        main(["train", "--data", "x", "--epochs", "3"])
    err = capsys.readouterr().err
    assert "--epochs is a flag of --method autoencoder, svdd, ssl, not of --method baseline" in err
    cfg = tmp_path / "c.toml"
    cfg.write_text('method = "padim"\n')
    with pytest.raises(SystemExit):
        main(["train", "--config", str(cfg), "--data", "x", "--grid=3"])
    assert "--grid is a flag of --method baseline, svdd, not of --method padim" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train", "--data", "x", "--bogus", "1"])
    assert capsys.readouterr().err.rstrip().endswith("unrecognized arguments: --bogus 1")


def test_evaluate_and_calibrate_help_say_holdout_and_seed_are_trains(capsys):
    """evaluate and calibrate listed --holdout 'fraction of normal images held out of training' and --seed
    'random seed (hold-out split, ...)', which neither uses: the split is the one the model file recorded.
    Their help now says so (evaluate's --seed seeds the report's draws); train's help is unchanged."""
    from insightad.cli import main

    def help_of(*argv: str) -> str:
        with pytest.raises(SystemExit):
            main([*argv, "--help"])
        return " ".join(capsys.readouterr().out.split())

    for command in ("evaluate", "calibrate"):
        assert "--holdout HOLDOUT train's hold-out fraction, not used here" in help_of(command)
    assert "--seed SEED seed of --report's balanced/unbalanced draws" in help_of("evaluate")
    assert "--seed SEED train's seed, not used here" in help_of("calibrate")
    assert "--holdout HOLDOUT fraction of normal images held out of training" in help_of("train")


def test_readme_says_how_the_demo_chooses_its_method():
    """README said the demo 'trains the best method installed'; it runs --method auto with a 60 s budget, so
    a candidate started after the budget (patchcore, on a 2-core machine) is skipped, not compared."""
    from pathlib import Path

    from insightad.cli.demo import DEMO_BUDGET_S

    readme = " ".join((Path(__file__).resolve().parents[1] / "README.md").read_text().split())
    assert "best method installed" not in readme
    assert f"with `--method auto` (baseline, padim, patchcore in turn until {DEMO_BUDGET_S:.0f} s are spent" in readme
