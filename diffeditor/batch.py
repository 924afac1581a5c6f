"""Batch editing (``diffeditor edit`` with many specs): inputs, output names, resume, failure
isolation, grouping by source image, progress and the summary.

The steps, each a function so that other runners (``diffeditor-ray``) reuse them:

1. :func:`collect` turns the command-line inputs (spec files, folders, glob patterns, JSONL
   manifests) into :class:`Job` s with stable output names: the spec file's path relative to the
   inputs' common folder (``cases/a/spec.json`` -> ``OUT/a/spec.png``), or the spec's ``id``
   field (``"id": "animals/JH_2023-09-14-1820-16"`` -> ``OUT/animals/JH_2023-09-14-1820-16.png``).
   Names do not depend on the order or the number of specs given, so they are the same in every
   run and in every chunk of a job.
2. :func:`prepare` validates each spec (a broken spec becomes a reported failure, the others go
   on), computes its :func:`spec_hash` (the validated spec, the model, the dtype and the bytes of
   every input file) and decides which edits are already done: an output whose image and sidecar
   exist and whose sidecar's ``spec_hash`` matches is skipped (resume); ``--force`` redoes it.
3. :func:`groups` orders the remaining edits by source image, so one worker's in-memory
   inversion cache serves every edit of an image.
4. :func:`run_one` edits one job on a loaded :class:`~diffeditor.editor.Editor` and writes the
   image and sidecar; it never raises for a failing edit, it returns an outcome. The local
   runner and each Ray worker call it, so both write the same bytes.
5. :func:`finish` writes ``failures.jsonl`` and prints the summary table; the exit status is 0
   when every edit succeeded (or was already done) and 1 otherwise.
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import CheckErrors, DiffEditorError, show

log = logging.getLogger("diffeditor")

SPEC_SUFFIXES = (".yaml", ".yml", ".json")
MANIFEST_SUFFIX = ".jsonl"
FAILURES_FILE = "failures.jsonl"


@dataclass
class Job:
    """One edit of a batch."""

    index: int  # position in the batch as given
    name: str  # output name relative to the output folder, without suffix (posix)
    source: Any  # what parse_spec takes: a spec file path or a dict
    base_dir: Path | None = None  # for a dict: the folder its relative paths start from
    spec_path: Path | None = None  # the file the spec came from (for the sidecar)
    error: str | None = None  # a problem found before any model loads
    spec: Any = None  # the validated spec
    out: Path | None = None
    hash: str = ""
    group: str = ""  # the source image (real path): edits of one image share an inversion

    where: str = ""  # the spec's file (and manifest line) as given: what messages name

    @property
    def label(self) -> str:
        return self.where or self.name

    def payload(self, args) -> dict:
        """What a worker needs to run this job (plain data: crosses process boundaries)."""
        return {"index": self.index, "name": self.name,
                "spec": self.spec.model_dump(mode="json"),
                "spec_path": str(self.spec_path) if self.spec_path else None,
                "out": str(self.out), "hash": self.hash,
                "force": bool(getattr(args, "force", False))}


@dataclass
class Outcome:
    index: int
    name: str
    status: str  # "written", "skipped" (already done) or "failed"
    out: str | None = None
    error: str | None = None
    wall_s: float = 0.0
    task: str = ""
    cached: bool = False
    worker: str = field(default_factory=lambda: f"pid {os.getpid()}")

    def to_json(self) -> dict:
        return dict(vars(self))


# -- 1. inputs ---------------------------------------------------------------------------------

def _has_glob(text: str) -> bool:
    return any(c in text for c in "*?[")


def _valid_id(value: Any) -> str | None:
    """An ``id`` usable as a relative output name, or None."""
    if not isinstance(value, str) or not value.strip() or "\\" in value or "\0" in value:
        return None
    parts = Path(value).parts
    if Path(value).is_absolute() or any(p in ("..", ".") for p in parts) or not parts:
        return None
    return Path(value).as_posix()


#: why a folder's file is not one of its specs (see :func:`_not_a_spec`), as the note says it
NOT_A_SPEC = "without 'task' and 'image' keys (schema files, case descriptions, one-edit files of compose)"
SIDECAR = "sidecars of earlier outputs"


def _not_a_spec(path: Path) -> str | None:
    """Why a YAML/JSON file found in a folder is not an edit spec, or None when it is one.

    An edit spec is a mapping with a ``task`` and an ``image`` key. Left out: sidecars (outputs,
    which ``diffeditor edit X.json`` replays when named), and files without both keys: JSON
    Schemas (``specs/schema.json``), the shapes world's ``case.json`` descriptions, ``compose``'s
    one-edit files (``specs/edits/``, no ``image``). A file that cannot be read or parsed is
    kept, so that validation reports it."""
    from .specs import is_sidecar, read_spec_file

    try:
        data = read_spec_file(path)
    except DiffEditorError:
        return None
    if is_sidecar(data):
        return SIDECAR
    if not (isinstance(data, dict) and "task" in data and "image" in data):
        return NOT_A_SPEC
    return None


def _note_skipped(folder: str, total: int, skipped: dict[str, list[str]]) -> None:
    """One line on stderr: how many of a folder's files were left out, and why (naming a few)."""
    parts = []
    for why, names in skipped.items():
        some = ", ".join(show(n, 60) for n in names[:3]) + (", ..." if len(names) > 3 else "")
        parts.append(f"{len(names)} {why}: {some}")
    count = sum(len(v) for v in skipped.values())
    print(f"note: {show(folder, 200)}: skipped {count} of {total} YAML/JSON files that are not "
          f"edit specs: {'; '.join(parts)}", file=sys.stderr)


