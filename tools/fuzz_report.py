"""Runs the whole fuzz table (tests/fuzz_cases.py, and every tests/fuzz_cases_*.py
table there is) and prints, per public function / torch.ops.skipdit op and backend,
how many probes raise a clear error, compute correctly, or fail (a wrong result, a
crash, a hang, an unclear error, or no error where one is due). Issue 16.7.

    python tools/fuzz_report.py                 # the table
    python tools/fuzz_report.py --fails         # and every failing probe, with why
    python tools/fuzz_report.py --json out.json --markdown out.md
    python tools/fuzz_report.py --triton --heavy   # + triton in the interpreter, + 2**31-element skip_fuse

Each probe runs in a worker subprocess (a crash fails its probe, the next worker
goes on). Run it from a checkout with the native library built (skipdit_fast/_C.so).
Exit status 0 whatever the counts: it reports, tests/test_fuzz.py asserts.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))
sys.path.insert(0, ROOT)

KINDS = ("wrong result", "crash", "hang", "unclear error", "no error", "raised where it must compute", "other")


def fail_kind(detail: str) -> str:
    for k in KINDS[:-1]:
        if detail.startswith(k):
            return k
    return "other"


def tabulate(probes, results) -> list[dict]:
    rows: dict = collections.OrderedDict()
    for p in probes:
        r = results[p.id]
        row = rows.setdefault((p.target, p.backend), {"target": p.target, "backend": p.backend, "probes": 0,
                                                      "error": 0, "correct": 0, "fail": 0, "known": 0,
                                                      "kinds": collections.Counter()})
        row["probes"] += 1
        row[r["outcome"]] += 1
        if r["outcome"] == "fail":
            row["kinds"][fail_kind(r["detail"])] += 1
            row["known"] += p.xfail is not None
    return list(rows.values())


def format_table(rows, markdown: bool = False) -> str:
    head = ["target", "backend", "probes", "clear error", "correct", "fail", "of which known", "fails by kind"]
    lines = []
    body = [[r["target"], r["backend"], str(r["probes"]), str(r["error"]), str(r["correct"]), str(r["fail"]),
             str(r["known"]), ", ".join(f"{k} {n}" for k, n in sorted(r["kinds"].items())) or "-"] for r in rows]
    tot = [sum(r[k] for r in rows) for k in ("probes", "error", "correct", "fail", "known")]
    body.append(["all", "", *map(str, tot), ""])
    if markdown:
        lines.append("| " + " | ".join(head) + " |")
        lines.append("|" + "---|" * len(head))
        lines += ["| " + " | ".join(b) + " |" for b in body]
    else:
        w = [max(len(x[i]) for x in [head] + body) for i in range(len(head))]
        lines.append("  ".join(h.ljust(w[i]) for i, h in enumerate(head)))
        lines += ["  ".join(x.ljust(w[i]) for i, x in enumerate(b)) for b in body]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--fails", action="store_true", help="list every failing probe and why")
    ap.add_argument("--filter", metavar="REGEX", help="only the probes whose id matches")
    ap.add_argument("--json", metavar="PATH", help="write every probe's result as JSON")
    ap.add_argument("--markdown", metavar="PATH", help="write the table as markdown")
    ap.add_argument("--heavy", action="store_true",
                    help="also the heavy probes (skip_fuse on 2**31 + 8 elements: ~20 s and 1 GiB each)")
    ap.add_argument("--triton", action="store_true", help="also the triton backend, in Triton's interpreter")
    args = ap.parse_args(argv)
    if args.heavy:
        os.environ["SKIPDIT_FAST_FUZZ_HEAVY"] = "1"   # the workers inherit it
    if args.triton:
        os.environ["SKIPDIT_FAST_FUZZ_TRITON"] = "1"
        os.environ.setdefault("TRITON_INTERPRET", "1")

    import fuzz_cases as fc

    probes = fc.all_probes()
    if args.filter:
        probes = [p for p in probes if re.search(args.filter, p.id)]
    t0 = time.monotonic()
    results = fc.run_isolated([p.id for p in probes])
    seconds = time.monotonic() - t0
    rows = tabulate(probes, results)
    import subprocess

    try:
        commit = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True).stdout.strip()
    except OSError:
        commit = "?"
    print(f"fuzz report: {len(probes)} probes at {commit or '?'} ({ROOT}), {seconds:.0f} s")
    print(format_table(rows))
    if args.fails:
        print()
        for p in probes:
            r = results[p.id]
            if r["outcome"] == "fail":
                print(f"FAIL {p.id}: {r['detail']}" + (f"  [known: {p.xfail[:80]}...]" if p.xfail else ""))
    # imported here, not at the top: TRITON_INTERPRET must be set before torch is imported
    from skipdit_fast.files import write_atomic

    if args.json:
        write_atomic(args.json, json.dumps({"commit": commit, "results": {
            p.id: {**results[p.id], "expect": p.expect, "known_bug": p.xfail} for p in probes}}, indent=1) + "\n")
    if args.markdown:
        write_atomic(args.markdown, format_table(rows, markdown=True) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
