"""Several bench.learning result files as one summary (seeds run by separate commands).

    python -m bench.learning.merge OUT.json IN.json [IN.json ...]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from bench.learning.__main__ import tables
from bench.learning.stats import summarize


def merge(paths: list[Path]) -> dict:
    """The runs of every file (a (task, arm, seed) seen twice is an error), re-summarized."""
    docs = [json.loads(p.read_text()) for p in paths]
    runs = [run for doc in docs for run in doc["runs"]]
    keys = [(r["task"], r["arm"], r["seed"]) for r in runs]
    if len(set(keys)) != len(keys):
        raise SystemExit(f"a task, arm and seed appears twice in {[str(p) for p in paths]}")
    rounds = max(len(r["rounds"]) for r in runs)
    summary = summarize(runs)
    return {"merged_from": [{"path": str(p), "command": d["command"], "complete": d.get("complete")}
                            for p, d in zip(paths, docs, strict=True)],
            "summary": summary, "runs": runs, "table": tables(runs, summary, rounds)}


def main(argv: list[str] | None = None) -> int:
    args = argv if argv is not None else sys.argv[1:]
    if len(args) < 2:
        raise SystemExit(__doc__)
    out = merge([Path(a) for a in args[1:]])
    Path(args[0]).write_text(json.dumps(out, indent=2, default=str) + "\n")
    print(out["table"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
