"""nox sessions: ``nox -s tests`` (the whole suite), ``nox -s fast`` (no slow end-to-end
cases), ``nox -s lint`` (ruff)."""

import nox

nox.options.sessions = ["lint", "tests"]
PLUGINS = ["./plugins/diffeditor-shapes", "./plugins/diffeditor-eval"]


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
def lint(session: nox.Session) -> None:
    session.install("ruff")
    session.run("ruff", "check", "diffeditor", "tasks", "plugins", "tests")
