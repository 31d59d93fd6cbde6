"""Dataclass fields as CLI flags, the optional TOML ``--config`` file, and shared flags."""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import os
import typing
from pathlib import Path
from typing import Any

import tomllib

from insightad import config
from insightad.errors import InsightADError


def path_arg(text: str) -> str:
    """The argparse type of every option (and positional) that names a file or folder, in every command: ``~`` is
    expanded here, once for all. A shell expands it only at the start of a word of its own, not in
    ``--data=~/bottle``, a quoted "~/x" nor a --config file's value, which otherwise named a folder called ``~`` in
    the working directory. ``main`` also passes config-file lists (``images = ["~/a.png"]``) through it.
    An empty word (``--input "$DIR"`` with DIR unset) is refused: taken as given it named the working directory
    (``sort --input ''`` sorted it) or, for an optional output, was taken for the default."""
    if not text:
        raise argparse.ArgumentTypeError("expected a file or folder name, got an empty string")
    return os.path.expanduser(text)


def expand_path_options(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Every ``path_arg`` value of ``args`` expanded, whatever gave it: a flag, a string or a list from the config
    file (argparse passes only a string default through its type)."""
    for a in parser._actions:
        if a.type is not path_arg:
            continue
        value = getattr(args, a.dest, None)
        if isinstance(value, str) and value:
            setattr(args, a.dest, path_arg(value))
        elif isinstance(value, list):
            if "" in value:  # a config file's list; a flag's empty word was refused by argparse
                name = a.option_strings[0] if a.option_strings else a.metavar or a.dest
                raise InsightADError(f"{name}: expected a file or folder name, got an empty string")
            setattr(args, a.dest, [path_arg(v) if isinstance(v, str) else v for v in value])


def _list_of(elem: type, names: bool = False):
    """An argparse type for a list flag; ``names``: backbone levels, numbers or module names (``blocks.2``)."""
    def parse(text: str) -> list:
        try:
            return config.parse_list(text, elem, names)
        except ValueError:
            also = " or module names such as blocks.2" if names else ""
            raise argparse.ArgumentTypeError(f"expected a list of {elem.__name__}{also} (e.g. 1,2,3), "
                                             f"got {text!r}") from None
    return parse


def add_dataclass_args(parser: argparse.ArgumentParser, cls: type, *, skip: tuple[str, ...] = (),
                       title: str | None = None) -> None:
    """One flag per field (``--image-size``, plus ``--image_size`` and any alias), default SUPPRESS
    so only what the user typed overrides the config file and the dataclass defaults."""
    group = parser.add_argument_group(title or (cls.__doc__ or cls.__name__).strip().splitlines()[0])
    hints = typing.get_type_hints(cls)
    existing = {s for a in parser._actions for s in a.option_strings}
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        names = [f"--{f.name.replace('_', '-')}"]
        if "_" in f.name:
            names.append(f"--{f.name}")
        names += [a for a in f.metadata.get("aliases", ()) if a not in names]
        names = [n for n in names if n not in existing]
        if not names:
            continue
        kind = config._base_type(hints[f.name])
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        shown = ",".join(map(str, default)) if isinstance(default, (list, tuple)) else default
        help_text = f"{f.metadata.get('help', '')} (default: {shown})".replace("%", "%%")  # argparse formats help
        kw: dict[str, Any] = {"dest": f.name, "default": argparse.SUPPRESS, "help": help_text}
        if kind is bool:
            group.add_argument(*names, action=argparse.BooleanOptionalAction, **kw)
            continue
        if kind in (list, tuple):
            args = typing.get_args(config._strip_optional(hints[f.name]))
            kw["type"] = _list_of(args[0] if args else str, names=f.name in config.LEVEL_FIELDS)
            kw["metavar"] = "LIST"
        else:
            kw["type"] = kind if kind in (int, float) else path_arg if f.metadata.get("path") else str
            if f.metadata.get("choices"):
                kw["choices"] = f.metadata["choices"]
                renames = f.metadata.get("value_aliases") or {}
                if renames:
                    kw["type"] = lambda v, r=renames: r.get(v, v)
        group.add_argument(*names, **kw)


def gather(args: argparse.Namespace, cls: type, *, skip: tuple[str, ...] = (), **fixed: Any) -> Any:
    """The dataclass from parsed flags (and config-file defaults), validated. ``skip``: fields left at their
    defaults, as ``add_dataclass_args(skip=...)`` gave them no flag (a flag of the same name set for another
    dataclass, such as a trained method's --time-budget, is not theirs)."""
    names = {f.name for f in dataclasses.fields(cls)} - set(skip)
    values = {k: v for k, v in vars(args).items() if k in names}
    values.update(fixed)
    return config.build(cls, values)


def load_config_file(path: str | Path, command: str) -> dict[str, Any]:
    """Flat keys apply to every command that has them; a ``[command]`` table applies to that one."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8-sig"))  # Notepad writes a BOM: TOML has none
    except FileNotFoundError:
        raise InsightADError(f"{path}: config file not found") from None
    except IsADirectoryError:
        raise InsightADError(f"{path}: --config expects a TOML file, got a folder") from None
    except OSError as e:
        raise InsightADError(f"{path}: cannot read the config file ({e.strerror})") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise InsightADError(f"{path}: not valid TOML ({e})") from None
    _check_tables(path, data)
    flat = {k.replace("-", "_"): v for k, v in data.items() if not isinstance(v, dict)}
    section = {k.replace("-", "_"): v for k, v in (data.get(command) or {}).items()}
    return {"__flat__": flat, "__section__": section}


def _check_tables(path: Path, data: dict[str, Any]) -> None:
    """A table not named after a command would be ignored silently (``[trian]``): refused."""
    from insightad.cli import COMMANDS

    for name, value in data.items():
        if name in COMMANDS and not isinstance(value, dict):  # ``train = 5``: read as a table, it crashed
            raise InsightADError(f"{path}: key {name!r} names a command; expected a table [{name}] of its "
                                 f"settings, got {_shown(value)}")
        if isinstance(value, dict) and name not in COMMANDS:
            close = difflib.get_close_matches(name, sorted(COMMANDS), n=1, cutoff=0.6)
            hint = f"did you mean [{close[0]}]? " if close else ""
            raise InsightADError(f"{path}: unknown table [{name}]; {hint}known tables: "
                                 + ", ".join(f"[{c}]" for c in sorted(COMMANDS)))


def _check_value(path: str, key: str, action: argparse.Action, value: Any) -> None:
    """A config value of the wrong kind: one line naming the file, the key and what was expected
    (argparse would turn any string into True for a switch, or print its usage for a bad number)."""
    if action.nargs == 0:  # a switch: --json, --maps/--no-maps
        if not isinstance(value, bool):
            raise InsightADError(f"{path}: key {key!r}: expected a TOML boolean (true or false), got {_shown(value)}")
        return
    kind = action.type
    if kind in (None, str, path_arg) and not _takes_many(action) and not isinstance(value, str) and (
            isinstance(value, (bool, list, dict)) or kind is not path_arg and not isinstance(value, (int, float))):
        # a list or a table for one value (``data = ["a", "b"]``, ``model = 5``: a TypeError traceback)
        what = "a file or folder name" if kind is path_arg else "a string"
        raise InsightADError(f"{path}: key {key!r}: expected {what}, got {_shown(value)}")
    if kind in (int, float) and not isinstance(value, str):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and isinstance(value, float)):
            raise InsightADError(f"{path}: key {key!r}: expected {'an integer' if kind is int else 'a number'}, "
                                 f"got {_shown(value)}")
        return
    if isinstance(value, str) and callable(kind):
        try:
            value = kind(value)
        except (ValueError, TypeError, argparse.ArgumentTypeError) as e:
            what = {int: "an integer", float: "a number"}.get(kind, "a valid value")  # type: ignore[call-overload]
            raise InsightADError(f"{path}: key {key!r}: expected {what}, got {value!r}"
                                 + (f" ({e})" if isinstance(e, argparse.ArgumentTypeError) else "")) from None
    if action.choices is not None and isinstance(value, str) and value not in action.choices:
        raise InsightADError(f"{path}: key {key!r}: expected one of {', '.join(map(str, action.choices))}, "
                             f"got {value!r}")


_NOT_KEYS = {"help", "config", "command", "version"}


def option_keys(parser: argparse.ArgumentParser) -> dict[str, str]:
    """Config key -> parser dest: every flag's dest and its spellings (``image-size`` and ``--mode`` as keys)."""
    keys: dict[str, str] = {}
    for a in parser._actions:
        if a.dest in _NOT_KEYS or a.dest.startswith("_") or a.dest == argparse.SUPPRESS:
            continue
        keys.setdefault(a.dest, a.dest)
        for s in a.option_strings:
            keys.setdefault(s.lstrip("-").replace("-", "_"), a.dest)
    return keys


def all_config_keys() -> set[str]:
    """Every key some command takes: flat keys are shared, so a key is unknown only if no command has it."""
    from insightad.apps.train import BACKBONE_METHODS, params_class
    from insightad.cli import COMMANDS, build_parser
    from insightad.methods import list_methods

    keys: set[str] = set()
    for name in COMMANDS:
        top = build_parser([name])
        sub = next(a for a in top._actions if isinstance(a, argparse._SubParsersAction))
        keys |= set(option_keys(sub.choices[name]))
    for method in list_methods() + list(BACKBONE_METHODS):
        keys |= {f.name for f in dataclasses.fields(params_class(method))}
    return keys


def _unknown_key(path: str, where: str, key: str, valid: set[str]) -> InsightADError:
    """One line naming the key and the closest valid one (difflib), if any is close."""
    close = difflib.get_close_matches(key, sorted(valid), n=1, cutoff=0.6)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return InsightADError(f"{path}: unknown key {key!r}{where}{hint}")


def apply_config(parser: argparse.ArgumentParser, cfg: dict[str, Any], path: str, command: str,
                 shown: str | None = None) -> None:
    """Config values become parser defaults, so flags still win. A key no option takes is an error, naming the
    command as ``shown`` (e.g. ``train --method padim``: 'epochs' is an option of train, not of padim's)."""
    keys = option_keys(parser)
    for key in cfg["__section__"]:
        if key not in keys:
            raise _unknown_key(path, f" in [{command}] (not an option of 'insightad {shown or command}')", key,
                               set(keys))
    flat_unknown = [k for k in cfg["__flat__"] if k not in keys]
    if flat_unknown:
        everywhere = all_config_keys()
        for key in flat_unknown:
            if key not in everywhere:
                raise _unknown_key(path, " (no command has this option)", key, everywhere)
    values = {keys[k]: v for k, v in cfg["__flat__"].items() if k in keys}
    values.update({keys[k]: v for k, v in cfg["__section__"].items()})
    actions = {a.dest: a for a in parser._actions}
    named = {keys[k]: k for k in [*cfg["__flat__"], *cfg["__section__"]] if k in keys}
    for dest, value in values.items():
        if _takes_many(actions[dest]):
            values[dest] = value = _as_list(path, named[dest], value)
        _check_value(path, named[dest], actions[dest], value)
        if actions[dest].type is path_arg and isinstance(value, (int, float)):  # threshold = 0.5, model = 5
            values[dest] = path_arg(str(value))
    parser.set_defaults(**values)


def _takes_many(action: argparse.Action) -> bool:
    """An option or positional that collects several values (``predict IMAGE...``, ``--image`` repeated)."""
    return action.nargs in ("*", "+") or isinstance(action, argparse._AppendAction)


def _as_list(path: str, key: str, value: Any) -> list:
    """A config value for an option that takes several: a TOML list, or one string as a list of one (a bare
    string was iterated letter by letter, and "." even named the current folder)."""
    if isinstance(value, str):
        return [value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise InsightADError(f"{path}: key {key!r}: expected a list of strings (or one string), got {_shown(value)}")
    return value


def _shown(value: Any) -> str:
    """A config value as TOML/JSON spells it (true, not Python's True)."""
    import json

    try:
        return json.dumps(value)[:80]
    except (TypeError, ValueError):
        return repr(value)[:80]


def add_config_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=path_arg, metavar="FILE.toml", help="TOML file whose keys mirror these flags; flags win")


def _spelling_value(action: argparse.Action, spelling: str, inline: str | None, rest: list[str]) -> str | None:
    """What one occurrence of a flag sets: its ``=value``, the next word, or for a switch which way it points."""
    if action.nargs == 0:
        return "off" if spelling.startswith("--no-") and isinstance(action, argparse.BooleanOptionalAction) else "on"
    if inline is not None:
        return inline
    return rest[0] if rest else None


def check_spellings(parser: argparse.ArgumentParser, argv: list[str]) -> None:
    """Refuse two spellings of one flag given different values (``--out A --output B``, ``--input X --sort_out Y``,
    ``--maps --no-maps``): argparse would keep the last one silently. One spelling repeated keeps argparse's rule."""
    flags = {s: a for a in parser._actions for s in a.option_strings if s.startswith("--")}
    given: dict[int, tuple[str, str | None]] = {}
    for i, word in enumerate(argv):
        if word == "--":
            break
        if not word.startswith("--"):
            continue
        name, eq, inline = word.partition("=")
        matches = [s for s in flags if s == name] or [s for s in flags if s.startswith(name)]
        actions = {id(flags[s]) for s in matches}
        if len(actions) != 1:  # unknown or ambiguous: argparse has already said so, or it is a value
            continue
        spelling = name if name in flags else matches[0]
        action = flags[spelling]
        value = _spelling_value(action, name, inline if eq else None, argv[i + 1:])
        if id(action) in given:
            first, old = given[id(action)]
            if first != spelling and old != value:
                raise InsightADError(f"{first} and {spelling} are two spellings of one option and were given "
                                     f"different values ({old!r} and {value!r}); give it once")
        given[id(action)] = (spelling, value)
