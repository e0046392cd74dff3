"""YAML config files and values read strictly (a key given twice in one mapping is an error), and a command line's
parse error said in one line (:func:`option_error`), by parsers that take no abbreviated option (:data:`PARSER_OPTIONS`).

PyYAML (and so jsonargparse, LightningCLI and every ``--config`` of this project) keeps the last of two equal keys
silently: ``max_steps: 5`` then ``max_steps: 7`` trains 7 steps while the file seems to say 5. :func:`strict_yaml`
registers, once per process, a jsonargparse YAML loader that first checks every mapping for duplicate keys (on
the composed node tree, before anything is constructed), then loads exactly as jsonargparse's own loader does.
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Any

import jsonargparse
import yaml

__all__ = ["PARSER_OPTIONS", "DuplicateKeyError", "check_duplicate_keys", "option_error", "read_yaml", "strict_yaml"]

PARSER_OPTIONS: dict[str, Any] = {"exit_on_error": False, "allow_abbrev": False}
"""Every command line parser's (the front door's and LightningCLI's): a parse error raises, to be said in one line
(:func:`option_error`) rather than with the whole usage, and an option is its whole name (argparse would take
``--ckp`` for ``--ckpt`` and ``--trainer.max_s`` for ``--trainer.max_steps``: a typo quietly meaning an option)."""


class DuplicateKeyError(yaml.constructor.ConstructorError):
    """A mapping of a YAML document names one key twice."""


def check_duplicate_keys(stream: str) -> None:
    """Raise :class:`DuplicateKeyError` (line and column of the second occurrence, line of the first) if a
    mapping of the YAML document ``stream`` repeats a scalar key; other YAML errors are left to the loader."""
    try:
        root = yaml.compose(stream, Loader=yaml.SafeLoader)
    except yaml.YAMLError:
        return  # not YAML this check can read: the loader reports it
    nodes = [root] if root is not None else []
    while nodes:
        node = nodes.pop()
        if isinstance(node, yaml.MappingNode):
            seen: dict[str, int] = {}
            for key, value in node.value:
                if isinstance(key, yaml.ScalarNode):
                    if key.value in seen:
                        raise DuplicateKeyError(None, None, f"duplicate key {key.value!r} (first given at line "
                                                f"{seen[key.value] + 1}): keep one", key.start_mark)
                    seen[key.value] = key.start_mark.line
                nodes.append(value)
        elif isinstance(node, yaml.SequenceNode):
            nodes.extend(node.value)


_registered: list[bool] = []


def strict_yaml() -> None:
    """Make jsonargparse's ``yaml`` loader (config files and command-line values) refuse duplicate keys (idempotent)."""
    if _registered:
        return
    load = jsonargparse.get_loader("yaml")

    def strict_load(stream: str) -> Any:
        check_duplicate_keys(stream)
        return load(stream)

    jsonargparse.set_loader("yaml", strict_load, exceptions=(yaml.YAMLError,))
    _registered.append(True)


def read_yaml(path: Path) -> Any:
    """The YAML file ``path``, read strictly (duplicate keys refused).

    Raises:
        ValueError: it is not valid YAML or repeats a key; the message names the file, the line and column, the
            problem, and for a tab among the indentation the fix (indent with spaces)."""
    text = Path(path).read_text()
    try:
        check_duplicate_keys(text)
        return yaml.safe_load(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(error, "problem", None) or str(error)
        line = text.splitlines()[mark.line] if mark is not None and mark.line < len(text.splitlines()) else ""
        tab = ": YAML is indented with spaces, not tabs" if "\t" in line[: len(line) - len(line.lstrip())] or \
            "\t" in problem else ""
        raise ValueError(f"{path} is not valid YAML{where}: {problem}{tab}") from None


def option_error(error: Exception, parser: Any, prog: str) -> ValueError:
    """One line for a parse error of jsonargparse ``parser`` (built with ``exit_on_error=False``, so that it raises
    instead of printing its whole usage, 130 lines for ``fit``): the error with options spelled as typed
    (``--ckpt``, not jsonargparse's ``sample.ckpt``), the nearest known option for each misspelt one (on the command
    line or in a config file) and the nearest choice for a misspelt command, and where the options are listed
    (``prog --help``; ``prog`` is the command as typed up to its options, ``python -m glide_lightning fit``)."""
    message = " ".join(str(error).split())  # jsonargparse folds some messages over lines
    commands = prog.split()[3:]  # after `python -m glide_lightning`: the subcommands typed

    def as_typed(key: str) -> str:  # `data.synthetic.out` (a subcommand's key) → `--out`
        parts = key.split(".")
        for command in commands:  # the subcommands typed, in order, are the key's prefix
            if parts[:1] == [command]:
                parts = parts[1:]
        return "--" + ".".join(parts)

    if (required := re.search(r"the following arguments are required: (.+)$", message)) is not None:
        names = ", ".join(as_typed(key.strip()) for key in required.group(1).split(","))
        message = message[: required.start(1)] + names
    unknown = re.findall(r"(--[\w.\-]+)", message.split("unrecognized arguments:", 1)[1]) \
        if "unrecognized arguments:" in message else []
    unknown += [f"--{key}" for key in re.findall(r"does not accept option '([\w.\-]+)'", message)]
    known = [option for action in _all_actions(parser) for option in action.option_strings]
    hints = [f"{option}: did you mean {close[0]}?" for option in unknown
             if (close := difflib.get_close_matches(option, known, n=1, cutoff=0.75))]
    if (choice := re.search(r"invalid choice: '([\w.\-]+)' \(choose from (.+?)\)", message)) is not None:
        choices = re.findall(r"'([\w.\-]+)'", choice.group(2))
        hints += [f"did you mean {close[0]}?" for close in [difflib.get_close_matches(choice.group(1), choices, n=1)]
                  if close]
    return ValueError(f"{message}{'; ' + '; '.join(hints) if hints else ''} (`{prog} --help` lists the options)")


def _all_actions(parser: Any) -> list[Any]:
    """The actions of ``parser`` and of its subcommands' parsers."""
    actions = list(getattr(parser, "_actions", []))
    for action in list(actions):
        for sub in (getattr(action, "_name_parser_map", None) or {}).values():
            actions += _all_actions(sub)
    return actions
