"""The Python code shown in README.md and the user guide runs as printed.

The code blocks of one page run in order in one namespace, as a reader would run
them. A block marked ``:class: no-test`` (an illustration that needs data the page
does not build, or takes minutes) is skipped.
"""

import re
import warnings
from pathlib import Path

import matplotlib
import pytest

matplotlib.use("Agg")

ROOT = Path(__file__).resolve().parents[1]
PAGES = sorted((ROOT / "doc").rglob("*.rst")) + [ROOT / "README.md"]


def _rst_blocks(text):
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        m = re.match(r"^(\s*)\.\. code-block:: python\s*$", lines[i])
        if not m:
            i += 1
            continue
        i += 1
        options = []
        while i < len(lines) and re.match(r"^\s+:\w[\w-]*:", lines[i]):
            options.append(lines[i].strip())
            i += 1
        body = []
        while i < len(lines) and (not lines[i].strip() or lines[i].startswith(m.group(1) + "   ")):
            body.append(lines[i])
            i += 1
        indent = min((len(b) - len(b.lstrip()) for b in body if b.strip()), default=0)
        code = "\n".join(b[indent:] for b in body)
        yield code, any("no-test" in o for o in options)


def _md_blocks(text):
    for m in re.finditer(r"```python\n(.*?)```", text, flags=re.S):
        yield m.group(1), False


def _blocks(page):
    text = page.read_text()
    return list(_md_blocks(text) if page.suffix == ".md" else _rst_blocks(text))


@pytest.mark.parametrize("page", [p for p in PAGES if _blocks(p)], ids=lambda p: str(p.relative_to(ROOT)))
def test_code_blocks_run(page, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": "__docs__"}
    for k, (code, skip) in enumerate(_blocks(page)):
        if skip:
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                exec(compile(code, f"{page.name}, code block {k + 1}", "exec"), namespace)
            except Exception as exc:  # pragma: no cover - the message is the point
                raise AssertionError(f"{page.name}, code block {k + 1} fails: {exc!r}\n{code}") from exc
