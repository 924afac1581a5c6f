"""``diffeditor shapes scene``: an edit case of the shapes world from the command line.

It writes what :func:`diffeditor_shapes.scenes.save_case` writes (the inputs, ``spec.json``,
the true result ``truth.png`` and ``case.json``), so ``diffeditor edit DIR/spec.json --model
shapes`` runs the case as it is and its output can be compared with ``truth.png``.
"""

from __future__ import annotations

import sys
from pathlib import Path


def add_shapes_commands(subparsers) -> None:
    """``diffeditor shapes scene`` (the ``shapes`` command leaves room for more)."""
    from diffeditor.cli import whole_number

    from .scenes import TASKS

    p = subparsers.add_parser(
        "shapes", help="the shapes world: make edit cases with known right answers",
        description="Commands of the shapes world (the bundled shapes model's training world), "
        "whose edits have known right answers.")
    sub = p.add_subparsers(dest="shapes_command", metavar="COMMAND", required=True)
    s = sub.add_parser(
        "scene", help="write an edit case: inputs, spec.json and the true result",
        description="Draw a scene of the shapes world and an edit of it with a known right "
        "answer, and write into OUT: source.png, the task's masks (mask.png or editable.png) "
        "and reference images, spec.json (paths relative to it: 'diffeditor edit "
        "OUT/spec.json --model shapes' runs it as it is), truth.png and truth_mask.png (the "
        "true result and its subject) and case.json (the scenes and parameters, for scoring). "
        "The case is a function of --task, --seed and --no-noise.")
    s.add_argument("--task", required=True, choices=list(TASKS), help="the edit (required)")
    s.add_argument("--seed", type=whole_number(0), default=0, metavar="N", help="which case (default: 0)")
    s.add_argument("--out", type=Path, required=True, metavar="DIR",
                   help="folder to write the case into (created if missing) (required)")
    s.add_argument("--no-noise", dest="noise", action="store_false",
                   help="noise-free source and reference images (default: the training "
                   "recipe's pixel noise, sigma 3)")
    s.add_argument("--force", action="store_true",
                   help="overwrite the files of an earlier case in OUT (default: an existing "
                   "file is never overwritten)")

    def handler(args) -> int:
        from .scenes import make_case, save_case

        case = make_case(args.task, args.seed, noise=args.noise)
        spec = save_case(case, args.out, force=args.force)
        for name in sorted(p.name for p in spec.parent.iterdir() if not p.name.startswith(".")):
            print(spec.parent / name)
        print(f"edit it: diffeditor edit {spec} --model shapes --out {spec.parent / 'edited.png'}"
              f"   (the right answer: {spec.parent / 'truth.png'})", file=sys.stderr)
        return 0

    s.set_defaults(func=handler)
