"""Fingerprints of the diffusers code skipdit_fast mirrors, read off release archives.

    python tools/diffusers_fingerprints.py [--download DIR] [WHEEL ...]

For each diffusers wheel (given, or with --download every release from
SUPPORTED[0] to SUPPORTED[1], fetched with `pip download --no-deps` into DIR), reads
the source of each function named in skipdit_fast/integrations/diffusers.py MIRRORED
from the archive (no install, no import of that release), fingerprints it the way the
patch does at run time, and prints one row per release: the variant it matched, or
the new fingerprint. Exit status 1 when a release inside the supported range has code
that matches no recorded variant (MIRRORED needs a new entry, and the helper a new
variant, before that release is supported). `make compat` runs it with --download.
"""

from __future__ import annotations

import argparse
import ast
import os
import re
import subprocess
import sys
import zipfile

from packaging.version import Version

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from skipdit_fast.integrations.diffusers import (MIRRORED, SOURCES, SUPPORTED,  # noqa: E402
                                                 fingerprint_source)


def function_source(src: str, owner: str, cls: str | None, name: str) -> str | None:
    """The source text of cls.name (or the module-level function owner) in src."""
    lines = src.splitlines(keepends=True)
    body = ast.parse(src).body
    if cls is not None:
        body = next((n.body for n in body if isinstance(n, ast.ClassDef) and n.name == cls), [])
        target = name
    else:
        target = owner
    for n in body:
        if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.name == target:
            start = min([n.lineno, *(d.lineno for d in n.decorator_list)]) - 1
            return "".join(lines[start:n.end_lineno])
    return None


def release_fingerprints(wheel: str) -> dict[str, str | None]:
    """MIRRORED name -> fingerprint in that release (None: not there)."""
    out = {}
    with zipfile.ZipFile(wheel) as z:
        for key in MIRRORED:
            owner, _, meth = key.partition(".")
            module, cls = SOURCES[owner]
            try:
                src = z.read(module.replace(".", "/") + ".py").decode()
            except KeyError:
                out[key] = None
                continue
            fn = function_source(src, owner, cls, meth)
            out[key] = fingerprint_source(fn) if fn is not None else None
    return out


def wheel_version(path: str) -> Version:
    m = re.search(r"diffusers-([0-9][^-]*)-", os.path.basename(path))
    if not m:
        raise SystemExit(f"{path}: not a diffusers wheel (diffusers-<version>-...whl)")
    return Version(m.group(1))


def releases_in_range() -> list[str]:
    out = subprocess.run([sys.executable, "-m", "pip", "index", "versions", "diffusers"],
                         capture_output=True, text=True, check=True).stdout
    m = re.search(r"Available versions: (.*)", out)
    if not m:
        raise SystemExit(f"pip index versions diffusers: no version list in\n{out}")
    first, last = (Version(v) for v in SUPPORTED)
    return sorted((v.strip() for v in m.group(1).split(",") if first <= Version(v.strip()) <= last), key=Version)


def download(folder: str) -> list[str]:
    os.makedirs(folder, exist_ok=True)
    wheels = []
    for v in releases_in_range():
        have = [f for f in os.listdir(folder) if f.startswith(f"diffusers-{v}-") and f.endswith(".whl")]
        if not have:
            subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary", ":all:",
                            "-d", folder, f"diffusers=={v}"], check=True)
            have = [f for f in os.listdir(folder) if f.startswith(f"diffusers-{v}-") and f.endswith(".whl")]
        wheels.append(os.path.join(folder, have[0]))
    return wheels


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("wheels", nargs="*", help="diffusers wheels")
    p.add_argument("--download", metavar="DIR", help="fetch every release of the supported range into DIR")
    args = p.parse_args(argv)
    wheels = list(args.wheels) + (download(args.download) if args.download else [])
    if not wheels:
        p.error("give diffusers wheels or --download DIR")
    first, last = (Version(v) for v in SUPPORTED)
    names = list(MIRRORED)
    print(f"supported: diffusers {SUPPORTED[0]} to {SUPPORTED[1]}; one column per mirrored function "
          "(its variant, or the unknown fingerprint)")
    print("| release | " + " | ".join(names) + " |")
    print("| --- " * (len(names) + 1) + "|")
    bad = []
    for wheel in sorted(set(wheels), key=wheel_version):
        v = wheel_version(wheel)
        fps = release_fingerprints(wheel)
        cells = []
        for name in names:
            fp = fps[name]
            known = MIRRORED[name].get(fp) if fp else None
            cells.append(known or (f"NEW {fp}" if fp else "missing"))
            if known is None and first <= v <= last:
                bad.append(f"{v}: {name} {'is missing' if fp is None else f'has unrecorded code {fp}'}")
        print(f"| {v} | " + " | ".join(cells) + " |")
    for line in bad:
        print(f"not mirrored: {line}", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
