"""The docs cannot drift silently: every file path, `bigbatch.*` module or object and `bigbatch`
command-line option that README.md and docs/*.md name exists, and docs/DEVELOPING.md's table of
who owns what names modules and objects that are there."""

from __future__ import annotations

import argparse
import importlib
import re
from pathlib import Path

import pytest

from bigbatch import cli

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
TOP = ("bigbatch", "configs", "benchmarks", "docs", "tests", "examples", "slurm", "docker", ".ci")
SUBPACKAGES = ("trainer", "study", "measure", "distributed", "launch", "config")

CODE = re.compile(r"`([^`\n]+)`")
PATH = re.compile(r"(?<![\w./-])((?:%s)/[\w./-]*\w)" % "|".join(re.escape(t) for t in TOP))
# a module path under bigbatch/ as DEVELOPING.md writes them (`trainer/batching.py`)
INNER = re.compile(r"(?<![\w./-])((?:%s)/[\w/]+\.py)\b" % "|".join(SUBPACKAGES))
DOTTED = re.compile(r"\bbigbatch(?:\.\w+)+(?![\w/])")
FILE_SUFFIXES = ("py", "toml", "json", "jsonl", "md", "sqsh", "sif", "log", "png", "html", "txt")
COMMAND = re.compile(r"\bbigbatch ([a-z]+)((?: +[^\s`|]+)*)")
OPTION = re.compile(r"(?<![\w-])(--[a-z][a-z0-9-]*)")


def _texts() -> list[tuple[str, str]]:
    return [(str(p.relative_to(ROOT)), p.read_text()) for p in DOCS]


def _spans(text: str) -> list[str]:
    """Inline code and fenced blocks: where paths, modules and commands are named."""
    fenced = re.findall(r"```[^\n]*\n(.*?)```", text, flags=re.S)
    rest = re.sub(r"```.*?```", "", text, flags=re.S)
    return fenced + CODE.findall(rest) + re.findall(r"\]\(([^)]+)\)", rest)


def test_every_path_the_docs_name_exists():
    missing = []
    for doc, text in _texts():
        for span in _spans(text):
            for path in PATH.findall(span):
                if any(c in path for c in "*<>{}") or path.endswith("/..."):
                    continue
                if not (ROOT / path).exists() and not (ROOT / "docs" / path).exists():
                    missing.append(f"{doc}: {path}")
            missing += [f"{doc}: {path} (under bigbatch/)" for path in INNER.findall(span)
                        if not (ROOT / "bigbatch" / path).is_file()]
    assert not missing, "\n".join(sorted(set(missing)))


def test_the_readme_layout_names_modules_that_exist():
    """README's Layout block: `bigbatch/PKG/   mod, mod (what it is), ...`: each mod is PKG/mod.py or PKG/mod/."""
    text = (ROOT / "README.md").read_text().split("## Layout", 1)[1]
    block = re.search(r"```[^\n]*\n(.*?)```", text, flags=re.S).group(1)
    missing = []
    for line in block.splitlines():
        m = re.match(r"(bigbatch/\w+/)\s+(.*)", line)
        if not m:
            continue
        words = re.sub(r"\([^)]*\)", "", m.group(2))  # what each is, in parentheses
        for name in re.findall(r"[a-z_]+", words):
            if not ((ROOT / m.group(1) / f"{name}.py").is_file() or (ROOT / m.group(1) / name).is_dir()):
                missing.append(f"{m.group(1)}{name}")
    assert not missing, missing


def _resolve(dotted: str) -> bool:
    """bigbatch.a.b.c: the longest importable module prefix, then attributes."""
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ModuleNotFoundError:
            continue
        for attr in parts[i:]:
            if not hasattr(obj, attr):
                return False
            obj = getattr(obj, attr)
        return True
    return False


def test_every_module_and_object_the_docs_name_exists():
    missing = [f"{doc}: {name}" for doc, text in _texts() for span in _spans(text)
               for name in DOTTED.findall(span)
               if name.rsplit(".", 1)[1] not in FILE_SUFFIXES and not _resolve(name)]
    assert not missing, "\n".join(sorted(set(missing)))