def _expand(inputs: list[Path]) -> list[tuple[Path, int | None, Any]]:
    """``(file, line number or None, manifest line or None)`` for every spec named by the
    inputs, in order. Raises :class:`CheckErrors` for inputs that name nothing."""
    from .specs import SpecTextError, loads_json

    found: list[tuple[Path, int | None, Any]] = []
    errors = []
    for item in inputs:
        text = str(item)
        path = Path(text)
        if path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.suffix.lower() in SPEC_SUFFIXES
                           and p.is_file() and not any(q.startswith(".") for q in p.relative_to(path).parts))
            specs, skipped = [], {}
            for f in files:
                why = _not_a_spec(f)
                if why:
                    skipped.setdefault(why, []).append(f.relative_to(path).as_posix())
                else:
                    specs.append(f)
            if skipped:
                _note_skipped(text, len(files), skipped)
            if not specs:
                errors.append(f"{show(text, 200)}: no spec files (*.yaml, *.yml, *.json with "
                              "'task' and 'image' keys) in this folder")
            found += [(f, None, None) for f in specs]
        elif path.suffix.lower() == MANIFEST_SUFFIX and path.is_file():
            try:
                lines = path.read_text(encoding="utf-8").splitlines()
            except (OSError, UnicodeDecodeError) as exc:
                errors.append(f"{show(text, 200)}: cannot read the manifest: {exc}")
                continue
            if not any(line.strip() for line in lines):
                errors.append(f"{show(text, 200)}: no specs in this manifest (it is empty or "
                              f"holds blank lines only); write one JSON spec per line")
                continue
            for k, line in enumerate(lines, 1):
                if line.strip():
                    try:
                        found.append((path, k, loads_json(line)))
                    except json.JSONDecodeError as exc:
                        found.append((path, k, f"not valid JSON ({exc.msg})"))
                    except SpecTextError as exc:
                        found.append((path, k, str(exc)))
        elif not path.exists() and _has_glob(text):
            matches = sorted(glob.glob(text, recursive=True))
            if not matches:
                errors.append(f"{show(text, 200)}: no file matches this pattern")
            found += [(Path(m), None, None) for m in matches if Path(m).is_file()]
        else:
            found.append((path, None, None))
    if errors:
        raise CheckErrors(errors)
    return found


