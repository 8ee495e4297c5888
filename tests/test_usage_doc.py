"""docs/usage.md runs: every ```python block, in page order, one namespace per ``## `` section.

The page's snippets assert what they claim (float64 agreement with references, error messages,
shapes), so executing them tests both the page and the library. Code is compiled under the
page's file name and at its line numbers, so a traceback points into docs/usage.md.

Each section must run on its own, copied into a fresh script: its own namespace here catches a
name borrowed from another section, and the page's own set-up of ``TRITON_INTERPRET`` (before
theria, so before triton, is imported) is checked in every section and run in a fresh process for
one of them, since this process has it from conftest.py already.
"""

from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys
import traceback

import pytest

USAGE = pathlib.Path(__file__).resolve().parents[1] / "docs" / "usage.md"


def _sections(text: str) -> list[tuple[str, list[tuple[int, str]]]]:
    """[(title, [(first line number, code), ...])] for every ``## `` section, in page order.

    Fences of any language are tracked so that a ``## `` line inside a code block is not taken
    for a heading; only ```python blocks are collected.
    """
    sections: list[tuple[str, list[tuple[int, str]]]] = []
    fence = None  # None outside a code block, else (language, first line, lines)
    for number, line in enumerate(text.splitlines(), start=1):
        if fence is not None:
            if line.startswith("```"):
                language, first, lines = fence
                if language == "python" and sections:
                    sections[-1][1].append((first, "\n".join(lines)))
                fence = None
            else:
                fence[2].append(line)
        elif line.startswith("```"):
            fence = (line[3:].strip(), number + 1, [])
        elif line.startswith("## "):
            sections.append((line[3:].strip(), []))
    assert fence is None, "docs/usage.md ends inside a code block"
    return sections


SECTIONS = _sections(USAGE.read_text(encoding="utf-8"))
WITH_CODE = [(title, snippets) for title, snippets in SECTIONS if snippets]


def test_every_section_has_code():
    """Guards against a parsing change that would leave the other tests with nothing to run."""
    without_code = [title for title, snippets in SECTIONS if not snippets]
    assert len(SECTIONS) >= 10 and not without_code, (
        f"sections: {[title for title, _ in SECTIONS]}; without code: {without_code}")


@pytest.mark.parametrize("title, snippets", WITH_CODE, ids=[title for title, _ in WITH_CODE])
def test_section_runs(title, snippets, one_torch_thread):
    namespace = {"__name__": "docs_usage"}
    for first_line, code in snippets:
        # Blank lines in front keep the page's line numbers in tracebacks.
        compiled = compile("\n" * (first_line - 1) + code, str(USAGE), "exec")
        try:
            exec(compiled, namespace)
        except Exception as error:
            # The deepest frame on the page is the line that failed (a bare assert has no message).
            on_page = [f for f in traceback.extract_tb(error.__traceback__) if f.filename == str(USAGE)]
            where = f"line {on_page[-1].lineno} `{on_page[-1].line}`" if on_page else f"line {first_line}"
            raise AssertionError(
                f"docs/usage.md, section {title!r}, {where}: {type(error).__name__}: {error}") from error


def _first_theria_import(code: str) -> int | None:
    match = re.search(r"^(import|from) theria", code, re.MULTILINE)
    return match.start() if match else None


@pytest.mark.parametrize("title, snippets", WITH_CODE, ids=[title for title, _ in WITH_CODE])
def test_section_sets_the_interpreter_before_importing_theria(title, snippets):
    first_code = snippets[0][1]
    theria_at = _first_theria_import(first_code)
    assert theria_at is not None, f"section {title!r}: its first block should import what it uses"
    interpret_at = first_code.find('os.environ.setdefault("TRITON_INTERPRET", "1")')
    assert 0 <= interpret_at < theria_at, (
        f"section {title!r}: set TRITON_INTERPRET before importing theria (see the Installation check)")


def test_a_section_runs_alone_in_a_fresh_process():
    """"Hello world" as a script of its own, without conftest.py's TRITON_INTERPRET."""
    (_, snippets), = [(title, snippets) for title, snippets in WITH_CODE if title == "Hello world"]
    script = "\n\n".join(code for _, code in snippets)
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
