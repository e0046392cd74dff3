"""``python -m glide_lightning <command>``: the one front door.

``fit`` and ``validate`` are LightningCLI's (:mod:`glide_lightning.cli`, which imports Lightning's
training machinery, so it is loaded only for them). ``sample``, ``fid``, ``sweep``, ``compare``, ``ablation``
and ``bench`` are typed dataclasses (:data:`COMMANDS`): jsonargparse reads their fields, docstrings and
defaults, so each takes ``--help``, ``--config some.yaml`` and ``--print_config`` as ``fit`` does, and
the sampling knobs are the fields of :class:`~glide_lightning.sampling.SamplingConfig` itself
(``--sampling.steps``, ``--sampling.guidance_scale``, …), defined and checked there alone. Values that
contradict each other fail when the command line is parsed, naming the field, and so do input paths that name
nothing on disk (:func:`check_inputs`: ``error: --ckpt: runs/x/last.ckpt does not exist (…)``). Option names may be
spelled with hyphens (``--clip-dir`` for ``--clip_dir``), and a sampling field without its group where the
command has no field of that name (``--clip-guidance-scale 3`` for ``--sampling.clip_guidance_scale 3``).

``data <recipe>`` builds webdataset shards with one of the data recipes (:mod:`data_recipes`): each recipe is a
dataclass too (its module's ``RECIPE``), parsed the same way (``--help``, ``--config``, ``--print_config``), and
its module docstring (input layout, output, examples) heads its ``--help``. A recipe's bool options may also be
given bare (``--overwrite`` for ``--overwrite true``). ``ablation`` also takes its group as a bare first word and its
seeds as bare words (``ablation minig --seeds 0 1 2``; :func:`ablation_argv`).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import re
import sys
from collections import Counter
from typing import Any, NoReturn

import yaml
from jsonargparse import (ActionConfigFile, ArgumentError, ArgumentParser, DefaultHelpFormatter, Namespace,
                          set_parsing_settings)

from data_recipes import RECIPES, load_recipe, recipe_class
from glide_lightning.bench import BenchCommand
from glide_lightning.evaluation.ablation import AblationCommand
from glide_lightning.evaluation.fid_cli import FIDCommand, SweepCommand
from glide_lightning.evaluation.report import CompareCommand
from glide_lightning.sampling.command import SampleCommand
from glide_lightning.sampling.inputs import missing_input
from glide_lightning.yaml_config import PARSER_OPTIONS, option_error, strict_yaml

__all__ = ["COMMANDS", "DATA_HELP", "TRAINING_COMMANDS", "build_parser", "check_inputs",
           "command_parser", "main", "parse", "recipe_parser"]

set_parsing_settings(docstring_parse_attribute_docstrings=True)  # the fields' docstrings in --help
strict_yaml()  # a key given twice in a config is an error, not the last one silently

COMMANDS: dict[str, type] = {"sample": SampleCommand, "fid": FIDCommand, "sweep": SweepCommand,
                             "compare": CompareCommand, "ablation": AblationCommand, "bench": BenchCommand}
"""The non-training commands: name → dataclass (its fields are the options; ``run()`` does the work)."""
TRAINING_COMMANDS = {"fit": "train a model (LightningCLI): python -m glide_lightning fit --config "
                            "experiments/<name>.yaml; `fit --help` lists every field",
                     "validate": "validate a checkpoint (LightningCLI): python -m glide_lightning validate "
                                 "--config ... --ckpt_path ..."}
DATA_HELP = ("build webdataset shards from a dataset with a recipe: python -m glide_lightning data <recipe> --help "
             "(recipes: " + ", ".join(RECIPES) + ")")


def command_parser(name: str) -> ArgumentParser:
    """The parser of one :data:`COMMANDS` entry: its dataclass's fields, docstrings and defaults."""
    command = COMMANDS[name]
    doc = " ".join((command.__doc__ or "").split())
    parser = ArgumentParser(prog=f"python -m glide_lightning {name}", description=doc, **PARSER_OPTIONS)
    parser.add_argument("--config", action=ActionConfigFile, help="a YAML file of these options (later flags win)")
    parser.add_class_arguments(command, fail_untyped=True)
    return parser