def collect(inputs: list[Path]) -> list[Job]:
    """The jobs named by the command line's inputs, with their output names."""
    from .specs import is_sidecar, read_spec_file

    found = _expand(inputs)
    folders = [os.path.abspath(f.parent) for f, _, _ in found]
    root = Path(os.path.commonpath(folders)) if folders else Path.cwd()
    jobs = []
    for i, (path, line, data) in enumerate(found):
        rel = Path(os.path.relpath(os.path.abspath(path), root)).with_suffix("").as_posix()
        job = Job(index=i, name=rel, source=path, spec_path=path, where=show(path, 200))
        if line is not None:  # a manifest's line: paths relative to the manifest's folder
            job.name = f"{rel}/{line:06d}"
            job.where = f"{show(path, 200)}:{line}"
            job.base_dir = path.resolve().parent
            job.spec_path = None
            if isinstance(data, str):
                job.error = f"{job.where}: {data}"
            elif not isinstance(data, dict):
                job.error = f"{job.where}: each line must be a JSON object (a spec)"
            else:
                job.source = dict(data)
        else:
            try:
                raw = read_spec_file(path) if path.is_file() else None
            except DiffEditorError:
                raw = None  # reported by validation
            if isinstance(raw, dict) and not is_sidecar(raw) and "id" in raw:
                job.source = dict(raw)
                job.base_dir = path.resolve().parent
        if isinstance(job.source, dict) and "id" in job.source:
            ident = job.source.pop("id")
            name = _valid_id(ident)
            if name is None:
                job.error = (f"{job.label}: id: {show(ident, 80)} is not a relative name (letters, digits, "
                             "'/', no '..'); it names the output file")
            else:
                job.name = name
        jobs.append(job)
    return jobs


# -- 2. validation, hashes, resume ------------------------------------------------------------

def _file_digest(path: Path, cache: dict) -> str:
    key = os.path.realpath(path)
    if key not in cache:
        h = hashlib.sha256()
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
        cache[key] = h.hexdigest()
    return cache[key]


