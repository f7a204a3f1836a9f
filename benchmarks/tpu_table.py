"""docs/tpu.md's table from compile_check's JSON lines: one row per recipe stage and topology
(the last record of each when a pair was compiled more than once).

    python benchmarks/tpu_table.py benchmarks/results/tpu_checks.jsonl
"""

import json
import math
import os
import sys

HEADER = ("| recipe (stage) | topology | fits? | peak GB per chip (program) | parameters per chip: GB "
          "(even split) | TFLOP per chip per update | roofline update | dominant collective (GB per update) |\n"
          "| --- | --- | --- | --- | --- | --- | --- | --- |")


def rows(records: list[dict]) -> list[str]:
    """A markdown row per (config, topology, stage) summary; '>=' where XLA refused the peak
    program (its temporaries plus the state: a lower bound), 'unknown' where no cost figures."""
    summaries, refused = {}, set()
    for r in records:
        key = (r["config"], r["topology"], r["stage"])
        if r.get("summary"):
            summaries[key] = r
        elif r["refused"]:
            refused.add((*key, r["program"]))
    lines = []
    for (config, topology, stage), r in summaries.items():
        name = os.path.splitext(os.path.basename(config))[0]
        at_least = ">= " if (config, topology, stage, r["peak_program"]) in refused else ""
        known = r["update_s"] is not None and math.isfinite(r["update_s"])
        flops, update = (f"{r['flops'] / 1e12:.0f}", f"{r['update_s']:.1f} s") if known else ("unknown",) * 2
        lines.append(f"| {name} ({stage}) | {topology} | {'yes' if r['fits'] else 'no'} | "
                     f"{at_least}{r['peak_bytes'] / 1e9:.1f} ({r['peak_program']}) | "
                     f"{r['state_params'] / 1e9:.2f} ({r['state_even'] / 1e9:.2f}) | "
                     f"{flops} | {update} | {r['dominant_collective']} |")
    return lines


def main(paths: list[str]) -> None:
    if not paths:
        sys.exit(__doc__)
    records = [json.loads(line) for path in paths for line in open(path) if line.strip()]
    print("\n".join([HEADER, *rows(records)]))


if __name__ == "__main__":
    main(sys.argv[1:])
