"""The README's Python blocks run as pasted, so the README cannot drift from the code.

Every ```python block of README.md is run on its own, in a fresh interpreter (a
subprocess started in an empty temporary folder, the repository on
``PYTHONPATH``), exactly as written: no variable, import or file from another
block or from the test.  Each block states its run time on a 2-core CPU in its
first comment lines.  Blocks under a heading listed in ``SLOW`` run only under
``pytest -m slow`` (the README says how to shrink them); blocks that need an
optional package (``REQUIRES``) are skipped when it is missing.

Time the blocks by hand with ``python tests/test_readme.py`` (prints wall
seconds per block, one at a time).
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"

#: headings whose blocks run longer than the default tier allows (run under ``-m slow``)
SLOW = {
    "Bayesian phases (`slt.sample_posterior`)",
    "Exact references (`slt.reference`)",
    "Symmetry and susceptibility",
    "Decomposing the LLC over symmetries",
    "Language models and other real networks",
}
#: headings whose blocks import an optional package: skipped without it
REQUIRES = {"Language models and other real networks": "transformers"}
#: the time statement every block carries in its first comment lines
TIME_RE = re.compile(r"#.*\b\d+(\.\d+)?\s*(s|min)\b.*2-core CPU", re.IGNORECASE)


def readme_blocks(text: str | None = None) -> list[tuple[str, int, str]]:
    """``(heading, line, code)`` of every ```python block of the README, in order."""
    text = README.read_text(encoding="utf-8") if text is None else text
    blocks, heading, code, start = [], "", None, 0
    for i, line in enumerate(text.splitlines(), 1):
        if code is None:
            if line.startswith("#") and not line.startswith("#!"):
                heading = line.lstrip("#").strip()
            elif line.strip() == "```python":
                code, start = [], i + 1
        elif line.strip() == "```":
            blocks.append((heading, start, "\n".join(code) + "\n"))
            code = None
        else:
            code.append(line)
    return blocks


def _block_id(heading: str, line: int) -> str:
    words = re.sub(r"[^a-z0-9]+", "-", heading.lower()).strip("-")
    return f"{words[:40]}-L{line}"


def _params():
    out = []
    for heading, line, code in readme_blocks():
        marks = [pytest.mark.slow] if heading in SLOW else []
        out.append(pytest.param(heading, line, code, id=_block_id(heading, line), marks=marks))
    return out


def run_block(code: str, cwd: Path, timeout: float = 1800) -> subprocess.CompletedProcess:
    env = {**os.environ, "MPLBACKEND": "Agg", "TQDM_DISABLE": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
    return subprocess.run([sys.executable, "-c", code], cwd=str(cwd), env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_readme_has_python_blocks_and_each_states_its_time():
    blocks = readme_blocks()
    assert len(blocks) >= 6
    headings = {h for h, _, _ in blocks}
    assert SLOW <= headings, f"SLOW names headings without a block: {SLOW - headings}"
    for heading, line, code in blocks:
        head = "\n".join(code.splitlines()[:3])
        assert TIME_RE.search(head), (f"README block at line {line} ({heading}) does not state its time on a "
                                      f"2-core CPU in its first comment lines:\n{head}")


def test_readme_blocks_are_extracted_exactly():
    text = "# A\n```python\nx = 1\n```\n## B `c`\ntext\n```bash\nls\n```\n```python\ny = 2\nprint(y)\n```\n"
    assert readme_blocks(text) == [("A", 3, "x = 1\n"), ("B `c`", 11, "y = 2\nprint(y)\n")]


@pytest.mark.parametrize("heading,line,code", _params())
def test_readme_block_runs_as_pasted(heading, line, code, tmp_path):
    need = REQUIRES.get(heading)
    if need and importlib.util.find_spec(need) is None:
        pytest.skip(f"needs {need} (pip install -e '.[lm]')")
    p = run_block(code, tmp_path)
    assert p.returncode == 0, (f"README block at line {line} ({heading}) failed as pasted:\n"
                               f"{p.stdout[-3000:]}\n{p.stderr[-5000:]}")


if __name__ == "__main__":  # time every block (or those whose heading contains argv[1])
    import tempfile

    pick = sys.argv[1] if len(sys.argv) > 1 else ""
    for heading, line, code in readme_blocks():
        if pick.lower() not in heading.lower():
            continue
        with tempfile.TemporaryDirectory() as d:
            t0 = time.perf_counter()
            p = run_block(code, Path(d))
            dt = time.perf_counter() - t0
        print(f"{dt:7.1f} s  rc={p.returncode}  line {line}: {heading}", flush=True)
        if p.returncode:
            print(p.stderr[-3000:], flush=True)