def _parser(command: str) -> argparse.ArgumentParser:
    module = importlib.import_module(cli.COMMANDS[command][0])
    parser = argparse.ArgumentParser(prog=f"bigbatch {command}")
    module.add_arguments(parser)
    return parser


def _options(parser: argparse.ArgumentParser, words: list[str]) -> tuple[set[str], list[str]]:
    """The options a command line can use: the parser's, and a named subcommand's."""
    opts = set(parser._option_string_actions)
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            named = [w for w in words if w in action.choices] or list(action.choices)  # none named: any
            for sub in named:
                opts |= set(action.choices[sub]._option_string_actions)
    return opts, words


def test_every_command_and_option_the_docs_name_exists():
    parsers: dict[str, argparse.ArgumentParser] = {}
    wrong = []
    for doc, text in _texts():
        for span in _spans(text):
            for line in span.splitlines():
                for command, args in COMMAND.findall(line):
                    if command not in cli.COMMANDS:
                        if command in ("is", "the", "a", "and", "or"):  # prose: "bigbatch is ..."
                            continue
                        wrong.append(f"{doc}: bigbatch {command} (no such command)")
                        continue
                    parser = parsers.setdefault(command, _parser(command))
                    known, _ = _options(parser, args.split())
                    wrong += [f"{doc}: bigbatch {command} {o}" for o in OPTION.findall(args) if o not in known]
    assert not wrong, "\n".join(sorted(set(wrong)))


def _concept_rows() -> list[tuple[str, str, str]]:
    text = (ROOT / "docs" / "DEVELOPING.md").read_text()
    table = text.split("## Where each concept lives", 1)[1].split("\n## ", 1)[0]
    rows = []
    for line in table.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 3 and not set(cells[0]) <= set("-: ") and cells[0] != "concept":
            rows.append((cells[0], cells[1], cells[2]))
    return rows


def _module_of(path: str) -> str:
    """`trainer/batching.py` -> bigbatch.trainer.batching (DEVELOPING names paths under bigbatch/)."""
    path = path.removeprefix("bigbatch/").removesuffix(".py")
    return "bigbatch." + path.replace("/", ".")


def test_developing_concept_table_matches_the_code():
    rows = _concept_rows()
    assert len(rows) >= 10, "the concept table is missing or empty"
    wrong = []
    for concept, owners, notes in rows:
        modules = []
        for path in re.findall(r"`([\w/.]+\.py)`", owners):
            if not (ROOT / "bigbatch" / path.removeprefix("bigbatch/")).is_file():
                wrong.append(f"{concept}: {path} does not exist")
            else:
                modules.append(importlib.import_module(_module_of(path)))
        if not modules:
            wrong.append(f"{concept}: names no owner module")
            continue
        # every `Class`, `Class.attr(...)` or `function(...)` in the notes is defined by one of the owners
        # (lowercase words without parentheses are config keys, file names or commands)
        for ref in CODE.findall(notes):
            name = re.fullmatch(r"([A-Z]\w*(?:\.\w+)*)(\(.*\))?|([a-z_]\w*(?:\.\w+)*)\(.*\)", ref)
            if name is None or ref.isupper():
                continue
            head, *attrs = (name.group(1) or name.group(3)).split(".")
            found = [m for m in modules if hasattr(m, head)]
            if not found:
                wrong.append(f"{concept}: `{ref}` is not in {', '.join(m.__name__ for m in modules)}")
                continue
            obj = getattr(found[0], head)
            for a in attrs:
                if not hasattr(obj, a):
                    wrong.append(f"{concept}: `{ref}`: {head} has no {a}")
                    break
                obj = getattr(obj, a)
    assert not wrong, "\n".join(wrong)


@pytest.mark.parametrize("command", sorted(cli.COMMANDS))
def test_every_command_is_in_the_readme(command):
    assert f"bigbatch {command}" in (ROOT / "README.md").read_text(), command
