"""README.md and docs/*.md stay true to the code: every relative link (and anchor) resolves, every command their
code blocks show parses, every source path they name exists, and the README stays a short landing page.

Commands are checked in-process, not run: ``python -m glide_lightning <command> ...`` goes through the front door
(:func:`glide_lightning.commands.main`) with ``--print_config`` appended, which parses the whole command line (and
for ``fit`` the experiment's YAML) and exits 0 before anything is loaded or trained; the other commands are also
built by :func:`glide_lightning.commands.parse`, so their dataclasses' own checks run. ``make <target> ...`` lines
name a target of the Makefile, an experiment (``EXP=``) and a recipe (``RECIPE=``) that exist, and are mapped to
what they run by ``make -n`` (a dry run), whose ``python -m glide_lightning`` / ``python -m data_recipes`` lines are
parsed in turn. ``python -m data_recipes ...`` goes through the recipes' own argparse parser.
"""

from __future__ import annotations

import ast
import contextlib
import functools
import importlib
import inspect
import io
import re
import shlex
import shutil
import subprocess
import sys
from unittest import mock
from pathlib import Path

import pytest
from hang_guard import HANG_GUARD_S

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
PAGES = [README, *sorted((REPO / "docs").glob("*.md"))]
README_MAX_LINES = 200

FENCE = re.compile(r"^```(\w*)\s*$")
LINK = re.compile(r"!?\[(?:[^\]\[]|\[[^\]]*\])*\]\(([^)\s]+)\)")
INLINE_CODE = re.compile(r"`([^`\n]+)`")
SOURCE_PATH = re.compile(r"(?:glide_lightning|data_recipes|experiments|scripts|tests)/[\w./-]*\w")
MODULE_CALL = re.compile(r"(?:^|\s)-m\s+(glide_lightning|data_recipes)\s+([^;|&]*)")  # python / torchrun -m


def page_id(page: Path) -> str:
    return str(page.relative_to(REPO))


def split_page(page: Path) -> tuple[list[str], list[tuple[str, list[str]]]]:
    """The page's prose lines (outside code blocks) and its code blocks as (language, lines)."""
    prose: list[str] = []
    blocks: list[tuple[str, list[str]]] = []
    current: list[str] | None = None
    for line in page.read_text().splitlines():
        fence = FENCE.match(line)
        if fence and current is None:
            current, language = [], fence.group(1)
        elif line.startswith("```") and current is not None:
            blocks.append((language, current))
            current = None
        elif current is not None:
            current.append(line)
        else:
            prose.append(line)
    assert current is None, f"{page_id(page)}: a code block is not closed"
    return prose, blocks


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped (``-`` and ``_`` kept), spaces to ``-``."""
    text = re.sub(r"[`*]", "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


@functools.cache
def anchors(page: Path) -> set[str]:
    prose, _ = split_page(page)
    return {slug(line.lstrip("#")) for line in prose if re.match(r"#{1,6} ", line)}


def shell_commands(lines: list[str]) -> list[str]:
    """A bash block's commands: continuation lines joined, comment-only and blank lines dropped."""
    commands, pending = [], ""
    for line in lines:
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        command = (pending + line).strip()
        pending = ""
        if command and not command.startswith("#"):
            commands.append(command)
    return commands


def words(command: str) -> list[str]:
    """``command`` split as the shell does, without comments and leading ``VAR=value`` environment settings."""
    tokens = shlex.split(command, comments=True)
    while tokens and re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", tokens[0]):
        tokens.pop(0)
    return tokens


def shown_commands() -> list[tuple[str, str]]:
    """(page, command) of every command in the bash code blocks of the README and docs/."""
    return [(page_id(page), command) for page in PAGES for language, lines in split_page(page)[1]
            if language in ("bash", "sh", "shell") for command in shell_commands(lines)]


