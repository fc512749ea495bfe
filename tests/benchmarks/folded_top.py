"""Summarise a py-spy folded profile (`py-spy record -f raw --threads`): per thread, where its samples go.

    python tests/benchmarks/folded_top.py engine.folded --seconds 15 --rate 200 [--top 25]

Prints, for each thread with samples, how busy it was (its samples over rate x seconds: py-spy keeps only
samples of a thread on the CPU unless told `--idle`), then the functions holding the most of its
samples inclusively (on the stack anywhere) and by self time (the leaf frame), line numbers dropped, so a
reader sees at once which thread is busy and on what.
"""

from __future__ import annotations

import argparse
import re
from collections import Counter, defaultdict
from pathlib import Path

_LINE = re.compile(r"^(?P<stack>.*) (?P<count>\d+)$")
_LINENO = re.compile(r":\d+\)$")


def frame_name(frame: str) -> str:
    """`step (mlx_backend/batcher.py:120)` -> `step (batcher.py)`: one name per function."""
    frame = _LINENO.sub(")", frame.strip())
    return re.sub(r"\(([^()]*/)?([^/()]+)\)$", r"(\2)", frame)


def summarise(path: Path, top: int, possible: float) -> str:
    inclusive: dict[str, Counter[str]] = defaultdict(Counter)
    leaf: dict[str, Counter[str]] = defaultdict(Counter)
    samples: Counter[str] = Counter()
    for line in path.read_text(errors="replace").splitlines():
        match = _LINE.match(line)
        if not match:
            continue
        frames = match["stack"].split(";")
        count = int(match["count"])
        thread_index = next((i for i, f in enumerate(frames) if f.startswith("thread ")), -1)
        thread = frames[thread_index] if thread_index >= 0 else "all"
        calls = [frame_name(f) for f in frames[thread_index + 1:]]
        samples[thread] += count
        for name in set(calls):
            inclusive[thread][name] += count
        if calls:
            leaf[thread][calls[-1]] += count
    total = sum(samples.values()) or 1
    out = [f"### {path.name}: {total} samples", ""]
    for thread, n in samples.most_common():
        busy = f", busy {100 * n / possible:.0f}% of the time" if possible else ""
        out.append(f"#### {thread}: {n} samples ({100 * n / total:.1f}% of all{busy})")
        out.append("")
        out.append("| inclusive % | function | self % | function |")
        out.append("|---:|---|---:|---|")
        rows_in = inclusive[thread].most_common(top)
        rows_self = leaf[thread].most_common(top)
        for i in range(max(len(rows_in), len(rows_self))):
            a = rows_in[i] if i < len(rows_in) else ("", 0)
            b = rows_self[i] if i < len(rows_self) else ("", 0)
            out.append(f"| {100 * a[1] / n:.1f} | `{a[0]}` | {100 * b[1] / n:.1f} | `{b[0]}` |")
        out.append("")
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("path", type=Path)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--seconds", type=float, default=0.0, help="how long py-spy recorded")
    parser.add_argument("--rate", type=float, default=100.0, help="py-spy's samples per second")
    args = parser.parse_args()
    print(summarise(args.path, args.top, args.seconds * args.rate))


if __name__ == "__main__":
    main()
