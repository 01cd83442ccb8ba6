#!/usr/bin/env bash
# Same-machine ratio of fedjax_cv to FedJAX 0.0.17 on workload T (logistic, cohort 10).
#
#     bash benchmarks/compare_fedjax.sh [OUTDIR]
#
# Alternates RUNS times (default 3): fedjax_cv's throughput.py on workload T with the `auto`
# strategy (STRATEGIES to change it), then benchmarks/fedjax_reference.py in FedJAX's own virtualenv
# (FEDJAX_PYTHON, default /work/venvs/fedjax/bin/python). Then a table per run, with the ratio
# on throughput.py's statistic (best window) on both sides, and beside it FedJAX's median
# window and its full training loop (client sampling included). About 4 minutes on 2 cores.
set -euo pipefail

cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
FEDJAX_PYTHON=${FEDJAX_PYTHON:-/work/venvs/fedjax/bin/python}
RUNS=${RUNS:-3}
STRATEGIES=${STRATEGIES:-auto}
OUTDIR=${1:-$(mktemp -d /tmp/compare_fedjax.XXXXXX)}
mkdir -p "$OUTDIR"
echo "outputs in $OUTDIR; load: $(uptime | sed 's/.*load average: //')"

for run in $(seq 1 "$RUNS"); do
    echo "== run $run/$RUNS: fedjax_cv"
    "$PYTHON" benchmarks/throughput.py --workloads=T --cohorts=10 --strategies="$STRATEGIES" \
        --out="$OUTDIR/fedjax_cv_$run.json" >"$OUTDIR/fedjax_cv_$run.log" 2>&1 \
        || { cat "$OUTDIR/fedjax_cv_$run.log"; exit 1; }
    grep -m 1 '| 10 |' "$OUTDIR/fedjax_cv_$run.log"
    echo "== run $run/$RUNS: fedjax"
    "$FEDJAX_PYTHON" benchmarks/fedjax_reference.py --cohort=10 \
        --out="$OUTDIR/fedjax_$run.json" 2>&1 | grep -v 'No GPU/TPU found'
done
echo "load: $(uptime | sed 's/.*load average: //')"

"$PYTHON" - "$OUTDIR" "$RUNS" <<'EOF'
import json
import statistics
import sys

outdir, runs = sys.argv[1], int(sys.argv[2])
ratios, lines = [], []
for run in range(1, runs + 1):
    with open(f"{outdir}/fedjax_cv_{run}.json") as f:
        rows = [r for r in json.load(f) if r["cohort"] == 10]
    row = max(rows, key=lambda r: r["client_examples_per_s"])  # one row with STRATEGIES=auto
    with open(f"{outdir}/fedjax_{run}.json") as f:
        ref = json.load(f)
    cv, best, median = (
        row["client_examples_per_s"],
        ref["best_client_examples_per_s"],
        ref["client_examples_per_s"],
    )
    loop = ref["loop_best_client_examples_per_s"]
    ratios.append(cv / best)
    cells = (
        str(run),
        row["strategy"],
        f"{cv:,.0f}",
        f"{best:,.0f}",
        f"{cv / best:.2f}",
        f"{median:,.0f}",
        f"{cv / median:.2f}",
        f"{loop:,.0f}",
        f"{cv / loop:.2f}",
    )
    lines.append(cells)
header = (
    "run",
    "fedjax_cv strategy",
    "fedjax_cv client-ex/s",
    "fedjax client-ex/s",
    "ratio",
    "fedjax median window",
    "ratio vs median",
    "fedjax loop (+sampling)",
    "ratio vs loop",
)
print()
print(f"workload T (logistic, 100 clients x 50, batch 10, 1 epoch), cohort 10; {ref['versions']}")
print("client-ex/s = best timing window on both sides (throughput.py's statistic)")
for cells in [header, ["---"] * len(header), *lines]:
    print("| " + " | ".join(cells) + " |")
print(f"\nmedian ratio (fedjax_cv / fedjax, best windows): {statistics.median(ratios):.2f}")
with open(f"{outdir}/summary.json", "w") as f:
    json.dump({"ratios": ratios, "median_ratio": statistics.median(ratios)}, f, indent=1)
EOF
