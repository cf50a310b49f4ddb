"""Training through a lost worker: K replica groups on this machine, one SIGKILLed mid-round and
restarted by its launcher (torchrun), measured from the groups' step logs.

    python bench/lost_worker.py --out bench/results/lost_worker.json

Reports the seconds from the restarted process's start to its first round (it heals from a live
group and takes part in their round in progress), and the live groups' samples/s before the
failure, while they train without the lost group, and after it rejoined. Each group runs
``examples/fault_tolerant.py`` through ``launch/ft.sh``; :func:`run_groups` is also what the
tests use.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
BATCH = 32  # examples/problem.py's batch size


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return int(s.getsockname()[1])


def _env(**extra: str) -> dict[str, str]:
    """This process's environment, with this interpreter for the launch script (unless PYTHON is
    set): the groups must run the Python that has localsgd and torchft, not whatever ./.venv holds."""
    return {**os.environ, "PYTHON": os.environ.get("PYTHON", sys.executable), **extra}


@contextlib.contextmanager
def lighthouse(heartbeat_ms: int = 1000, join_ms: int = 60000, start_timeout: float = 30) -> Iterator[str]:
    """A Lighthouse on a free port for the duration; its address. It is up (it accepts connections)
    when this returns; if it exits or does not answer in ``start_timeout`` s, RuntimeError with
    its own output."""
    port = _free_port()
    env = _env(
        LIGHTHOUSE_PORT=str(port), JOIN_TIMEOUT_MS=str(join_ms), HEARTBEAT_TIMEOUT_MS=str(heartbeat_ms)
    )
    with tempfile.TemporaryFile("w+") as log:
        proc = subprocess.Popen(
            ["bash", str(ROOT / "launch" / "ft.sh"), "lighthouse"],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            deadline = time.monotonic() + start_timeout
            while True:
                with contextlib.suppress(OSError), socket.create_connection(("localhost", port), timeout=1):
                    break
                if proc.poll() is not None or time.monotonic() > deadline:
                    log.seek(0)
                    why = f"exited with {proc.returncode}" if proc.poll() is not None else "did not answer"
                    raise RuntimeError(
                        f"the Lighthouse (launch/ft.sh lighthouse) {why}; its output:\n{log.read()}"
                    )
                time.sleep(0.2)
            yield f"http://localhost:{port}"
        finally:
            proc.kill()
            proc.wait()


def run_groups(
    folder: Path, *, groups: int, nproc: int = 1, args: Sequence[str] = (), timeout: float = 240
) -> dict[str, Any]:
    """``groups`` replica groups of ``nproc`` processes each, every one started (and restarted) by
    ``launch/ft.sh group``; their step logs and final parameters land in ``folder``. Returns the
    records (see :func:`read_records`); raises with the groups' logs if one fails."""
    folder.mkdir(parents=True, exist_ok=True)
    with lighthouse() as address:
        procs = []
        try:
            for g in range(groups):
                env = _env(
                    TORCHFT_LIGHTHOUSE=address, NUM_REPLICA_GROUPS=str(groups), REPLICA_GROUP_ID=str(g)
                )
                log = (folder / f"group{g}.log").open("w")
                command = ["bash", str(ROOT / "launch" / "ft.sh"), "group", str(nproc)]
                command += [str(ROOT / "examples" / "fault_tolerant.py"), "--record", str(folder), *args]
                procs.append(subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT))
            deadline = time.monotonic() + timeout
            for g, proc in enumerate(procs):
                code = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
                if code != 0:
                    tail = (folder / f"group{g}.log").read_text()[-4000:]
                    raise RuntimeError(f"replica group {g} exited with {code}:\n{tail}")
        finally:
            for proc in procs:
                if proc.poll() is None:
                    proc.kill()  # torchrun's agent; its workers die with it (pdeathsig)
                    proc.wait()
    return read_records(folder)


def read_records(folder: Path) -> dict[str, Any]:
    """``{"logs": {name: [rows]}, "final": {name: state_dict}}`` from a run's folder; a log's name is
    ``g<group>.r<rank>.a<attempt>``."""
    import torch

    logs = {
        p.name[: -len(".jsonl")]: [json.loads(line) for line in p.open()]
        for p in sorted(folder.glob("*.jsonl"))
    }
    final = {p.name[len("final.") : -len(".pt")]: torch.load(p) for p in sorted(folder.glob("final.*.pt"))}
    return {"logs": logs, "final": final}


def phases(rows: list[dict[str, Any]], groups: int) -> dict[str, float]:
    """A live group's samples/s before the failure, while fewer groups train, and after the rejoin."""
    steps = [r for r in rows if r["event"] == "step"]
    short = [i for i, r in enumerate(steps) if r["participants"] is not None and r["participants"] < groups]
    first, last = short[0], short[-1]

    def rate(a: int, b: int) -> float:
        return BATCH * (b - a) / (steps[b]["time"] - steps[a]["time"]) if b > a else float("nan")

    return {
        "before": rate(0, first - 1),
        "during": rate(first, last),
        "after": rate(last + 1, len(steps) - 1),
        "longest_step_s": max(b["time"] - a["time"] for a, b in itertools.pairwise(steps)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--groups", type=int, default=3)
    parser.add_argument("--steps", type=int, default=2400)
    parser.add_argument("--kill-at", type=int, default=400)
    parser.add_argument("--sync-every", type=int, default=8)
    parser.add_argument("--folder", type=Path, default=Path("/tmp/localsgd-lost-worker"))
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    import shutil

    shutil.rmtree(args.folder, ignore_errors=True)
    extra = ["--steps", str(args.steps), "--sync-every", str(args.sync_every), "--kill-at", str(args.kill_at)]
    records = run_groups(args.folder, groups=args.groups, args=extra, timeout=1800)
    logs = records["logs"]
    rejoined = next(rows for name, rows in logs.items() if name.endswith(".a1"))[0]
    live = {
        name: phases(rows, args.groups)
        for name, rows in logs.items()
        if name != "g1.r0.a0" and ".a1" not in name
    }
    finals = list(records["final"].values())
    equal = all(all(bool((f[k] == finals[0][k]).all()) for k in f) for f in finals)
    result = {
        "command": "python bench/lost_worker.py " + " ".join(extra),
        "rejoin_seconds": rejoined["seconds"],
        "rejoined_at_step": rejoined["step"],
        "live_groups": live,
        "final_bitwise_equal": equal,
    }
    print(
        f"restarted group: {rejoined['seconds']:.2f} s from its process start to its first round "
        f"(healed at step {rejoined['step']})"
    )
    print("| live group | before (samples/s) | during | after | longest step (s) |\n|---|---|---|---|---|")
    for name, p in live.items():
        rates = f"{p['before']:.0f} | {p['during']:.0f} | {p['after']:.0f}"
        print(f"| {name} | {rates} | {p['longest_step_s']:.2f} |")
    print(f"final parameters bitwise equal across groups: {equal}")
    if args.out is not None:
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
