"""The command-line reference (docs/cli.md, "Commands") and the README's command lines, read by
the tests that check them: the fast parse check
(``unit/test_readme_commands.py``) and the slow run of every line
(``slow/test_readme_commands_run.py``)."""

from __future__ import annotations

import glob
import shlex
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
CLI_DOC = REPO / "docs" / "cli.md"


def _bash_block(path: Path, heading: str) -> list[str]:
    """The lines of the first ```bash block under ``heading`` in ``path``, comments dropped."""
    text = path.read_text()
    section = text.split(f"\n{heading}\n", 1)[1].split("\n## ", 1)[0]
    block = section.split("```bash\n", 1)[1].split("```", 1)[0]
    lines = []
    for line in block.splitlines():
        words = shlex.split(line, comments=True)
        if words:
            lines.append(shlex.join(words) if "*" not in line else line.split("#")[0].strip())
    return lines


def cli_commands() -> list[str]:
    """The lines of the command-line reference's block (docs/cli.md, '## Commands')."""
    return _bash_block(CLI_DOC, "## Commands")


def readme_commands() -> list[str]:
    """The lines of the README's block under '## Command line'."""
    return _bash_block(README, "## Command line")


def _argv(line: str, cwd: Path) -> list[str]:
    words = []
    for w in shlex.split(line, comments=True):
        words.extend(sorted(glob.glob(w, root_dir=cwd)) or [w] if "*" in w else [w])
    return words
