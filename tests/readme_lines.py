"""The README's command-line section, read by the tests that check it: the fast parse check
(``unit/test_readme_commands.py``) and the slow run of every line
(``slow/test_readme_commands_run.py``)."""

from __future__ import annotations

import glob
import shlex
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"


def readme_commands() -> list[str]:
    """The lines of the first ```bash block under '## Command line', comments dropped."""
    text = README.read_text()
    section = text.split("\n## Command line\n", 1)[1].split("\n## ", 1)[0]
    block = section.split("```bash\n", 1)[1].split("```", 1)[0]
    lines = []
    for line in block.splitlines():
        words = shlex.split(line, comments=True)
        if words:
            lines.append(shlex.join(words) if "*" not in line else line.split("#")[0].strip())
    return lines


def _argv(line: str, cwd: Path) -> list[str]:
    words = []
    for w in shlex.split(line, comments=True):
        words.extend(sorted(glob.glob(w, root_dir=cwd)) or [w] if "*" in w else [w])
    return words
