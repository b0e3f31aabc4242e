"""The README and docs/ name only what exists: every script, file and flag of their commands.

Each fenced bash/shell block is split into commands; a command that runs a stage script (directly, under
`accelerate launch`/`deepspeed`, or `python -m`) must name a script that exists and flags that its
parser takes (legacy names included, as `ser.cli.legacy_argv` maps them)."""

import importlib
import re
import shlex

import pytest
from transformers import HfArgumentParser

from conftest import ROOT
from ser.cli import REMOVED, legacy_argv

DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def arguments(module: str):
    """The dataclasses a script's command line is parsed into."""
    mod = importlib.import_module(module)
    if hasattr(mod, "ARGUMENTS"):
        return mod.ARGUMENTS
    if module == "ppo.judge":
        return (mod.Args, mod.JudgeArgs)
    if module == "ser.plan":
        return (mod.PlanArgs,)
    for name in ("ScriptArguments", "Args"):
        if hasattr(mod, name):
            return (getattr(mod, name),)
    raise AssertionError(f"{module}: no argument dataclass found")


def commands(text: str):
    """(command words) of every fenced bash/shell block, continuation lines joined."""
    for block in re.findall(r"```(?:bash|shell)\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #")[0].strip()
            if line and not line.startswith("#"):
                try:
                    yield shlex.split(line)
                except ValueError:
                    yield line.split()


def script_and_flags(words):
    """The module a command runs and the flags it gives it, or None for other commands."""
    for i, word in enumerate(words):
        if word == "-m" and i + 1 < len(words):
            return words[i + 1], words[i + 2:]
        if word.endswith(".py") and not word.startswith("-"):
            return word, words[i + 1:]
    return None


def test_the_readme_is_short_and_no_generator_writes_into_it():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 200
    assert "<!--" not in text  # the generated blocks live in docs/


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_every_command_names_a_script_and_flags_that_exist(doc):
    checked = 0
    for words in commands(doc.read_text()):
        found = script_and_flags(words)
        if not found:
            continue
        script, rest = found
        if script.endswith(".py"):
            assert (ROOT / script).is_file(), f"{doc.name}: {' '.join(words)}: no script {script}"
            module = script.removesuffix(".py").replace("/", ".")
        else:
            module = script
        if not (ROOT / (module.replace(".", "/") + ".py")).is_file():
            continue  # a module of another package (e.g. `python -m pytest`)
        parser = HfArgumentParser(arguments(module))
        flags = [w.split("=")[0] for w in legacy_argv([w for w in rest if w not in ("...",)])
                 if w.startswith("--")]
        for flag in flags:
            assert flag not in REMOVED and flag in parser._option_string_actions, \
                f"{doc.name}: {' '.join(words)}: {module} takes no {flag}"
        checked += 1
    assert checked or doc.name not in ("README.md", "stages.md", "scaling.md"), f"{doc.name}: no command checked"


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_every_file_of_the_repository_the_docs_name_exists(doc):
    text = doc.read_text()
    named = set(re.findall(r"`((?:scripts|sft|ppo|data|ser|tests|bench|experiments|docs)/[\w./-]+\.(?:py|sh|yaml|json|md|sbatch))`",
                           text))
    named |= {m for m in re.findall(r"\]\(((?:docs/)?[\w-]+\.md)\)", text)}
    for name in named:
        path = (doc.parent / name) if doc.parent.name == "docs" and "/" not in name else ROOT / name
        assert path.exists(), f"{doc.name} names {name}, which does not exist"