def spec_hash(spec, model: str | None, dtype: str | None, digests: dict | None = None) -> str:
    """SHA-256 of what decides an edit's pixels: the validated spec (every field), the model
    name, the dtype and the bytes of every input file."""
    from .preflight import _input_files

    digests = {} if digests is None else digests
    files = {str(p): _file_digest(p, digests) for p in _input_files(spec)}
    blob = json.dumps({"spec": spec.model_dump(mode="json"), "model": model, "dtype": dtype,
                       "inputs": files}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def _model_key(args) -> str | None:
    """The model as the resume hash sees it: its name, and the LoRAs, VAE and checkpoint
    config when given (without them the key is the name alone, as before)."""
    extras = {k: getattr(args, k, None) for k in ("config", "lora", "vae")}
    if not any(extras.values()):
        return args.model
    return json.dumps({"model": args.model, **extras}, sort_keys=True)


def already_done(out: Path, digest: str) -> bool:
    """Whether ``out`` and its sidecar exist and the sidecar records ``digest``."""
    side = out.with_suffix(".json")
    if not (out.is_file() and side.is_file()):
        return False
    try:
        return json.loads(side.read_text()).get("spec_hash") == digest
    except (OSError, ValueError, AttributeError):
        return False


def prepare(jobs: list[Job], out_dir: Path, args, defaults: dict, single_out: Path | None = None,
            registry=None) -> tuple[list[Job], list[Outcome]]:
    """Validate the jobs (before any model loads). Returns the jobs to run and the outcomes
    already known (``skipped``: done in an earlier run; ``failed``: a broken spec, with
    ``--skip-invalid``). Broken specs (without ``--skip-invalid``) and problems of the command
    itself (options, an output that exists, two specs writing one file) raise
    :class:`CheckErrors`, every one listed, before anything is edited."""
    from .editor import check_spec
    from .imageio import check_output
    from .preflight import _input_files, _key, check_options, output_clashes
    from .specs import parse_spec

    force = bool(getattr(args, "force", False))
    known: list[Outcome] = []
    todo: list[Job] = []
    digests: dict = {}
    inputs: dict[str, str] = {}
    invalid: list[str] = []  # broken specs: the command fails unless --skip-invalid
    for job in jobs:
        job.out = single_out if single_out is not None else out_dir / f"{job.name}.png"
        if job.error is None:
            try:
                job.spec = parse_spec(job.source, base_dir=job.base_dir, defaults=defaults,
                                      registry=registry, source=job.label)
                check_spec(job.spec, registry=registry)
                job.hash = spec_hash(job.spec, _model_key(args), args.dtype, digests)
            except DiffEditorError as exc:
                msg = str(exc)
                job.error = msg if msg.startswith(job.label) else f"{job.label}: {msg}"
            except OSError as exc:  # an input vanished or is unreadable meanwhile
                job.error = f"{job.label}: {exc.strerror or exc}: {show(exc.filename, 200)}"
        if job.error is not None:
            if len(jobs) == 1 or not getattr(args, "skip_invalid", False):
                invalid.append(job.error)
                continue
            task = job.source.get("task") if isinstance(job.source, dict) else None
            known.append(Outcome(job.index, job.name, "failed", str(job.out), job.error,
                                 task=task if isinstance(task, str) else "(invalid)"))
            continue
        job.group = os.path.realpath(job.spec.image) if getattr(job.spec, "image", None) else ""
        if job.spec_path is not None:
            inputs.setdefault(_key(job.spec_path), f"spec file of {job.label}")
        for f in _input_files(job.spec):
            inputs.setdefault(_key(f), f"an input of {job.label}")
        if not force and already_done(job.out, job.hash):
            known.append(Outcome(job.index, job.name, "skipped", str(job.out), task=job.spec.task))
            continue
        todo.append(job)

    errors: list[str] = list(invalid)
    seen: set[str] = set()
    pending = {id(j) for j in todo}
    for job in jobs:
        if job.out is None:
            continue
        if id(job) in pending:  # (an edit already done is not written again)
            try:
                check_output(job.out, force)
            except DiffEditorError as exc:
                stale = job.out.with_suffix(".json").is_file()
                errors.append(str(exc) + (" (made from another spec, model or input: --force "
                                          "redoes it)" if stale else ""))
                continue
        errors += output_clashes(job.out, inputs, seen, "--out or --out-dir", "names or ids")
    errors += check_options(args)
    if errors:
        raise CheckErrors(errors)
    return todo, known


# -- 3. grouping -----------------------------------------------------------------------------

def groups(jobs: list[Job]) -> list[list[Job]]:
    """The jobs grouped by source image (groups in order of first appearance, jobs in the order
    given within a group): one worker edits a whole group, reusing its inversion."""
    by: dict[str, list[Job]] = {}
    for job in jobs:
        by.setdefault(job.group or f"#{job.index}", []).append(job)
    return list(by.values())


# -- threads -----------------------------------------------------------------------------------

def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def default_threads(workers_per_machine: int = 1) -> int:
    """Torch threads per worker: the machine's cores shared among its workers (at least 1);
    ``OMP_NUM_THREADS``, when set, wins (an explicit choice of the user's)."""
    env = os.environ.get("OMP_NUM_THREADS", "").strip()
    if env.isdigit() and int(env) > 0:
        return int(env)
    return max(1, cpu_count() // max(1, workers_per_machine))


class torch_threads:
    """``with torch_threads(n):`` torch's intra-op threads set to ``n`` and restored after (so a
    batch run inside a longer-lived process, a test or the web page, leaves it as it was)."""

    def __init__(self, n: int):
        self.n = n

    def __enter__(self) -> int:
        import torch

        self.before = torch.get_num_threads()
        torch.set_num_threads(self.n)
        return self.n

    def __exit__(self, *exc) -> None:
        import torch

        torch.set_num_threads(self.before)


def set_threads(n: int) -> int:
    import torch

    torch.set_num_threads(n)
    try:
        torch.set_num_interop_threads(n)
    except RuntimeError:  # already set once in this process
        pass
    return n


# -- 4. one edit -------------------------------------------------------------------------------

def run_one(editor, payload: dict, progress=None) -> Outcome:
    """Edit one job and write its image and sidecar (the sidecar records ``spec_hash`` and the
    torch thread count). Never raises for a failing edit: the outcome says what went wrong."""
    import torch

    name, index, out = payload["name"], payload["index"], Path(payload["out"])
    if not payload.get("force") and already_done(out, payload["hash"]):  # a retried task
        return Outcome(index, name, "skipped", str(out), task=payload["spec"].get("task", ""))
    t0 = time.perf_counter()
    try:
        result = editor.edit(payload["spec"], progress=progress, spec_path=payload["spec_path"])
        result.metadata["spec_hash"] = payload["hash"]
        result.metadata["threads"] = torch.get_num_threads()
        result.save(out, force=payload.get("force", False) or _ours(out, payload["hash"]))
    except KeyboardInterrupt:
        raise
    except Exception as exc:  # one failing spec must not stop the batch
        log.info("edit %s failed", name, exc_info=True)
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return Outcome(index, name, "failed", str(out), f"{name} failed: {msg}",
                       time.perf_counter() - t0, payload["spec"].get("task", ""))
    return Outcome(index, name, "written", str(out), None, time.perf_counter() - t0,
                   result.spec.task, bool(result.metadata.get("inversion_cached")))


def _ours(out: Path, digest: str) -> bool:
    """An image without its sidecar left by a worker that died between the two renames of one
    output (or the same edit written meanwhile): ours to replace."""
    return out.is_file() and not out.with_suffix(".json").is_file() or already_done(out, digest)


# -- 5. the end ----------------------------------------------------------------------------------

def write_failures(path: Path, outcomes: list[Outcome]) -> Path | None:
    """``failures.jsonl`` (one JSON object per failed edit) written atomically; an old one is
    removed when this run had no failure."""
    from .imageio import atomic_write

    failed = [o for o in sorted(outcomes, key=lambda o: o.index) if o.status == "failed"]
    if not failed:
        try:
            path.unlink()
        except FileNotFoundError:
            pass
        return None
    text = "".join(json.dumps({"name": o.name, "output": o.out, "error": o.error}) + "\n"
                   for o in failed)
    atomic_write(path, lambda fh: fh.write(text.encode()), force=True)
    return path


def summary_table(outcomes: list[Outcome], wall_s: float, workers: int = 1) -> list[str]:
    """The lines of the end-of-batch table: per task, edits written / skipped / failed and the
    mean seconds per written edit; then the totals and the throughput."""
    rows: dict[str, list] = {}
    for o in outcomes:
        r = rows.setdefault(o.task or "?", [0, 0, 0, 0.0])
        r[{"written": 0, "skipped": 1, "failed": 2}[o.status]] += 1
        if o.status == "written":
            r[3] += o.wall_s
    lines = [f"{'task':<12} {'written':>7} {'skipped':>7} {'failed':>6} {'s/edit':>7}"]
    for task, (w, s, f, t) in sorted(rows.items()):
        lines.append(f"{task:<12} {w:>7} {s:>7} {f:>6} {(t / w if w else 0):>7.1f}")
    w = sum(o.status == "written" for o in outcomes)
    rate = 60 * w / wall_s if wall_s > 0 and w else 0.0
    lines.append(f"{'all':<12} {w:>7} {sum(o.status == 'skipped' for o in outcomes):>7} "
                 f"{sum(o.status == 'failed' for o in outcomes):>6}   "
                 f"{wall_s:.1f} s wall, {rate:.2f} edits/min, {workers} worker(s)")
    return lines


def finish(outcomes: list[Outcome], failures_path: Path | None, wall_s: float,
           workers: int = 1, stream=None) -> int:
    """Failures file, summary table and the last line; returns the exit status."""
    stream = stream or sys.stderr
    n = len(outcomes)
    failed = [o for o in sorted(outcomes, key=lambda o: o.index) if o.status == "failed"]
    where = write_failures(failures_path, outcomes) if failures_path is not None else None
    if n > 1:
        for line in summary_table(outcomes, wall_s, workers):
            print(line, file=stream)
        written = sum(o.status == "written" for o in outcomes)
        skipped = sum(o.status == "skipped" for o in outcomes)
        print(f"{written + skipped} of {n} edits done ({written} written, {skipped} already "
              f"done); {len(failed)} failed" + (f": see {where}" if where else ""), file=stream)
    return 1 if failed else 0


def report(outcome: Outcome, stream=None, bar=None) -> None:
    """One line per finished edit (stdout), or the failure's one line (stderr); with the
    batch's progress ``bar``, the line goes above it and the bar advances by one."""
    if bar is not None:
        bar.clear()
    if outcome.status == "failed":
        print(f"diffeditor: {outcome.error}", file=stream or sys.stderr)
    elif outcome.status == "written":
        print(f"{outcome.out}  ({outcome.wall_s:.1f} s"
              f"{', cached inversion' if outcome.cached else ''})", flush=True)
    if bar is not None:
        bar.update(1)


def batch_bar(total: int, quiet: bool, initial: int = 0):
    """The progress bar over the batch (edits, with ETA) on stderr; None when quiet."""
    if quiet or total <= 1:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc="batch", unit="edit", file=sys.stderr,
                dynamic_ncols=True)


def outcome_from_json(data: dict) -> Outcome:
    return Outcome(**data)
