"""Robust aggregation and DP on the main job: final test accuracy under attack, as a table.

    python benchmarks/robustness.py --out=/tmp/robustness [--rounds=100] [--runs=NAME,...]

Runs `configs/shapes_fedavg.py` (100 clients, 10 a round, FedAvg with client momentum) through
launch/train.py once per row: no attack, and 30% of each round's clients sending -delta,
-4 x delta or 10 x delta, each under the mean (FedAvg), the coordinate median, the trimmed
mean (beta = 0.3, so 3 of 10 values are cut from each end) and Multi-Krum (f = 3); then
DP-FedAvg rows (clip 1, noise multipliers 0.3 and 1.0) with their epsilon at delta 1e-5.
100 rounds, not the main job's 40: the coordinate-wise rules leave the task's initial plateau
(loss near ln 4) later than the mean, 10 rounds later without attack and 30 under sign flipping,
so at 40 rounds a table would compare speeds, not the levels the runs reach.
Each row's workdir lives under --out: running the same command again resumes unfinished rows
and re-reads finished ones. Prints a markdown table and writes OUT/robustness.json.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIG = "configs/shapes_fedavg.py"
AGGREGATORS = {
    "mean": [],
    "median": ["--config.algorithm.aggregator.name=median"],
    "trimmed_mean": [
        "--config.algorithm.aggregator.name=trimmed_mean",
        "--config.algorithm.aggregator.trim_fraction=0.3",
    ],
    "multi_krum": [
        "--config.algorithm.aggregator.name=multi_krum",
        "--config.algorithm.aggregator.num_byzantine=3",
    ],
}
ATTACKS = {
    "none": [],
    "sign_flip": ["--config.attack.name=sign_flip", "--config.attack.fraction=0.3"],
    "sign_flip_x4": [
        "--config.attack.name=sign_flip",
        "--config.attack.fraction=0.3",
        "--config.attack.scale=4.0",
    ],
    "scale": [
        "--config.attack.name=scale",
        "--config.attack.fraction=0.3",
        "--config.attack.scale=10.0",
    ],
}


def dp_flags(noise_multiplier: float) -> list[str]:
    return [
        "--config.algorithm.dp.enabled=True",
        "--config.algorithm.dp.clip_norm=1.0",
        f"--config.algorithm.dp.noise_multiplier={noise_multiplier}",
        "--config.algorithm.dp.target_delta=1e-5",
    ]


def rows() -> dict[str, tuple[str, str, list[str]]]:
    """name -> (attack, defence, flags)."""
    out = {}
    for attack, attack_flags in ATTACKS.items():
        for aggregator, aggregator_flags in AGGREGATORS.items():
            out[f"{attack}/{aggregator}"] = (attack, aggregator, attack_flags + aggregator_flags)
    for z in (0.3, 1.0):
        out[f"none/dp_z{z}"] = ("none", f"DP-FedAvg z={z}, C=1", dp_flags(z))
    return out


def last_record(workdir: pathlib.Path) -> dict:
    """The final metrics.jsonl line of a finished run, and the last value of each key."""
    merged = {}
    for line in (workdir / "metrics.jsonl").read_text().splitlines():
        merged.update(json.loads(line))
    return merged


def run(name: str, flags: list[str], out: pathlib.Path, rounds: int) -> dict:
    workdir = out / name.replace("/", "__")
    command = [
        sys.executable,
        str(ROOT / "launch" / "train.py"),
        f"--config={CONFIG}",
        f"--workdir={workdir}",
        f"--config.num_rounds={rounds}",
        *flags,
    ]
    print(f"[{name}] {' '.join(command[2:])}", flush=True)
    workdir.parent.mkdir(parents=True, exist_ok=True)
    log_path = pathlib.Path(f"{workdir}.log")  # the progress bar, beside the workdir
    with open(log_path, "a") as log:
        done = subprocess.run(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    record = last_record(workdir) if (workdir / "metrics.jsonl").exists() else {}
    if done.returncode != 0:  # a run that diverged stops with one line: the row says so
        errors = [line for line in log_path.read_text().splitlines() if line.startswith("error:")]
        record["stopped"] = errors[-1] if errors else f"exit status {done.returncode}"
        print(f"[{name}] {record['stopped']}", flush=True)
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=pathlib.Path)
    parser.add_argument("--rounds", type=int, default=100)
    parser.add_argument("--runs", default="", help="comma-separated row names (default: all)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    table = rows()
    wanted = [n for n in args.runs.split(",") if n] or list(table)
    results = []
    for name in wanted:
        attack, defence, flags = table[name]
        record = run(name, flags, args.out, args.rounds)
        results.append(
            {
                "run": name,
                "attack": attack,
                "defence": defence,
                "eval_accuracy": record.get("eval/accuracy", float("nan")),
                "dp_epsilon": record.get("train/dp_epsilon"),
                "rounds": record.get("round", 0),
                "stopped": record.get("stopped"),
            }
        )
    (args.out / "robustness.json").write_text(json.dumps(results, indent=1) + "\n")
    clean = {r["defence"]: r["eval_accuracy"] for r in results if r["attack"] == "none"}
    print("\n| attack (30% of clients) | defence | eval accuracy | vs no attack | epsilon |")
    print("|---|---|---|---|---|")
    for r in results:
        base = clean.get(r["defence"])
        gap = "" if base is None else f"{100 * (r['eval_accuracy'] - base):+.1f} pts"
        epsilon = "" if r["dp_epsilon"] is None else f"{r['dp_epsilon']:.3g}"
        accuracy = f"{r['eval_accuracy']:.3f}"
        if r["stopped"]:  # the last evaluation before the run stopped
            accuracy += f" (diverged, stopped after round {r['rounds']})"
        print(f"| {r['attack']} | {r['defence']} | {accuracy} | {gap} | {epsilon} |")


if __name__ == "__main__":
    main()
