"""Print a markdown table of benchmarks/peers/results/*.json (plain python3).

    python3 benchmarks/peers/summarize.py [results_dir]

Columns: median wall seconds per PPO iteration, its process-CPU-time twin, tokens/s (wall), the
first (compile/warm-up) iteration, peak RSS, how many cores OTHER processes used meanwhile, and the
per-phase medians (wall seconds).
"""

from __future__ import annotations

import glob
import json
import os
import sys

PHASES = [
    "generation",
    "policy_forward",
    "ref_forward",
    "value_forward",
    "reward_forward",
    "reward_fn",
    "advantages",
    "update",
    "update_policy",
    "update_value",
    "gc_collect",
    "other",
]


def main() -> None:
    root = sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
    rows = []
    for path in sorted(glob.glob(os.path.join(root, "*.json"))):
        with open(path) as f:
            r = json.load(f)
        threads = r.get("torch_num_threads")
        if threads is None:
            flags = " ".join(r.get("notes", []))
            threads = 1 if "intra_op_parallelism_threads=1" in flags else 2
        ph = r["phases"]
        cells = [
            os.path.basename(path)[:-5],
            r["config"].get("reward", ""),
            str(threads),
            f"{r['iteration_s']:.3f}",
            f"{r['iteration_cpu_s']:.3f}" if r.get("iteration_cpu_s") is not None else "",
            f"{r['tokens_per_s']:.0f}",
            f"{r['first_iteration_s']:.2f}" if r.get("first_iteration_s") is not None else "",
            f"{r['peak_rss_mb']:.0f}",
            f"{r.get('contention', {}).get('others_avg_cores', float('nan')):.2f}",
        ]
        cells += [f"{ph[k]['median_s']:.3f}" if k in ph else "" for k in PHASES]
        rows.append(cells)
    head = ["run", "reward", "thr", "iter_s", "iter_cpu_s", "tok/s", "first_s", "rss_MB", "others"] + PHASES
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for c in rows:
        print("| " + " | ".join(c) + " |")


if __name__ == "__main__":
    main()
