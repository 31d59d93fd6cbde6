"""The ``insightad`` command: one sub-command per module of this package (``insightad <cmd> --help``)."""

from __future__ import annotations

import argparse
import contextlib
import errno
import importlib
import os
import sys

from insightad.errors import InsightADError, cut
from insightad.lazy_imports import without_kernel_compiler
from insightad.runtime import TRAIN_EXTRA, torch_available
from insightad.version import __version__

# sub-command -> module with add_parser(subparsers, argv) and run(args) -> int
COMMANDS = {
    "train": "insightad.cli.train",
    "predict": "insightad.cli.predict",
    "calibrate": "insightad.cli.calibrate",
    "evaluate": "insightad.cli.evaluate",
    "sort": "insightad.cli.sort",
    "batch": "insightad.cli.batch",
    "demo": "insightad.cli.demo",
    "info": "insightad.cli.info",
    "serve": "insightad.cli.serve",
    "export": "insightad.cli.export",
    "augment": "insightad.cli.augment",
}

# Sub-commands that need PyTorch (training, export, calibrating a model file): a runtime-only install
# (no PyTorch) lists them and answers each with one line naming the extra to install.
NEEDS_TORCH = frozenset({"train", "calibrate", "demo", "export", "augment"})


# What a full disk, a quota or a read-only file system raise while an output is written: one line, not a traceback.
NO_ROOM = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS})


def no_room_message(e: OSError) -> str:
    """The one line for an output that could not be written for want of room (or a file system turned
    read-only): the file, the reason, what to do. Writes go through temporary names, so the earlier file is
    whole."""
    what = f"{e.filename}: could not be written" if e.filename else "an output could not be written"
    return (f"{what} ({e.strerror or os.strerror(e.errno or errno.EIO)}); free some space or choose another "
            "output, then run the command again")


def check_command_available(argv: list[str]) -> None:
    """Refuse, in one line naming the extra, a sub-command that needs PyTorch where it is not installed."""
    if argv and argv[0] in NEEDS_TORCH and not torch_available():
        raise InsightADError(f"insightad {argv[0]} needs PyTorch, which this install does not have: {TRAIN_EXTRA}")


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="insightad", description="Visual anomaly detection: learn normal from "
                                     "good images, score new images, show where the defect is.")
    parser.add_argument("--version", action="version", version=f"insightad {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    wanted = argv[0] if argv and argv[0] in COMMANDS else None
    has_torch = torch_available()
    for name, module in COMMANDS.items():
        if wanted and name != wanted:  # build only the parser in use: method flags depend on argv
            sub.add_parser(name, add_help=False)
            continue
        if name in NEEDS_TORCH and not has_torch:
            sub.add_parser(name, add_help=False, help=f"(needs PyTorch: {TRAIN_EXTRA})")  # main() answers it
            continue
        importlib.import_module(module).add_parser(sub, argv[1:] if wanted else [])
    return parser


def _subparser(parser: argparse.ArgumentParser, command: str) -> argparse.ArgumentParser:
    """The parser of one sub-command."""
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[command]


def _relax_required(parser: argparse.ArgumentParser, argv: list[str]) -> list[argparse.Action]:
    """With ``--config``, a required flag may come from the file: argparse must not refuse it before
    the file is read, so it is made optional here and checked by ``main`` once the file is applied."""
    if not argv or argv[0] not in COMMANDS or not any(
            len(t.split("=", 1)[0]) > 4 and "--config".startswith(t.split("=", 1)[0]) for t in argv[1:]):
        return []
    relaxed = [a for a in _subparser(parser, argv[0])._actions if a.required and a.option_strings]
    for a in relaxed:
        a.required = False
    return relaxed


def _parse(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """The command line parsed; a word no flag takes is refused by the sub-command's parser, with its usage
    (``insightad info: error: ...``), not by the top parser's usage, which names no flag of the command."""
    args, extra = parser.parse_known_args(argv)
    if extra:
        command = getattr(args, "command", None)
        hint = ""
        if command == "train":  # its flags depend on the method (command line, else --config, else baseline)
            from insightad.cli.train import _method_from, _named, other_methods_flags

            hint = other_methods_flags(extra, _method_from(_named(argv)))
        (_subparser(parser, command) if command else parser).error(f"unrecognized arguments: {' '.join(extra)}{hint}")
    return args


def _check_spellings(parser: argparse.ArgumentParser, command: str, argv: list[str]) -> None:
    """Two spellings of one flag with different values are refused, for every sub-command."""
    from insightad.cli.options import check_spellings

    check_spellings(_subparser(parser, command), argv[argv.index(command) + 1:] if command in argv else [])


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    without_kernel_compiler()
    ok = False
    try:
        check_command_available(argv)
        parser = build_parser(argv)
        relaxed = _relax_required(parser, argv)
        args = _parse(parser, argv)
        if not args.command:
            parser.print_help()
            return 2
        command = args.command
        _check_spellings(parser, command, argv)
        prepare = getattr(args, "_prepare", None)
        if prepare:
            args = prepare(args)
        from insightad.cli.options import expand_path_options

        expand_path_options(_subparser(parser, command), args)  # ~ in every path, from a flag or the config file
        for action in relaxed:
            if getattr(args, action.dest, None) is None:
                raise InsightADError(f"{action.option_strings[0]}: required; pass it as a flag or set "
                                     f"{action.dest!r} in the --config file {args.config}")
        from insightad.cli.common import sigterm_as_interrupt, warnings_as_lines

        # Every sub-command: a warning is one line, never Python's with a source line; SIGTERM (a service manager,
        # `kill`, a scheduler) stops it as Ctrl-C does: temporaries removed, finished work kept, resume said.
        # serve leaves SIGTERM to the server: a graceful shutdown, then the signal's own exit status.
        stop = contextlib.nullcontext() if command == "serve" else sigterm_as_interrupt()
        with warnings_as_lines(), stop:
            rc = int(args._run(args) or 0)
        ok = rc == 0
        return rc
    except InsightADError as e:
        print(f"insightad: error: {cut(str(e))}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("insightad: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `insightad predict --json ... | head`: the reader has what it wanted
        # (before OSError: a BrokenPipeError is one)
        _silence_stdout()
        return 141  # what a shell reports for a process ended by SIGPIPE
    except OSError as e:
        if e.errno not in NO_ROOM:
            raise
        print(f"insightad: error: {cut(no_room_message(e))}", file=sys.stderr)
        return 1
    finally:  # a refused or failed run leaves no empty output folder that its checks made
        from insightad.outputs import keep_created_folders, remove_created_folders

        keep_created_folders() if ok else remove_created_folders()


def _silence_stdout() -> None:
    """Point stdout at /dev/null so the interpreter's final flush does not raise BrokenPipeError again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (AttributeError, OSError, ValueError):  # not a real file (tests, embedded use)
        pass


if __name__ == "__main__":
    sys.exit(main())
