"""Kills a training run at random rounds, restarts it, and checks it ends as an uninterrupted one.

    python launch/resume_check.py --config=configs/shapes_fedavg.py:runlocal --workdir=/tmp/rc \
        [--signal=KILL|TERM] [--kills=2] [--kill_during_save=ROUND] [--seed=0] \
        [--concurrent_trials=0] [-- --config.<key>=<value> ...]

It runs the config once without interruption (DIR/reference), then again in DIR/interrupted,
sending the signal at random rounds and restarting the same command each time; with
`--kill_during_save=R` the first attempt also dies by SIGKILL while round R's checkpoint is
being written. It prints both params_sha256 digests and exits 0 only if they are equal.

With `--concurrent_trials=N` it then launches the command twice at once on a fresh
DIR/concurrent_<i>, N times: each time one run must end with the uninterrupted digest, the
other be refused with one `error: workdir ... is in use by another run` line (exit 2), and
metrics.jsonl must hold each round once.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import random
import signal
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _last_round(metrics: pathlib.Path) -> int:
    if not metrics.exists():
        return 0
    rounds = [0]
    for line in metrics.read_text(errors="replace").splitlines():
        try:
            rounds.append(int(json.loads(line)["round"]))
        except (ValueError, KeyError):
            pass
    return max(rounds)


def _command(config: str, workdir: pathlib.Path, overrides: list[str]) -> list[str]:
    train = str(ROOT / "launch" / "train.py")
    return [sys.executable, train, f"--config={config}", f"--workdir={workdir}", *overrides]


def _final_digest(workdir: pathlib.Path) -> str:
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    return json.loads(lines[-1])["params_sha256"]


def run_with_interruptions(
    config: str,
    workdir: pathlib.Path,
    overrides: list[str],
    *,
    num_rounds: int,
    sig: int,
    kills: int,
    kill_during_save: int,
    rng: random.Random,
) -> list[str]:
    """Runs to completion with interruptions; returns a log of what happened."""
    log = []
    metrics = workdir / "metrics.jsonl"
    if kill_during_save:
        env = dict(os.environ, FEDJAX_CV_FAULT_KILL_DURING_SAVE=str(kill_during_save))
        result = subprocess.run(_command(config, workdir, overrides), env=env, capture_output=True)
        log.append(f"killed during the save of round {kill_during_save}: rc={result.returncode}")
    for _ in range(kills):
        start = _last_round(metrics)
        if start >= num_rounds - 1:
            break
        target = rng.randint(start + 1, num_rounds - 1)
        process = subprocess.Popen(
            _command(config, workdir, overrides),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        while process.poll() is None and _last_round(metrics) < target:
            time.sleep(0.005)
        if process.poll() is None:
            process.send_signal(sig)
        _, stderr = process.communicate()
        log.append(
            f"sent {signal.Signals(sig).name} at round {_last_round(metrics)} "
            f"(target {target}): rc={process.returncode}"
        )
        if process.returncode not in (0, -sig):
            raise RuntimeError(stderr.decode()[-2000:])
    result = subprocess.run(_command(config, workdir, overrides), capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(result.stderr[-2000:])
    log.append("restarted and finished")
    return log


def concurrent_trial(
    config: str, workdir: pathlib.Path, overrides: list[str], *, num_rounds: int, expected: str
) -> str | None:
    """Two launches at once on `workdir`; None when one finished with `expected` and the other
    was refused in one line, else what went wrong."""
    processes = [
        subprocess.Popen(
            _command(config, workdir, overrides),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    try:
        outputs = [p.communicate(timeout=1800) for p in processes]
    except subprocess.TimeoutExpired:
        for p in processes:
            p.kill()
        return "a run hung for 30 minutes"
    codes = sorted(p.returncode for p in processes)
    if codes != [0, 2]:
        return f"exit codes {codes}"
    winner = next(p.pid for p in processes if p.returncode == 0)
    refused = next(err for p, (_, err) in zip(processes, outputs, strict=True) if p.returncode)
    lines = [line for line in refused.replace("\r", "\n").splitlines() if line.strip()]
    if len(lines) != 1 or f"in use by another run (process {winner} holds" not in lines[0]:
        return f"refused with {lines}"
    rounds = [json.loads(line)["round"] for line in (workdir / "metrics.jsonl").open()]
    if rounds != list(range(1, num_rounds + 1)):
        return f"metrics.jsonl rounds {rounds}"
    if _final_digest(workdir) != expected:
        return f"params_sha256 {_final_digest(workdir)}"
    return None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--num_rounds", type=int, required=True, help="the config's num_rounds")
    parser.add_argument("--signal", choices=("KILL", "TERM", "INT"), default="KILL")
    parser.add_argument("--kills", type=int, default=2)
    parser.add_argument("--kill_during_save", type=int, default=0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--concurrent_trials", type=int, default=0)
    args, overrides = parser.parse_known_args()
    overrides = [o for o in overrides if o != "--"] + [f"--config.num_rounds={args.num_rounds}"]
    root = pathlib.Path(args.workdir)
    reference = subprocess.run(
        _command(args.config, root / "reference", overrides), capture_output=True, text=True
    )
    if reference.returncode != 0:
        print(reference.stderr[-2000:], file=sys.stderr)
        return 1
    log = run_with_interruptions(
        args.config,
        root / "interrupted",
        overrides,
        num_rounds=args.num_rounds,
        sig=getattr(signal, f"SIG{args.signal}"),
        kills=args.kills,
        kill_during_save=args.kill_during_save,
        rng=random.Random(args.seed),
    )
    expected, actual = _final_digest(root / "reference"), _final_digest(root / "interrupted")
    print("\n".join(log))
    print(f"uninterrupted params_sha256: {expected}")
    print(f"interrupted   params_sha256: {actual}")
    print("same" if expected == actual else "DIFFERENT")
    failures = 0
    for trial in range(args.concurrent_trials):
        problem = concurrent_trial(
            args.config,
            root / f"concurrent_{trial}",
            overrides,
            num_rounds=args.num_rounds,
            expected=expected,
        )
        failures += problem is not None
        print(f"concurrent trial {trial}: {problem or 'one finished, the other refused'}")
    return 0 if expected == actual and not failures else 1


if __name__ == "__main__":
    sys.exit(main())
