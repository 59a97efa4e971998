"""The closing summary of ``crucible run`` and the table of ``crucible status``; the results
shown per kind are the kind's ``Kind.results`` (crucible.api.registry)."""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from crucible.api.registry import kind_of
from crucible.core.status import parse_time
from crucible.local.workdir import RunState

_ANY: tuple[tuple[str, str], ...] = (("documentsOut", "docs kept {:,}"), ("finalLoss", "loss {:.3f}"))


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def key_results(results: dict[str, Any], limit: int = 2, kind: str | None = None) -> str:
    parts = []
    try:
        formats = kind_of(kind or "").results or _ANY
    except KeyError:
        formats = _ANY
    for key, fmt in formats:
        value = results.get(key)
        if isinstance(value, int | float) and not isinstance(value, bool):
            parts.append(fmt.format(human_bytes(value)) if key.startswith("sizeBytes") else fmt.format(value))
        if len(parts) == limit:
            break
    return ", ".join(parts)


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def table(rows: Sequence[Sequence[str]], header: Sequence[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(header, widths, strict=True)).rstrip()]
    lines += ["  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    return "\n".join(lines)


def print_summary(outcomes: Sequence[Any], wall_seconds: float, workdir: Path) -> None:
    rows = []
    for o in outcomes:
        _, kind, name = o.key
        phase = o.phase + (" (skipped)" if o.skipped else "")
        rows.append([f"{kind}/{name}", phase, "-" if o.skipped else duration(o.seconds),
                     "-" if o.skipped else duration(o.cpu_seconds), str(o.restarts),
                     key_results(o.results, kind=kind) or (o.message.splitlines()[0][:70] if o.message else "")])
    print()
    print(table(rows, ["RUN", "RESULT", "TIME", "CPU", "RESTARTS", "NOTES"]))
    ok = sum(1 for o in outcomes if o.phase == "Succeeded")
    print(f"\n{ok}/{len(outcomes)} run(s) succeeded in {duration(wall_seconds)}; everything is under {workdir}")
    failed = [o for o in outcomes if o.phase == "Failed"]
    for o in failed:
        print(f"  {o.key[1]}/{o.key[2]} failed: see `crucible logs {o.key[2]} -w {workdir}`")


def status_rows(states: Sequence[RunState], now: float | None = None) -> list[list[str]]:
    now = time.time() if now is None else now
    rows = []
    for s in states:
        st = s.status
        p = st.progress
        step = "-" if p.step is None else (f"{p.step}/{p.total_steps}" if p.total_steps else str(p.step))
        loss = "-" if p.loss is None else f"{p.loss:.4f}"
        start = parse_time(st.start_time)
        end = parse_time(st.completion_time)
        age = duration((end or now) - start) if start else "-"
        note = st.message or ""
        if st.phase in ("Running", "Restarting", "Pending") and st.last_checkpoint is not None:
            note += f" (checkpoint at step {st.last_checkpoint.step})"
        if st.phase == "Succeeded":
            note = key_results(st.results, kind=s.kind) or note
        rows.append([s.name, s.kind, st.phase, step, loss, str(st.restarts), age, note.splitlines()[0][:80] if note else ""])
    return rows


STATUS_HEADER = ["NAME", "KIND", "PHASE", "STEP", "LOSS", "RESTARTS", "TIME", "MESSAGE"]