class _KeepLayout(DefaultHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """jsonargparse's help, with a description's own line breaks kept (a recipe's input layout and examples)."""


def _summary(doc: str | None) -> str:
    """The first sentence of a docstring."""
    return re.split(r"\. ", " ".join((doc or "").split()))[0].rstrip(".")


def recipe_parser(recipe: str) -> ArgumentParser:
    """The parser of ``data <recipe>``: the fields, docstrings and defaults of the recipe's dataclass, under its
    module docstring."""
    parser = ArgumentParser(prog=f"python -m glide_lightning data {recipe}", description=load_recipe(recipe).__doc__,
                            formatter_class=_KeepLayout, **PARSER_OPTIONS)
    parser.add_argument("--config", action=ActionConfigFile, help="a YAML file of these options (later flags win)")
    parser.add_class_arguments(recipe_class(recipe), fail_untyped=True)
    return parser


def build_parser() -> ArgumentParser:
    """The parser of every command but ``fit`` / ``validate`` (listed in its help, handed to LightningCLI)."""
    parser = ArgumentParser(prog="python -m glide_lightning", description=__doc__.split("\n\n")[0],
                            **PARSER_OPTIONS)  # parse errors raise: one line from parse(), not the usage
    subcommands = parser.add_subcommands(dest="command", required=True)
    for name, help_text in TRAINING_COMMANDS.items():
        subcommands.add_subcommand(name, ArgumentParser(description=help_text, **PARSER_OPTIONS), help=help_text)
    for name in COMMANDS:
        sub = command_parser(name)
        subcommands.add_subcommand(name, sub, help=re.split(r"[.:;] ", sub.description or "")[0])
    data = ArgumentParser(prog="python -m glide_lightning data", description=f"Data recipes: {DATA_HELP}.",
                          **PARSER_OPTIONS)
    subcommands.add_subcommand("data", data, help=DATA_HELP)  # (before its own subcommands: jsonargparse's order)
    recipes = data.add_subcommands(dest="recipe", required=True)
    for name in RECIPES:
        sub = recipe_parser(name)
        recipes.add_subcommand(name, sub, help=_summary(recipe_class(name).__doc__))
        sub.formatter_class = _KeepLayout  # (add_subcommand gives it the parent's)
    return parser


def parse(argv: list[str]) -> Any:
    """The command object (a :data:`COMMANDS` dataclass) that ``argv`` describes. Parse errors, and values the
    dataclasses refuse, exit with status 2 and one ``error:`` line naming the option (the nearest known one for a
    misspelt option) and where the options are listed."""
    parser = build_parser()
    argv = spelled(ablation_argv(argv))
    known = argv[:1] and argv[0] in {*COMMANDS, *TRAINING_COMMANDS, "data"}
    typed = argv[:2] if argv[:1] == ["data"] and argv[1:2] and argv[1] in RECIPES else argv[:1] if known else []
    prog = " ".join(["python -m glide_lightning", *typed])
    try:
        config = parser.parse_args(argv)
    except ArgumentError as error:
        _refuse(str(option_error(error, parser, prog)))
    name = config.command
    instantiate = getattr(parser, "instantiate", None) or parser.instantiate_classes
    if name == "data":
        return _recipe(config, instantiate, prog)
    repeated = _repeated_list_options(COMMANDS[name], argv)  # (argv already canonical)
    if repeated:
        _refuse("; ".join(f"--{o} is given more than once, and a later one would replace the earlier: add the "
                          f"others with --{o}+ VALUE (or --{o} '[a, b]')" for o in repeated))
    try:
        made: Namespace = instantiate(config)[name]
        command = COMMANDS[name]
        return command(**{f.name: made[f.name] for f in dataclasses.fields(command) if f.init})
    except ValueError as error:
        _refuse(f"{name}: {error} (`{prog} --help` lists the options)")


def check_inputs(command: Any) -> None:
    """Refuse a parsed command whose input path options (a checkpoint, a run folder, captions, reference images, …)
    name nothing on disk: one ``error: --<option>: <path> does not exist (…)`` line, exit status 2, before the
    command runs or loads anything (:func:`~glide_lightning.sampling.inputs.missing_input`, the one check of them
    all). An output folder the command would refuse (``check_outputs``: one holding an earlier run's files) is
    said first, as :meth:`run` says it before reading any input. :func:`main` calls it after :func:`parse`, which
    builds command objects without touching the disk."""
    if not dataclasses.is_dataclass(command):
        return
    check_outputs = getattr(command, "check_outputs", None)
    if check_outputs is not None:
        check_outputs()  # a user error (OutputNotEmpty, …): main prints its one line
    problem = missing_input(command)
    if problem:
        _refuse(problem)


def _refuse(message: str) -> NoReturn:
    """A user's mistake found while parsing: one ``error:`` line on stderr (a multi-line message joined), exit 2."""
    lines = [line.strip() for line in message.strip().splitlines() if line.strip()]
    joined = "".join(line + ("" if i == len(lines) - 1 else " " if line.endswith(":") else "; ")
                     for i, line in enumerate(lines))  # `bad options:` then `- steps: …` reads as one sentence
    print(f"error: {joined}", file=sys.stderr)
    sys.exit(2)


def _recipe(config: Namespace, instantiate: Any, prog: str) -> Any:
    """The recipe object (a :mod:`data_recipes` dataclass) of a parsed ``data <recipe> ...``; a value the recipe
    refuses exits with status 2 naming the option, as the other commands' do."""
    recipe = config.data.recipe
    command = recipe_class(recipe)
    try:
        made: Namespace = instantiate(config)["data"][recipe]
        return command(**{f.name: made[f.name] for f in dataclasses.fields(command) if f.init})
    except ValueError as error:
        _refuse(f"data {recipe}: {error} (`{prog} --help` lists the options)")


def ablation_argv(argv: list[str]) -> list[str]:
    """``ablation <group> --seeds 0 1 2`` as the parser reads it: ``ablation --group <group> --seeds '[0, 1, 2]'``
    (a bare first word is the group; bare words after ``--seeds`` are its list). Other commands: ``argv`` unchanged."""
    if argv[:1] != ["ablation"]:
        return argv
    rest, out = argv[1:], ["ablation"]
    if rest and not rest[0].startswith("-"):
        out += ["--group", rest[0]]
        rest = rest[1:]
    i = 0
    while i < len(rest):
        if rest[i] == "--seeds" and i + 1 < len(rest) and not rest[i + 1].startswith(("-", "[")):
            j = i + 1
            while j < len(rest) and not rest[j].startswith("--"):
                j += 1
            out += ["--seeds", "[" + ", ".join(rest[i + 1:j]) + "]"]
            i = j
        else:
            out.append(rest[i])
            i += 1
    return out


def spelled(argv: list[str]) -> list[str]:
    """``argv`` with the accepted spellings of option names made canonical (see the module docstring)."""
    if argv[:1] == ["data"] and len(argv) > 1 and argv[1] in RECIPES:
        head, command = argv[:2], recipe_class(argv[1])
    elif argv and argv[0] in COMMANDS:
        head, command = argv[:1], COMMANDS[argv[0]]
    else:
        return argv
    fields = {f.name: f for f in dataclasses.fields(command)}
    grouped = {f.name for f in dataclasses.fields(fields["sampling"].default_factory())} if "sampling" in fields else set()
    bare_bools = {name for name, f in fields.items() if f.type in (bool, "bool")} if head[0] == "data" else set()
    out = list(head)
    rest = argv[len(head):]
    for i, arg in enumerate(rest):
        if arg.startswith("--"):
            name, eq, value = arg[2:].partition("=")
            plus = "+" if name.endswith("+") else ""
            name = name.removesuffix("+").replace("-", "_")
            if name not in fields and name in grouped:
                name = f"sampling.{name}"
            if name in bare_bools and not eq and (i + 1 == len(rest) or rest[i + 1].startswith("--")):
                eq, value = "=", "true"  # a recipe's bare flag: --overwrite
            arg = f"--{name}{plus}{eq}{value}"
        out.append(arg)
    return out


def _repeated_list_options(command: type, argv: list[str]) -> list[str]:
    """List-valued fields set twice with a plain ``--name`` (argparse's ``append`` habit): jsonargparse
    keeps the last value only, so ``--prompt a --prompt b`` would silently sample ``b`` alone."""
    lists = {f.name for f in dataclasses.fields(command) if "list[" in str(f.type)}
    given = Counter(arg[2:].split("=", 1)[0] for arg in argv if arg.startswith("--"))
    return sorted(name for name in lists if given[name] > 1)


USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, OSError, yaml.YAMLError)
"""What the commands raise for a user's mistake (a bad value, a missing or unwritable file, a broken YAML file),
with a message naming the input and the fix: printed as one ``error:`` line, without the traceback."""
DEBUG_ENV = "GLIDE_DEBUG"


def main(argv: list[str] | None = None) -> Any:
    """Run the command of ``argv`` (default: ``sys.argv[1:]``) and return what it returns.

    A user's mistake (:data:`USER_ERRORS`) ends the process with exit status 2 and one ``error: …`` line on
    stderr; ``--debug`` (anywhere in ``argv``) or ``GLIDE_DEBUG=1`` shows the full traceback instead. Any other
    exception is a bug and keeps its traceback."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get(DEBUG_ENV, "") not in ("", "0")
    argv = [arg for arg in argv if arg != "--debug"]
    try:
        if argv and argv[0] in TRAINING_COMMANDS:
            from glide_lightning.cli import main as train

            return train(argv)
        command = parse(argv)
        check_inputs(command)
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
        return command.run()
    except KeyboardInterrupt:  # Ctrl-C: what was written stays (fid/sweep resume from their images); no traceback
        if debug:
            raise
        print("interrupted (Ctrl-C): the files already written stay; run the same command again to go on",
              file=sys.stderr)
        sys.exit(130)
    except USER_ERRORS as error:
        if debug:
            raise
        message = str(error).strip() or type(error).__name__
        print(f"error: {message} (--debug shows the traceback)", file=sys.stderr)
        sys.exit(2)
