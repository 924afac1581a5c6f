"""The Ray runner of ``diffeditor edit --ray``.

Ray's own primitives do the scheduling: one actor per worker (:class:`EditWorker`, the model
loaded once in its constructor), a :class:`ray.util.ActorPool` handing out groups of edits
(one group = the edits of one source image, so the worker's inversion cache serves them all),
and Ray's actor fault tolerance for crashes: a dead worker process is restarted
(``max_restarts``) and its unfinished call retried (``max_task_retries``). Edits themselves run
through :func:`diffeditor.batch.run_one`, exactly as in a single process, and the workers write
the images and sidecars into the output folder (a path every node sees).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable

from diffeditor import batch
from diffeditor.errors import DiffEditorError

#: Ray restarts a dead worker this many times, and retries the call it was running
MAX_RESTARTS = 3
MAX_TASK_RETRIES = 3

_MODEL_OPTIONS = ("model", "device", "dtype", "cache_dir", "vae_tiling", "vae_slicing",
                  "attention_slice", "compile", "image_prompt_weights", "image_prompt_encoder",
                  "config", "lora", "vae")


class EditWorker:
    """One worker: loads the model once, pins torch's threads, edits groups of jobs."""

    def __init__(self, options: dict, threads: int, command_line: str):
        from diffeditor.cli import load_editor

        t0 = time.perf_counter()
        self.threads = batch.set_threads(threads)
        self.editor = load_editor(argparse.Namespace(**options))
        self.editor.command_line = command_line
        self.load_s = time.perf_counter() - t0

    def info(self) -> dict:
        return {"pid": os.getpid(), "load_s": self.load_s, "threads": self.threads}

    def edit_group(self, payloads: list[dict]) -> list[dict]:
        """Edit one group; a failing edit is an outcome, not an exception."""
        return [batch.run_one(self.editor, p).to_json() for p in payloads]


def _connect(address: str) -> bool:
    """Start or join Ray; True when this call did (so it disconnects at the end)."""
    import ray

    if ray.is_initialized():
        return False
    try:
        if address == "local":
            ray.init(num_cpus=batch.cpu_count(), include_dashboard=False, log_to_driver=False,
                     logging_level="WARNING")
        else:
            ray.init(address=address, log_to_driver=False, logging_level="WARNING")
    except (ConnectionError, RuntimeError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DiffEditorError(f"--ray {address}: cannot connect to a Ray cluster ({first}); "
                              "start one with 'ray start --head', or give --ray alone for a "
                              "local one") from None
    return True


def plan_workers(args, n_groups: int, resources: dict, nodes: int) -> tuple[int, int, float]:
    """(workers, threads per worker, GPUs per worker) for this cluster."""
    gpw = float(args.gpus_per_worker or 0.0)
    cpus = int(resources.get("CPU", 1))
    if args.workers:
        workers = args.workers
    elif gpw > 0:
        workers = max(1, int(resources.get("GPU", 0) / gpw))
    else:
        workers = max(1, cpus // (args.threads or 1))
    workers = max(1, min(workers, n_groups))
    per_node = -(-workers // max(1, nodes))
    if args.threads:
        threads = args.threads
    elif nodes <= 1:
        threads = batch.default_threads(per_node)
    else:
        threads = max(1, (cpus // nodes) // per_node)
    return workers, threads, gpw


def run(todo, known, args, total: int, on_result: Callable | None = None):
    """Run ``todo`` on Ray; returns ``(outcomes, workers)``. ``on_result(outcomes, actors,
    infos)`` is called in the driver after each finished group (a test kills a worker from it;
    ``infos``: each worker's pid, model-load seconds and threads at start)."""
    if not todo:
        return [], 0
    import ray
    from ray.util import ActorPool

    groups = batch.groups(todo)
    started = _connect(args.ray)
    try:
        nodes = sum(1 for n in ray.nodes() if n.get("Alive"))
        workers, threads, gpw = plan_workers(args, len(groups), ray.cluster_resources(), nodes)
        from diffeditor.cli import command_line

        options = {k: getattr(args, k, None) for k in _MODEL_OPTIONS}
        remote = ray.remote(EditWorker).options(
            num_cpus=threads, num_gpus=gpw, max_restarts=MAX_RESTARTS,
            max_task_retries=MAX_TASK_RETRIES)
        t0 = time.perf_counter()
        actors = [remote.remote(options, threads, command_line()) for _ in range(workers)]
        infos = ray.get([a.info.remote() for a in actors])
        if not args.quiet:
            loads = ", ".join(f"{i['load_s']:.1f}" for i in infos)
            print(f"ray: {workers} worker(s) ready in {time.perf_counter() - t0:.1f} s "
                  f"(model load {loads} s; "
                  f"{threads} thread(s) each; {len(groups)} group(s) of edits)", file=sys.stderr)
        bar = batch.batch_bar(total, args.quiet, initial=len(known))
        pool = ActorPool(actors)
        for group in groups:
            pool.submit(lambda a, g: a.edit_group.remote(g), [j.payload(args) for j in group])
        outcomes: list[batch.Outcome] = []
        try:
            while pool.has_next():
                try:
                    results = [batch.outcome_from_json(r) for r in pool.get_next_unordered()]
                except ray.exceptions.RayError as exc:  # a worker lost beyond its retries
                    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                    print(f"diffeditor: a Ray worker failed: {first}", file=sys.stderr)
                    continue
                for o in results:
                    outcomes.append(o)
                    batch.report(o, bar=bar)
                if on_result is not None:
                    on_result(outcomes, actors, infos)
        finally:
            if bar is not None:
                bar.close()
        done = {o.index for o in outcomes}
        for job in todo:  # edits whose worker was lost for good
            if job.index not in done:
                outcomes.append(batch.Outcome(job.index, job.name, "failed", str(job.out),
                                              f"{job.name}: its Ray worker died (retries used up)",
                                              task=job.spec.task))
        for a in actors:
            ray.kill(a)
        return outcomes, workers
    finally:
        if started:
            ray.shutdown()