# ------------------------------------------------------------------------------------------------------ README
def test_readme_is_a_short_landing_page():
    lines = README.read_text().splitlines()
    assert len(lines) <= README_MAX_LINES, (f"README.md has {len(lines)} lines (at most {README_MAX_LINES}): move "
                                            f"reference material into docs/ and link it")


def test_readme_lists_every_experiment_and_docs_page():
    text = README.read_text()
    for experiment in sorted(p.stem for p in (REPO / "experiments").glob("*.yaml")):
        assert re.search(rf"^\| `{experiment}` \|", text, re.MULTILINE), (
            f"experiments/{experiment}.yaml has no line in the README's experiments table")
    for page in PAGES[1:]:
        assert f"]({page_id(page)})" in text, f"the README's docs index does not link {page_id(page)}"


# ------------------------------------------------------------------------------------------------------- links
@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_relative_links_resolve(page):
    prose, _ = split_page(page)
    broken = []
    for target in LINK.findall("\n".join(prose)):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto:, …
            continue
        path, _, anchor = target.partition("#")
        resolved = (page.parent / path).resolve() if path else page
        if not resolved.exists():
            shown = resolved.relative_to(REPO) if resolved.is_relative_to(REPO) else resolved
            broken.append(f"{target} (no such file: {shown})")
        elif anchor and (resolved.suffix != ".md" or anchor not in anchors(resolved)):
            broken.append(f"{target} (no heading #{anchor} in {resolved.name})")
    assert not broken, f"{page_id(page)}: broken links:\n  " + "\n  ".join(broken)


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_source_paths_named_in_prose_exist(page):
    prose, _ = split_page(page)
    missing = sorted({path for code in INLINE_CODE.findall("\n".join(prose)) if not re.search(r"[<*{…]", code)
                      for path in SOURCE_PATH.findall(code) if not (REPO / path).exists()})
    assert not missing, f"{page_id(page)} names files that do not exist: {missing}"


def test_source_paths_named_in_the_code_exist():
    """Docstrings and comments name files too (``scripts/slurm_train.sbatch`` was once named by a folder that never
    existed): every source path quoted in backticks in the package, the recipes, the scripts and the Makefile."""
    files = [*REPO.glob("glide_lightning/**/*.py"), *REPO.glob("data_recipes/**/*.py"), *REPO.glob("scripts/*"),
             REPO / "Makefile"]
    missing = sorted({f"{file.relative_to(REPO)}: {path}" for file in files
                      for code in INLINE_CODE.findall(file.read_text()) if not re.search(r"[<*{…$]", code)
                      for path in SOURCE_PATH.findall(code) if not (REPO / path).exists()})
    assert not missing, f"files named that do not exist: {missing}"


# ----------------------------------------------------------------------------------------------------- commands
@pytest.fixture(scope="module")
def fast_parsers():
    """Parsers built once, so that checking dozens of commands takes seconds: jsonargparse reads the same classes'
    docstrings for every parser it builds (only help texts come from them), the front door's parser is the same
    for every command line, and a ``fit`` parse needs LightningCLI's ``fit`` subcommand alone (not ``validate``,
    ``test``, ``predict``, each as costly to build): what a command line means is parsed exactly as without them."""
    from jsonargparse import _optionals

    from glide_lightning import commands

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(_optionals, "parse_docstring", functools.cache(_optionals.parse_docstring))
        patch.setattr(commands, "build_parser", functools.cache(commands.build_parser))
        patch.setattr(sys, "argv", ["glide_lightning"])  # LightningCLI reads (and warns about) pytest's own
        patch.chdir(REPO)  # experiments/… paths are read relative to the checkout, as make runs them
        yield


