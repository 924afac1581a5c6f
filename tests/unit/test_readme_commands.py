"""The command-line reference (docs/cli.md, "Commands") is a contract: every line parses with
the real parser and names files that exist (fast), and every line runs as written (slow,
``slow/test_readme_commands_run.py``). The README's command lines are lines of that block, so
they are checked too. The README's test command is the one CI runs."""

from __future__ import annotations

import shlex

import pytest
from readme_lines import README, REPO, _argv, cli_commands, readme_commands


def test_the_cli_page_names_the_commands():
    commands = cli_commands()
    assert len(commands) >= 14
    names = [shlex.split(c)[1] for c in commands]
    assert {"tasks", "plugins", "models", "schema", "edit", "move", "drag", "compose", "bench",
            "eval", "download"} <= set(names)


def test_the_readme_commands_are_lines_of_the_cli_page():
    """The README shows a few command lines; each is a line of docs/cli.md's block, so the
    tests here parse and run it as written."""
    readme = readme_commands()
    assert len(readme) >= 3
    missing = [line for line in readme if line not in cli_commands()]
    assert not missing, f"README command lines not in docs/cli.md's block: {missing}"


@pytest.mark.parametrize("line", cli_commands())
def test_each_cli_command_parses_and_its_files_exist(line):
    from diffeditor.cli import build_parser

    argv = _argv(line, REPO)
    assert argv[0] == "diffeditor"
    if argv[1] == "eval":
        pytest.importorskip("diffeditor_eval")
    try:
        args = build_parser().parse_args(argv[1:])
    except SystemExit as exc:  # argparse's way of saying the README drifted
        raise AssertionError(f"docs/cli.md's command does not parse: {line}") from exc
    assert getattr(args, "func", None) is not None, line
    for word in argv:
        if word.startswith("specs/"):
            assert (REPO / word).exists(), f"{line}: {word} does not exist"
    if "--model" in argv:
        assert argv[argv.index("--model") + 1] == "shapes", line


def test_the_readme_test_command_is_what_ci_runs():
    text = README.read_text()
    block = text.split("**Tests**", 1)[1].split("```bash\n", 1)[1].split("```", 1)[0].strip()
    ci = [ln for ln in (REPO / ".ci" / "run").read_text().splitlines()
          if ln.strip() and not ln.startswith(("#", "set ", "cd ", "export "))]
    assert ci == [block]
    for plugin in ("diffeditor-shapes", "diffeditor-eval", "diffeditor-example", "diffeditor-ui",
                   "diffeditor-ray"):
        assert f"./plugins/{plugin}" in block, f"{plugin} is not installed by CI"
