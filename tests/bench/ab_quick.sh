#!/usr/bin/env bash
# CPU A/B of `./build.sh bench --quick` between two checkouts, interleaved (new/old, old/new, ...):
#   bash tests/bench/ab_quick.sh NEW_TREE OLD_TREE OUT_DIR [ROUNDS] [FIRST_ROUND]
# FIRST_ROUND (default 1) continues an earlier run in the same OUT_DIR: rounds FIRST..ROUNDS are
# added, the order still alternating by round number, and the summary covers every round there.
# Each side runs its own tree's code (PYTHONPATH, cwd) on this checkout's venv; each tree needs
# the embedded model (ln -s "$PWD/model" TREE/model). A tree from before the move of the
# benchmarks has them at tests/bench.py. Compare the ratios to the baseline within each run.
set -u
new=$1; old=$2; out=$3; rounds=${4:-3}; first=${5:-1}
PY=$(cd "$(dirname "$0")/../.." && pwd)/.venv/bin/python
mkdir -p "$out"
module_of() { if [ -f "$1/tests/bench/cpu.py" ]; then echo tests.bench.cpu; else echo tests.bench; fi; }
for r in $(seq "$first" "$rounds"); do
  if [ $((r % 2)) = 1 ]; then order="new old"; else order="old new"; fi
  for side in $order; do
    if [ "$side" = new ]; then tree=$new; else tree=$old; fi
    echo "round $r $side $(date +%T)"
    (cd "$tree" && PYTHONPATH="$tree" "$PY" -m "$(module_of "$tree")" --quick --out "$out/$side-$r.json" \
      > "$out/$side-$r.log" 2>&1) || echo "  $side-$r failed (see $out/$side-$r.log)"
  done
done
# Per product path: its tok/s over its baseline's in the same run, median (min-max) per side.
"$PY" - "$out" <<'PY'
import glob, json, os, statistics, sys
ratios = {}
for path in sorted(glob.glob(f"{sys.argv[1]}/*.json")):
    side, rows = os.path.basename(path).split("-")[0], json.load(open(path))["rows"]
    by_path = {r["path"]: r for r in rows}
    for r in rows:
        if r.get("baseline") in by_path:
            ratios.setdefault(r["path"], {}).setdefault(side, []).append(r["tok_s"] / by_path[r["baseline"]]["tok_s"])
for path, sides in ratios.items():
    print(f"{path:46}", "   ".join(f"{side} {statistics.median(v):.3f} ({min(v):.3f}-{max(v):.3f}) n={len(v)}"
                                   for side, v in sorted(sides.items(), reverse=True)))
PY
