"""Every code block of the README runs as written (the install and test commands are run by .ci/run)."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BLOCK = re.compile(r"```(\w+)\n(.*?)```", re.S)
#: Shell steps that .ci/run executes itself (a venv, installs, the test suite).
RUN_BY_CI = ("python3 -m venv", "pip install", ". .venv/bin/activate", "python -m pytest")


def _blocks(kind: str) -> list[str]:
    return [body for lang, body in BLOCK.findall((ROOT / "README.md").read_text()) if lang == kind]


def _shell_lines() -> list[list[str]]:
    """Each command line of the README's bash blocks as its ``&&``-joined steps (those CI runs itself
    left out); the steps of one line run in order in one folder, so a line may use what an earlier
    step of it wrote."""
    lines = []
    for body in _blocks("bash"):
        for line in body.splitlines():
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            steps = [s.strip() for s in line.split("&&") if not s.strip().startswith(RUN_BY_CI)]
            if steps:
                lines.append(steps)
    return lines


def test_readme_has_the_two_commands():
    first = _blocks("bash")[0]
    assert "pip install torch==2.13.0" in first and 'pip install -e ".[dev]"' in first
    assert "python -m experiments.report" in first and "python -m pytest -q" in first


@pytest.mark.parametrize("code", _blocks("python"), ids=lambda c: c.splitlines()[0][:40])
def test_python_blocks_run(code, tmp_path, preloaded):
    """Each Python block runs as ``python -c`` (in a process that starts with codi_lens imported)."""
    proc = preloaded.run(["-c", code], cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    if "print(result.answer_text" in code:  # the printed answers are what the README says they are
        printed = re.search(r"print\(result\.answer_text, result\.prediction\)\s+#\s*(.*)", code).group(1)
        assert proc.stdout.splitlines()[0] == printed


@pytest.mark.parametrize("steps", _shell_lines(), ids=lambda steps: steps[0][:60])
def test_shell_lines_run(steps, tmp_path, preloaded):
    """Each command line of the README (the demo included) exits 0, run from a scratch folder (``python``
    steps in a process that starts with codi_lens imported)."""
    for step in steps:
        if step.startswith("python "):
            proc = preloaded.run(shlex.split(step)[1:], cwd=tmp_path, timeout=900)
        else:
            proc = subprocess.run(shlex.split(step), cwd=tmp_path, capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, f"{step}\n{proc.stderr[-3000:]}"


def test_every_experiment_has_a_docs_page_whose_links_resolve():
    names = sorted(p.stem for p in (ROOT / "experiments").glob("*.py") if p.stem != "__init__")
    pages = {p.stem for p in (ROOT / "docs").glob("*.md")}
    assert set(names) <= pages, sorted(set(names) - pages)
    for page in (ROOT / "docs").glob("*.md"):
        for target in re.findall(r"\]\(([^)#]+)\)", page.read_text()):
            assert (page.parent / target).exists(), f"{page.name} links to missing {target}"
    for target in re.findall(r"\]\((docs/[^)#]+)\)", (ROOT / "README.md").read_text()):
        assert (ROOT / target).exists(), f"README links to missing {target}"


def test_preloaded_commands_behave_as_a_fresh_interpreter(preloaded, tmp_path):
    """The forked commands that the README's lines run in (``tests/preloaded.py``) give the exit status, streams,
    working folder, ``sys.argv`` and ``sys.path[0]`` that a fresh ``python`` gives, failures included."""
    probe = "import os, sys; print(os.getcwd(), sys.argv, repr(sys.path[0]), __name__); sys.exit(3)"
    failing = (["-c", "raise ValueError('no such value')"], ["-m", "experiments.evaluate", "--bad"])
    for argv in (["-c", probe], ["-m", "site"], *failing):
        fresh = subprocess.run([sys.executable, *argv], cwd=tmp_path, capture_output=True, text=True, timeout=120)
        forked = preloaded.run(argv, cwd=tmp_path)
        assert (forked.returncode, forked.stdout) == (fresh.returncode, fresh.stdout), argv
        assert forked.stderr.strip().splitlines()[-1:] == fresh.stderr.strip().splitlines()[-1:], argv
