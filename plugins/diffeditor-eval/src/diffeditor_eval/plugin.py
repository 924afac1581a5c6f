"""``diffeditor eval ...``: the evaluation commands, registered through ``register_commands``.

Each benchmark is one function decorated with :func:`eval_command` that receives the ``eval``
sub-parsers and adds its own parser (with ``set_defaults(func=handler)``). Adding a benchmark
(for example ``diffeditor eval shapes``) is adding one such function. Heavy imports (torch,
diffusers) happen inside the handlers so that plugin discovery stays fast.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

from diffeditor.hookspecs import hookimpl

#: Functions ``add(eval_subparsers) -> None``, one per ``diffeditor eval <benchmark>`` command.
EVAL_COMMANDS: list[Callable[[argparse._SubParsersAction], None]] = []

EXIT_OK, EXIT_NOTHING_SCORED, EXIT_METRIC_SKIPPED = 0, 1, 2


def eval_command(add: Callable[[argparse._SubParsersAction], None]):
    """Register ``add`` as the builder of one ``diffeditor eval`` sub-command."""
    EVAL_COMMANDS.append(add)
    return add


@hookimpl
def register_commands(subparsers):
    """Add ``diffeditor eval`` with one sub-command per benchmark in :data:`EVAL_COMMANDS`."""
    parser = subparsers.add_parser(
        "eval",
        help="score edits on a benchmark",
        description="Score edits on a benchmark. Metric variants are named in the output.",
    )
    benchmarks = parser.add_subparsers(dest="benchmark", metavar="BENCHMARK", required=True)
    for add in EVAL_COMMANDS:
        add(benchmarks)


# -- diffeditor eval dragbench -------------------------------------------------------------------


@eval_command
def add_dragbench(benchmarks) -> None:
    p = benchmarks.add_parser(
        "dragbench",
        help="MD / IF (and DAI) of already-edited DragBench images",
        description=(
            "Score already-edited DragBench images. The edit of case <category>/<name> is read "
            "from EDITED/<category>/<name>/dragged_image.png (DragDiffusion's layout) or "
            "EDITED/<name>.png and similar. MD needs Stable Diffusion 2.1 (DIFT features), IF "
            "needs the lpips package and its AlexNet weights."
        ),
    )
    p.add_argument("bench", type=Path, metavar="DIR", help="the DragBench folder (original format)")
    p.add_argument(
        "--edited", type=Path, required=True, metavar="DIR", help="folder of the edited images"
    )
    p.add_argument(
        "--json", type=Path, metavar="OUT", help="write the per-case and summary results here"
    )
    p.add_argument("--force", action="store_true", help="overwrite an existing --json file")
    p.add_argument(
        "--metrics",
        type=_metric_list,
        default="md,if",
        help="comma-separated subset of md, if, dai (default: md,if)",
    )
    p.add_argument(
        "--dift-model",
        default=None,
        metavar="PATH|ID",
        help="SD 2.1 folder or hub id for MD (default: stabilityai/stable-diffusion-2-1)",
    )
    p.add_argument(
        "--device", default=None, help="torch device for MD / IF (default: cuda if available)"
    )
    p.add_argument("--ensemble", type=int, default=8, help="DIFT ensemble size (default 8)")
    p.add_argument("--seed", type=int, default=0, help="seed of DIFT's noise (default 0)")
    p.set_defaults(func=run_dragbench)


@eval_command
def add_dragbench_specs(benchmarks) -> None:
    p = benchmarks.add_parser(
        "dragbench-specs",
        help="write every DragBench case as a diffeditor drag spec (for diffeditor edit)",
        description=(
            "Write every DragBench case as OUT/<category>/<name>/spec.json (with image.png and "
            "mask.png beside it). 'diffeditor edit OUT --out-dir EDITED' then edits them all, "
            "writing EDITED/<category>/<name>/spec.png, which 'diffeditor eval dragbench BENCH "
            "--edited EDITED' scores."
        ),
    )
    p.add_argument("bench", type=Path, metavar="DIR", help="the DragBench folder (original format)")
    p.add_argument("--out", type=Path, required=True, metavar="DIR",
                   help="folder for the spec folders (required)")
    p.add_argument("--steps", type=int, default=None, metavar="N",
                   help="denoising steps of every spec (default: the drag task's own)")
    p.add_argument("--force", action="store_true", help="write into an existing, non-empty --out")
    p.set_defaults(func=run_dragbench_specs)


def run_dragbench_specs(args: argparse.Namespace) -> int:
    from diffeditor.errors import OutputError

    from .dragbench import iter_dragbench, write_specs

    if args.steps is not None and args.steps < 1:
        raise OutputError(f"--steps must be at least 1, not {args.steps}")
    if args.out.exists() and any(args.out.iterdir()) and not args.force:
        raise OutputError(f"{args.out} exists and is not empty; choose another --out or add --force")
    cases = list(iter_dragbench(args.bench))
    paths = write_specs(cases, args.out, steps=args.steps)
    print(f"{len(paths)} specs written under {args.out}")
    return 0


def _metric_list(text: str) -> list[str]:
    wanted = [m.strip().lower() for m in text.split(",") if m.strip()]
    unknown = sorted(set(wanted) - {"md", "if", "dai"})
    if unknown or not wanted:
        raise argparse.ArgumentTypeError(
            f"unknown metric(s) {unknown or text!r}; choose from md, if, dai"
        )
    return wanted


def run_dragbench(args: argparse.Namespace) -> int:
    """Handler of ``diffeditor eval dragbench``; returns the exit status.

    0: every requested metric was computed; 1: no case had an edited image; 2: a metric was
    skipped because its weights are missing (the others are still reported).
    """
    import torch

    from diffeditor.imageio import check_writable

    from . import metrics as M
    from .dragbench import evaluate_dragbench, iter_dragbench

    wanted = args.metrics if isinstance(args.metrics, list) else _metric_list(args.metrics)
    if args.json:  # before any scoring: an existing file needs --force
        check_writable(args.json, getattr(args, "force", False))
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    cases = list(iter_dragbench(args.bench))

    def load_dift():
        return M.DIFTFeatures.from_pretrained(
            args.dift_model or M.SD21, device=device, ensemble_size=args.ensemble
        )

    result = evaluate_dragbench(
        cases,
        args.edited,
        wanted,
        dift=load_dift,
        fidelity=lambda a, b: M.image_fidelity(a, b, device=device),
        seed=args.seed,
    )
    result = {"benchmark": str(args.bench), "edited": str(args.edited), **result}
    if args.json:  # atomically, strict JSON
        from diffeditor.imageio import save_json

        save_json(result, args.json, force=getattr(args, "force", False))

    print(
        f"{result['summary']['cases']} of {len(cases)} cases scored, "
        f"{result['summary']['pairs']} pairs"
    )
    for name, value in result["summary"].items():
        if name not in ("cases", "pairs"):
            print(f"  {name}: {value:.4f}")
    if result["missing"]:
        print(
            f"no edited image for {len(result['missing'])} case(s): {', '.join(result['missing'])}",
            file=sys.stderr,
        )
    for metric, reason in result["skipped"].items():
        print(f"{metric} skipped: {reason}", file=sys.stderr)
    if not result["cases"]:
        return EXIT_NOTHING_SCORED
    return EXIT_METRIC_SKIPPED if result["skipped"] else EXIT_OK


@eval_command
def add_shapes(benchmarks) -> None:
    """``diffeditor eval shapes``: the ground-truth benchmark on the shapes model."""
    from .shapes_eval import add_shapes_command

    add_shapes_command(benchmarks)