def print_config(argv: list[str]) -> str:
    """Parse ``python -m glide_lightning <argv> --print_config`` in-process; its YAML (exit status 0) or fail."""
    from glide_lightning.commands import COMMANDS, TRAINING_COMMANDS, main, parse

    out, err = io.StringIO(), io.StringIO()
    with contextlib.ExitStack() as stack:
        if argv[0] in TRAINING_COMMANDS:
            from glide_lightning.cli import GlideCLI

            only = {argv[0]: GlideCLI.subcommands()[argv[0]]}
            stack.enter_context(mock.patch.object(GlideCLI, "subcommands", staticmethod(lambda: only)))
        stack.enter_context(contextlib.redirect_stdout(out))
        stack.enter_context(contextlib.redirect_stderr(err))
        exit_ = stack.enter_context(pytest.raises(SystemExit))
        main([*argv, "--print_config"])
    assert exit_.value.code in (0, None), f"exit {exit_.value.code}:\n{err.getvalue()[-3000:]}"
    if argv[0] in COMMANDS or argv[0] == "data":
        with contextlib.redirect_stderr(err):
            try:
                parse(argv)  # the dataclass too: its own checks of the values
            except SystemExit as error:
                pytest.fail(f"exit {error.code} building the command:\n{err.getvalue()[-3000:]}")
    assert out.getvalue().strip(), "--print_config printed nothing"
    return out.getvalue()


@pytest.mark.parametrize("argv,error", [
    (["sample", "--ckpt", "x.ckpt", "--no_such_option", "1"], "no_such_option"),
    (["sample", "--ckpt", "x.ckpt", "--sampling.steps", "ddim50"], "ddim"),  # the dataclass's own check
    (["fit", "--config", "experiments/smoke.yaml", "--model.no_such_field", "1"], "no_such_field"),
])
def test_a_command_that_does_not_parse_is_caught(fast_parsers, argv, error):
    print_config(["sample", "--ckpt", "x.ckpt"])  # a good one first: the parsers built once keep no state
    with pytest.raises((AssertionError, pytest.fail.Exception)) as caught:
        print_config(argv)
    assert error in str(caught.value)


def check_recipe(argv: list[str]) -> None:
    """Parse ``python -m data_recipes <argv>``: through the front door (``python -m glide_lightning data``, of which
    it is an alias) where that has the ``data`` command, else with the recipes' own parser."""
    from data_recipes import RECIPES
    from glide_lightning import commands

    assert argv and argv[0] in RECIPES, f"unknown recipe in {argv}: one of {list(RECIPES)}"
    if hasattr(commands, "recipe_parser"):
        print_config(["data", *argv])
        return
    from data_recipes.__main__ import build_parser

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            build_parser().parse_args(argv)
        except SystemExit as error:
            pytest.fail(f"python -m data_recipes {shlex.join(argv)}: exit {error.code}\n{err.getvalue()}")


def module_calls(command: str) -> list[tuple[str, list[str]]]:
    """The ``python -m glide_lightning|data_recipes ARGS`` a (possibly compound) shell line runs, as (module, argv);
    lines that use shell variables (a ``for`` loop's ``$arm``) are left out."""
    calls = []
    for module, rest in MODULE_CALL.findall(command):
        if "$" not in rest:
            calls.append((module, words(rest)))
    return calls


NO_MODULE_TARGETS = ("setup", "test", "help", "bench-gpu", "bench-learning", "clean")
"""Makefile targets that run no ``python -m glide_lightning`` / ``data_recipes`` (pip, pytest, scripts/)."""


@functools.cache
def makefile_targets() -> set[str]:
    return set(re.findall(r"^([a-z][a-z-]*):", (REPO / "Makefile").read_text(), re.MULTILINE))


@functools.cache
def make_dry_run(argv: tuple[str, ...]) -> str:
    """What ``make argv`` would run (``make -n``; the checks and ``setup`` prerequisites skipped)."""
    skip = [arg for target in ("setup", "check-exp", "check-run", "check-recipe") for arg in ("-o", target)]
    run = subprocess.run(["make", "-n", "--no-print-directory", *skip, *argv], cwd=REPO, capture_output=True,
                         text=True, timeout=HANG_GUARD_S)
    assert run.returncode == 0, f"make -n {shlex.join(argv)}:\n{run.stderr}"
    return re.sub(r"\\\n\s*", " ", run.stdout)


