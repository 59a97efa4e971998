"""A stand-in for ``python -m crucible.trainer STAGE --spec FILE`` in the runner's unit tests.

It honours the stage contract (output/_SUCCESS last, checkpoints step-NNNNNNNNN/ with a manifest
written last, metrics.jsonl, resume from the latest checkpoint, return 0 when _SUCCESS exists)
and misbehaves on demand. FAKE_BEHAVIOUR is JSON: {run name: {key: value}} with keys

  exit            exit with this code at once (every attempt)
  crash_at_step   exit with crash_exit (default 1) when reaching this step, on attempt 0 only
  kill_at_step    SIGKILL itself when reaching this step, on attempt 0 only
  hang_at_step    stop making progress at this step (attempt 0 only)
  no_success      exit 0 without writing _SUCCESS
  step_seconds    time per step (default 0.02)
  hold_at_step    before this step (attempt 0 only), wait until the file release_file exists
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path


def main(argv: list[str]) -> int:
    stage = argv[0]
    spec = json.loads(Path(argv[argv.index("--spec") + 1]).read_text())
    run = os.environ["CRUCIBLE_RUN"]
    attempt = int(os.environ["CRUCIBLE_ATTEMPT"])
    behaviour = json.loads(os.environ.get("FAKE_BEHAVIOUR", "{}")).get(run, {})
    out = Path(spec["output"]["uri"])
    print(f"fake {stage} {run} attempt {attempt} rank {os.environ.get('RANK')} world {os.environ.get('WORLD_SIZE')}",
          flush=True)
    print("argv " + " ".join(argv[1:]), flush=True)
    if (out / "_SUCCESS").exists():
        print("already done", flush=True)
        return 0
    if "exit" in behaviour:
        print(f"failing on purpose with {behaviour['exit']}", flush=True)
        return int(behaviour["exit"])
    results: dict[str, object] = {}
    if "checkpoint" in spec:
        results = train(spec, behaviour, attempt)
    else:
        results = {"documentsIn": 10, "documentsOut": 7}
        for key in ("data", "model", "dataset"):
            if isinstance(spec.get(key), dict) and "uri" in spec[key]:
                results[f"input_{key}"] = spec[key]["uri"]
    if behaviour.get("no_success"):
        return 0
    if os.environ.get("RANK", "0") != "0":
        return 0
    out.mkdir(parents=True, exist_ok=True)
    if stage == "data":
        (out / "manifest.json").write_text(json.dumps({
            "documentsIn": 10, "documentsOut": 7,
            "dropped": {"quality": {"gopher_short": 2}, "dedup": {"exact": 1}},
        }))
    from crucible.trainer.config.receipt import current_run, spec_hash

    (out / "_SUCCESS").write_text(json.dumps({"stage": stage, "specHash": spec_hash(spec, stage), "run": current_run(),
                                              "finishedAt": time.time(), "inputs": {}, "results": results}))
    return 0


def train(spec: dict, behaviour: dict, attempt: int) -> dict[str, object]:
    ckpt = Path(spec["checkpoint"]["uri"])
    ckpt.mkdir(parents=True, exist_ok=True)
    steps = int(spec["training"]["maxSteps"])
    interval = spec["checkpoint"].get("interval", 2)
    interval = 2 if interval == "auto" else int(interval)
    start = 0
    done = sorted(int(p.name[5:]) for p in ckpt.glob("step-*") if (p / "manifest.json").exists())
    if done:
        start = done[-1]
        print(f"resumed from checkpoint step {start}", flush=True)
    rank0 = os.environ.get("RANK", "0") == "0"
    loss = 5.0
    for step in range(start + 1, steps + 1):
        if attempt == 0 and behaviour.get("hold_at_step") == step:
            while not os.path.exists(behaviour["release_file"]):  # the test lets it go on when it is ready
                time.sleep(0.05)
        if attempt == 0 and behaviour.get("kill_at_step") == step:
            os.kill(os.getpid(), signal.SIGKILL)
        if attempt == 0 and behaviour.get("crash_at_step") == step:
            print("Traceback: boom on purpose", flush=True)
            return sys.exit(int(behaviour.get("crash_exit", 1)))
        if attempt == 0 and behaviour.get("hang_at_step") == step:
            time.sleep(3600)
        time.sleep(float(behaviour.get("step_seconds", 0.02)))
        loss = 5.0 / step
        if rank0:
            with open(ckpt / "metrics.jsonl", "a") as fh:
                fh.write(json.dumps({"step": step, "loss": loss, "lr": 1e-3, "tokens": step * 64,
                                     "tokensPerSecond": 1000.0,
                                     "stepSeconds": float(behaviour.get("step_seconds", 0.02)), "time": time.time()}) + "\n")
            if step % interval == 0:
                d = ckpt / f"step-{step:09d}"
                d.mkdir(exist_ok=True)
                (d / "state.json").write_text(json.dumps({"step": step}))
                (d / "manifest.json").write_text(json.dumps({"step": step}))
    return {"finalLoss": loss, "resumedFrom": start}


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
