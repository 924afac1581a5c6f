"""Throughput of one process vs N Ray workers on the same specs, measured in one run (issue 16).

    python tools/measure_batch.py --bench ../shared/data/dragbench-sample --copies 2 --steps 10

Writes the DragBench sample as specs ``--copies`` times (distinct folders, so distinct source
images and groups), runs ``diffeditor edit`` on them in one process and then with ``--ray
--workers N`` (a local Ray instance), each with ``--threads 1``, checks that both wrote the same
bytes, and prints one JSON line: edits, wall seconds and edits per minute of each, the Ray
workers' start-up, and the load average before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bench", type=Path, required=True)
    ap.add_argument("--copies", type=int, default=2)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--model", default="shapes")
    a = ap.parse_args()
    from diffeditor_eval.dragbench import iter_dragbench, write_specs

    work = Path(tempfile.mkdtemp(prefix="measure-batch-"))
    cases = list(iter_dragbench(a.bench))
    for k in range(a.copies):
        write_specs(cases, work / "cases" / f"copy{k}", steps=a.steps)
    n = len(cases) * a.copies
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    result: dict = {"edits": n, "steps": a.steps, "model": a.model, "cpus": os.cpu_count(),
                    "load_before": os.getloadavg()}
    for name, extra in (("one_process", []), (f"ray_{a.workers}_workers",
                                               ["--ray", "--workers", str(a.workers)])):
        out = work / name
        t0 = time.perf_counter()
        res = subprocess.run([sys.executable, "-m", "diffeditor.cli", "edit", str(work / "cases"),
                              "--model", a.model, "--out-dir", str(out), "--threads", "1",
                              *extra], env=env, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        if res.returncode != 0:
            print(res.stderr[-3000:], file=sys.stderr)
            return 1
        per_edit = [float(m) for m in re.findall(r"\((\d+\.\d+) s", res.stdout)]
        started = re.search(r"ready in (\d+\.\d+) s \(model load ([\d., ]+) s", res.stderr)
        result[name] = {"wall_s": round(wall, 1), "edits_per_min": round(60 * n / wall, 2),
                        "mean_edit_s": round(sum(per_edit) / len(per_edit), 2)}
        if started:
            result[name]["workers_ready_s"] = float(started.group(1))
            result[name]["model_load_s"] = [float(x) for x in started.group(2).split(",")]
    one = {p.relative_to(work / "one_process"): p.read_bytes() for p in (work / "one_process").rglob("*.png")}
    two = {p.relative_to(work / f"ray_{a.workers}_workers"): p.read_bytes()
           for p in (work / f"ray_{a.workers}_workers").rglob("*.png")}
    result["same_bytes"] = one == two and len(one) == n
    result["load_after"] = os.getloadavg()
    print(json.dumps(result))
    shutil.rmtree(work)
    return 0


if __name__ == "__main__":
    sys.exit(main())