def check_make(argv: list[str]) -> list[tuple[str, list[str]]]:
    """Check a ``make`` line's target and variables; the module calls it maps to (none without ``make``)."""
    from data_recipes import RECIPES

    target = next(arg for arg in argv if "=" not in arg)
    assert target in makefile_targets(), f"make {target}: no such target (the Makefile's: {sorted(makefile_targets())})"
    variables = dict(arg.split("=", 1) for arg in argv if "=" in arg)
    if "EXP" in variables:
        experiment = variables["EXP"]
        assert (REPO / "experiments" / f"{experiment}.yaml").is_file(), f"EXP={experiment}: no such experiment"
    if "RECIPE" in variables:
        assert variables["RECIPE"] in RECIPES, f"RECIPE={variables['RECIPE']}: one of {RECIPES}"
    if shutil.which("make") is None:
        return []
    return [call for line in make_dry_run(tuple(argv)).splitlines() for call in module_calls(line)]


def test_commands_shown_in_readme_and_docs_parse(fast_parsers):
    commands = shown_commands()
    assert any(c.startswith("python -m glide_lightning") for _, c in commands)
    assert any(c.startswith("make train") for _, c in commands)
    seen: set[tuple[str, tuple[str, ...]]] = set()
    failures, checked = [], 0
    for page, command in commands:
        tokens = words(command)
        try:
            if tokens[0] == "make":
                calls = check_make(tokens[1:])
                target = next(arg for arg in tokens[1:] if "=" not in arg)
                assert calls or shutil.which("make") is None or target in NO_MODULE_TARGETS, (
                    "make -n runs no python -m glide_lightning / data_recipes")
            elif tokens[0] in ("sbatch",):
                script = next(t for t in tokens[1:] if not t.startswith("-") and "/" in t)
                assert (REPO / script).is_file(), f"{script}: no such file"
                calls = []
            else:
                calls = module_calls(command)
                assert calls, "not a command of this project: teach tests/test_docs.py what it runs"
            for module, argv in calls:
                if (module, tuple(argv)) in seen:
                    continue
                seen.add((module, tuple(argv)))
                checked += 1
                if module == "glide_lightning" or argv[:1] == ["data"]:
                    print_config(argv)
                else:
                    check_recipe(argv)
        except (AssertionError, pytest.fail.Exception) as error:
            failures.append(f"{page}: {command}\n    {str(error).strip()[:1500]}")
    assert not failures, f"{len(failures)} command(s) shown in the docs do not parse:\n" + "\n".join(failures)
    assert checked >= 20  # the docs show dozens: the extraction itself still finds them


# ----------------------------------------------------------------------------------------------------- Python
def python_blocks() -> list[tuple[str, str]]:
    return [(page_id(page), "\n".join(lines)) for page in PAGES for language, lines in split_page(page)[1]
            if language == "python"]


@pytest.mark.parametrize("page,code", python_blocks(), ids=lambda v: v if v.endswith(".md") else "")
def test_python_snippets_use_the_real_api(page, code):
    """Each snippet's ``glide_lightning`` imports exist, and each call of an imported function or class binds to
    its signature (the arguments are not evaluated: the snippets need checkpoints this test does not have)."""
    tree = ast.parse(code)
    imported = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "glide_lightning":
            module = importlib.import_module(node.module)
            for alias in node.names:
                assert hasattr(module, alias.name), f"{page}: {node.module} has no {alias.name}"
                imported[alias.asname or alias.name] = getattr(module, alias.name)
    assert imported, f"{page}: a Python snippet that imports nothing from glide_lightning"
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in imported:
            if any(isinstance(a, ast.Starred) for a in node.args) or any(k.arg is None for k in node.keywords):
                continue
            signature = inspect.signature(imported[node.func.id])
            try:
                signature.bind(*node.args, **{k.arg: k.value for k in node.keywords})
            except TypeError as error:
                pytest.fail(f"{page}: {ast.unparse(node)}: {error} (signature {node.func.id}{signature})")
