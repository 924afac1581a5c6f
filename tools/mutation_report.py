"""Kill rate of the last `mutmut run` (run from the repository root; `nox -s mutate` calls it).

kill rate = killed / (mutants - equivalent), per mutated file and in all. "Killed" counts
mutmut's killed, timeout and segfault verdicts (the tests did not pass); every other verdict,
"no tests" included, is a survivor, except "not checked" (mutants a partial run, ``mutmut run
NAME...``, left out): those are counted apart and left out of the rate. Equivalent mutants are listed in docs/mutants-equivalent.txt
as ``name | reason | mutated line``: the name may be an fnmatch pattern, and the mutated line
(the ``+`` line of ``mutmut show NAME``) guards against mutmut renumbering a function's
mutants after an edit: an entry whose line no longer matches, or that is killed, is reported
as stale.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import sys
from pathlib import Path

from mutmut.mutation.diff_apply import get_diff_for_mutant
from mutmut.stats import status_by_exit_code

EQUIVALENT = Path("docs/mutants-equivalent.txt")
KILLED = {"killed", "timeout", "segfault"}


def read_equivalent(path: Path) -> list[tuple[str, str, str]]:
    rows = []
    for line in path.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            name, reason, mutated = (part.strip() for part in line.split(" | ", 2))
            rows.append((name, reason, mutated))
    return rows


def mutated_line(name: str, path: str) -> str:
    diff = get_diff_for_mutant(name, path=path).splitlines()
    return " ".join(x[1:].strip() for x in diff if x.startswith("+") and not x.startswith("+++"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--fail-under", type=float, help="exit 1 below this kill rate (percent)")
    ap.add_argument("--survivors", action="store_true", help="list every non-equivalent survivor")
    args = ap.parse_args()
    equivalent = read_equivalent(EQUIVALENT) if EQUIVALENT.is_file() else []
    used, stale, survivors, rows = set(), [], [], []
    for meta in sorted(Path("mutants").rglob("*.py.meta")):
        source = str(meta.relative_to("mutants"))[: -len(".meta")]
        verdicts = json.loads(meta.read_text())["exit_code_by_key"]
        if not verdicts:
            continue
        killed = equiv = unrun = 0
        for name, code in verdicts.items():
            status = status_by_exit_code[code]
            if status == "not checked":
                unrun += 1
                continue
            entry = next((e for e in equivalent if fnmatch.fnmatchcase(name, e[0])), None)
            if entry is not None:
                used.add(entry[0])
                if status in KILLED:
                    stale.append(f"{name}: listed as equivalent but {status}")
                elif entry[2] and entry[2] != (line := mutated_line(name, source)):
                    stale.append(f"{name}: listed for `{entry[2]}`, now mutates `{line}`")
                else:
                    equiv += 1
                    continue
            if status in KILLED:
                killed += 1
            else:
                survivors.append(f"{name}: {status}")
        rows.append((source, len(verdicts), unrun, equiv, killed))
    if not rows:
        print("no mutmut results under mutants/: run `mutmut run` first")
        return 1
    print(f"{'file':26} {'mutants':>7} {'not run':>7} {'equiv.':>6} {'killed':>6} {'surv.':>5} "
          f"{'kill rate':>9}")
    total_row = ("all", *map(sum, list(zip(*rows))[1:]))
    for source, total, unrun, equiv, killed in [*rows, total_row]:
        tried = total - unrun - equiv
        rate = 100.0 * killed / tried if tried else float("nan")
        print(f"{source:26} {total:7} {unrun:7} {equiv:6} {killed:6} {tried - killed:5} {rate:8.1f}%")
    stale += [f"{e[0]}: listed as equivalent, matches no mutant" for e in equivalent if e[0] not in used]
    for line in stale:
        print("stale equivalent entry:", line)
    if args.survivors:
        print("\n".join(["survivors (not listed as equivalent):", *survivors]))
    _, total, unrun, equiv, killed = total_row  # the summary: the last row printed
    tried = total - unrun - equiv
    rate = 100.0 * killed / tried if tried else float("nan")
    print(f"mutation kill rate: {killed}/{tried} = {rate:.1f}% of non-equivalent mutants "
          f"({equiv} equivalent, {tried - killed} surviving"
          + (f"; {unrun} of {total} not run)" if unrun else ")"))
    return 1 if args.fail_under is not None and not rate >= args.fail_under else 0


if __name__ == "__main__":
    sys.exit(main())
