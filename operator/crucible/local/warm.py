"""Warm spares: the next attempt's interpreter, started ahead with the stage's imports done.

    spare = Spare.start(python, stage, env, folder, rank)   # runner side, while an attempt trains
    spare.usable_for(argv, env)                              # the same stage, nothing import-time changed
    proc = spare.release(argv, env, log)                     # it becomes ``python -m crucible.trainer ...``
    spare.discard()
    spare = first_attempt_spare(paths, python)               # ``crucible run``: before its own imports

    python -m crucible.local.warm STAGE [SPEC]               # the spare itself (child side)

A restart's new trainer process spends most of its time importing torch and transformers
(about 13 s of CPU here, a minute of wall time on a busy machine) before it reads its
checkpoint: at a fault every few minutes that alone costs more than the checkpoints and the
redone steps together. Like torchelastic's hot spares, the embedded runner keeps one
interpreter per rank ready for the next attempt: started once the current attempt has trained
a step (so it never competes with that attempt's own start), it imports the stage and its heavy
dependencies, then blocks on a pipe until the runner releases it or closes the pipe.

Released, it is exactly what a cold start would have been: the runner writes the log header
as for any process, the spare sends what its imports printed into the attempt's log, points
stdout/stderr at that log and stdin at /dev/null, takes the attempt's environment (ports,
rank, attempt number, restart count), and runs ``crucible.trainer`` as ``__main__`` with the
attempt's arguments (:func:`runpy.run_module`, as ``python -m`` does). Its pid, exit status,
session (``start_new_session``) and death with the runner (``PR_SET_PDEATHSIG``) are those of a
process the runner started itself, so attempt numbering, ``state.json``, the per-attempt logs,
exit-code classification and ``crucible logs -f`` are unchanged.

A spare is only used when nothing it read at import time can differ: the same interpreter and
stage, and an environment equal to the attempt's except for the variables the trainer reads
after its imports (:data:`LATE_ENV`, :data:`LATE_ENV_PREFIXES`). Otherwise it is discarded and
the attempt starts cold. ``CRUCIBLE_WARM_SPARES=0`` turns spares off.

The first attempt has a spare too: ``crucible run`` starts one (:func:`first_attempt_spare`)
before it imports anything heavy, so the trainer's imports (torch and transformers: the largest
part of a run's start-up) run beside the CLI's own loading, validation, planning and input
hashing instead of after them. Which stage it preloads is read from the YAML files' ``kind:``
lines without parsing them (a guess, never trusted: the spare is used only when the first
attempt of a run of that kind fits it, as above, and discarded otherwise).

What a spare imports follows the attempt it will become (:func:`needs_transformers`): a
PretrainRun of a fresh Llama trains :mod:`crucible.trainer.llama`'s own module and never imports
transformers before its first step, so neither does its spare (≈ 3.3 s of CPU less on every
start and restart, and no spare competing that much longer with the training it runs beside);
a restart's spare reads the attempt's resource spec (``SPEC``) and imports transformers too
when the run has a ``model.source`` or another architecture, as fine-tune and preference spares
always do.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

WARM_SPARES_ENV = "CRUCIBLE_WARM_SPARES"
"""``0``: no spares (every attempt starts a fresh interpreter)."""

PRELOAD: dict[str, tuple[str, ...]] = {
    stage: (module, "torch.distributed.checkpoint", "torch.distributed.checkpoint.state_dict", "safetensors.torch",
            "crucible.trainer.model", "crucible.trainer.checkpoint", "crucible.trainer.output")
    for stage, module in (("pretrain", "crucible.trainer.pretrain"), ("finetune", "crucible.trainer.finetune"),
                          ("preference", "crucible.trainer.preference"))
}
"""What a spare imports per stage: the stage module and what its first attempt imports later."""
TRANSFORMERS_PRELOAD = ("transformers", "transformers.models.llama.modeling_llama")
"""Imported too when the attempt will build a transformers model (:func:`needs_transformers`)."""

LATE_ENV = frozenset({"RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "NODE_RANK",
                      "MASTER_ADDR", "MASTER_PORT", "OMP_NUM_THREADS"})
"""Read after the imports (torchrun's variables; OMP_NUM_THREADS is applied with torch.set_num_threads)."""
LATE_ENV_PREFIXES = ("CRUCIBLE_",)
"""The contract environment (attempt, restarts, run start, metrics port, ...) is read at run time."""

KIND_STAGES = {"PretrainRun": "pretrain", "FinetuneRun": "finetune", "PreferenceRun": "preference"}
"""The kinds whose trainer stage has a :data:`PRELOAD` list, in the order a pipeline runs them."""
TRAINER_COMMAND_ENV = "CRUCIBLE_TRAINER_COMMAND"
_KIND_LINE = re.compile(rb"^kind:[ \t]*[\"']?(\w+)[\"']?[ \t]*(?:#.*)?\r?$", re.MULTILINE)
_SCAN_BYTES = 1 << 20
_YAML_SUFFIXES = (".yaml", ".yml")

_PR_SET_PDEATHSIG = 1


def enabled(env: Mapping[str, str] | None = None) -> bool:
    return (env if env is not None else os.environ).get(WARM_SPARES_ENV, "1") != "0"


def is_trainer_argv(argv: Sequence[str], python: str) -> bool:
    return len(argv) >= 4 and argv[0] == python and list(argv[1:3]) == ["-m", "crucible.trainer"]


def _late(name: str) -> bool:
    return name in LATE_ENV or name.startswith(LATE_ENV_PREFIXES)


def env_differences(spare_env: Mapping[str, str], env: Mapping[str, str]) -> list[str]:
    """Variables that differ and may have been read at import time (empty: the spare fits)."""
    names = set(spare_env) | set(env)
    return sorted(n for n in names if not _late(n) and spare_env.get(n) != env.get(n))


def needs_transformers(stage: str, spec_path: str | None) -> bool:
    """Whether the attempt builds a transformers model, from the resource spec it will read.

    A fine-tune or preference run reads a Hugging Face model. A PretrainRun of a fresh Llama
    builds :mod:`crucible.trainer.llama`'s own, with no transformers import before its first
    step; one with ``model.source`` or another architecture needs transformers. Without a spec
    (the first attempt's spare, a guess made before the YAML is parsed) a PretrainRun is taken
    to be a fresh Llama; an unreadable spec counts as needing it.
    """
    if stage != "pretrain":
        return True
    if spec_path is None:
        return False
    try:
        with open(spec_path, "rb") as fh:
            spec = json.loads(fh.read(_SCAN_BYTES))
        model = spec.get("model") or {}
        return bool(model.get("source")) or model.get("architecture", "llama") != "llama"
    except (OSError, ValueError, AttributeError):
        return True


def spec_path_of(argv: Sequence[str]) -> str | None:
    """The ``--spec`` argument of a trainer command line."""
    args = list(argv)
    return args[args.index("--spec") + 1] if "--spec" in args[:-1] else None


def _die_with_parent() -> None:  # in the child between fork and exec
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            import ctypes

            ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


@dataclass
class Spare:
    """One pre-started interpreter (runner side)."""

    proc: subprocess.Popen[bytes]
    python: str
    stage: str
    env: dict[str, str]
    preload_log: Path
    started_at: float = field(default_factory=time.time)
    quiet: bool = False
    """Not worth a line when it does not fit (the first attempt's spare is a guess)."""
    released: bool = False
    discarded: bool = False

    @classmethod
    def start(cls, python: str, stage: str, env: Mapping[str, str], folder: Path, rank: int,
              spec_path: str | None = None) -> Spare:
        """``spec_path``: the resource spec the attempt will read (what to import: :func:`needs_transformers`)."""
        folder.mkdir(parents=True, exist_ok=True)
        preload_log = folder / f"spare-{rank}.{time.time_ns()}.log"
        with open(preload_log, "wb") as out:
            proc = subprocess.Popen(
                [python, "-m", "crucible.local.warm", stage, *([spec_path] if spec_path else [])],
                env=dict(env), stdin=subprocess.PIPE,
                stdout=out, stderr=subprocess.STDOUT, start_new_session=True, preexec_fn=_die_with_parent)
        return cls(proc, python, stage, dict(env), preload_log)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def ready(self) -> bool:
        """Its imports are done (it wrote its ready line)."""
        try:
            return b"crucible-spare: ready" in self.preload_log.read_bytes()
        except OSError:
            return False

    def usable_for(self, argv: Sequence[str], env: Mapping[str, str]) -> str | None:
        """None when it can become this process; else why not."""
        if not self.alive():
            return f"the spare (pid {self.pid}) has exited"
        if not is_trainer_argv(argv, self.python) or argv[3] != self.stage:
            return f"the attempt runs {' '.join(argv[:4])}, the spare stage {self.stage}"
        diff = env_differences(self.env, env)
        if diff:
            return f"the environment changed ({', '.join(diff[:5])})"
        return None

    def release(self, argv: Sequence[str], env: Mapping[str, str], log: Path) -> subprocess.Popen[bytes]:
        """Hand it the attempt: it runs ``python -m crucible.trainer argv[3:]`` with ``env``, output to ``log``."""
        message = json.dumps({"args": list(argv[3:]), "env": dict(env), "log": str(log),
                              "preloadLog": str(self.preload_log)})
        assert self.proc.stdin is not None
        self.released = True
        try:
            self.proc.stdin.write(message.encode() + b"\n")
            self.proc.stdin.close()
        except (BrokenPipeError, OSError):
            pass  # it died meanwhile: the process ends at once and the runner sees its exit status
        return self.proc

    def discard(self) -> None:
        if self.released or self.discarded:
            return  # released: it is an attempt's process now, which the runner stops as such
        self.discarded = True
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        with contextlib.suppress(OSError):
            if self.proc.stdin is not None:
                self.proc.stdin.close()
        self.proc.wait()
        with contextlib.suppress(OSError):
            self.preload_log.unlink()


def stage_in(paths: Iterable[str | Path]) -> str | None:
    """The trainer stage of the first training run among the YAML files under ``paths``, from
    their ``kind:`` lines alone (no YAML is parsed; at most 1 MiB of each file is read)."""
    kinds: set[str] = set()
    for path in map(Path, paths):
        try:
            files = ([path] if path.is_file() else
                     sorted(p for p in path.rglob("*") if p.suffix in _YAML_SUFFIXES and p.is_file()))
        except OSError:
            continue
        for file in files:
            with contextlib.suppress(OSError), open(file, "rb") as fh:
                kinds.update(m.group(1).decode() for m in _KIND_LINE.finditer(fh.read(_SCAN_BYTES)))
    return next((stage for kind, stage in KIND_STAGES.items() if kind in kinds), None)


def first_attempt_spare(paths: Iterable[str | Path], python: str = sys.executable,
                        env: Mapping[str, str] | None = None) -> Spare | None:
    """A spare for the first attempt of the first training run in ``paths``, started now.

    Its environment is the one the runner gives its processes (this one, unbuffered); None when
    spares are off, a stand-in trainer command is set, or the files name no training run.
    """
    env = dict(os.environ if env is None else env)
    if not enabled(env) or env.get(TRAINER_COMMAND_ENV):
        return None
    stage = stage_in(paths)
    if stage is None:
        return None
    try:
        spare = Spare.start(python, stage, {**env, "PYTHONUNBUFFERED": "1"},
                            Path(tempfile.gettempdir()) / "crucible-spares", 0)
    except OSError:
        return None
    spare.quiet = True
    return spare


# ------------------------------------------------------------------------------ child side
def _preload(stage: str, spec_path: str | None = None) -> None:
    extra = TRANSFORMERS_PRELOAD if stage in PRELOAD and needs_transformers(stage, spec_path) else ()
    for name in (*PRELOAD.get(stage, ()), *extra):
        try:
            importlib.import_module(name)
        except Exception as exc:  # the attempt itself reports a broken dependency, with its own message
            print(f"crucible-spare: could not preload {name}: {exc}", flush=True)


def _become(message: dict[str, object]) -> None:
    """Turn this interpreter into the attempt's process: its log, environment and arguments."""
    log = str(message["log"])
    preload_log = Path(str(message["preloadLog"]))
    sys.stdout.flush()
    sys.stderr.flush()
    fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    with contextlib.suppress(OSError):  # what the imports printed belongs to the attempt's log
        text = preload_log.read_bytes().replace(b"crucible-spare: ready\n", b"")
        if text:
            os.write(fd, text)
        preload_log.unlink()
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    env = message["env"]
    assert isinstance(env, dict)
    os.environ.clear()
    os.environ.update({str(k): str(v) for k, v in env.items()})
    threads = os.environ.get("OMP_NUM_THREADS")
    if threads and threads.isdigit() and "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(int(threads))
    args = message["args"]
    assert isinstance(args, list)
    sys.argv = ["-m", *(str(a) for a in args)]


def main() -> None:
    stage = sys.argv[1] if len(sys.argv) > 1 else ""
    started = time.monotonic()
    _preload(stage, sys.argv[2] if len(sys.argv) > 2 else None)
    print(f"crucible-spare: imports took {time.monotonic() - started:.1f}s", flush=True)
    print("crucible-spare: ready", flush=True)
    line = sys.stdin.buffer.readline()
    if not line.strip():
        return  # discarded: the runner closed the pipe
    _become(json.loads(line))
    import runpy

    os.environ["CRUCIBLE_WARM_START"] = "1"
    runpy.run_module("crucible.trainer", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
