"""nox sessions: ``nox -s tests`` (the whole suite), ``nox -s fast`` (no slow end-to-end
cases), ``nox -s unit`` (tests/unit: no model, no subprocess; docs/testing.md), ``nox -s lint``
(ruff), ``nox -s mutate`` (mutation testing, not run by default), ``nox -s fuzz`` (the fuzz
suite's long profile, not run by default)."""

import os
import shutil

import nox

nox.options.sessions = ["lint", "tests"]
PLUGINS = ["./plugins/diffeditor-shapes", "./plugins/diffeditor-eval", "./plugins/diffeditor-example",
           "./plugins/diffeditor-ui[test]", "./plugins/diffeditor-ray", "./plugins/diffeditor-train"]


def _install(session: nox.Session) -> None:
    session.install("torch==2.13.0")  # the CPU wheel; drop the pin on GPU machines
    session.install("-e", ".[test,face]")
    session.install(*PLUGINS)  # after the kernel: they depend on the installed diffeditor


@nox.session
def tests(session: nox.Session) -> None:
    _install(session)
    session.run("pytest", *session.posargs)


@nox.session
def fast(session: nox.Session) -> None:
    _install(session)
    session.run("pytest", "-m", "not slow", *session.posargs)


@nox.session
def unit(session: nox.Session) -> None:
    _install(session)
    session.run("pytest", "tests/unit", *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    session.install("ruff")
    session.run("ruff", "check", "diffeditor", "tasks", "plugins", "tests", "tools")


@nox.session
def fuzz(session: nox.Session) -> None:
    """The fuzz suite (tests/unit/test_fuzz.py, docs/reliability.md) with many more examples per
    property than the fast suite's: ``FUZZ_EXAMPLES`` (default 2000), random seeds."""
    _install(session)
    examples = os.environ.get("FUZZ_EXAMPLES", "2000")
    session.run("pytest", "tests/unit/test_fuzz.py", "-q", "-p", "no:cacheprovider", *session.posargs,
                env={"DIFFEDITOR_FUZZ_EXAMPLES": examples, "OMP_NUM_THREADS": "1"})


@nox.session
def mutate(session: nox.Session) -> None:
    """Mutation testing of the sampler's kernel (docs/testing.md): mutmut over the files and
    tests named in pyproject's [tool.mutmut], then the kill rate. ``nox -s mutate -- NAME...``
    runs only the named mutants (globs allowed). Threads pinned: MUTMUT_CHILDREN workers
    (default 2), one thread each."""
    _install(session)
    session.install("mutmut==3.8.1")  # mutant ids (docs/mutants-equivalent.txt) follow its operators
    env = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    children = os.environ.get("MUTMUT_CHILDREN", "2")
    if not session.posargs:  # a full run starts afresh: mutmut keeps verdicts when only tests change
        shutil.rmtree("mutants", ignore_errors=True)
    session.run("mutmut", "run", "--max-children", children, *session.posargs, env=env)
    session.run("python", "tools/mutation_report.py", env=env)
