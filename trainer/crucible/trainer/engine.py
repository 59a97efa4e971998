"""One training engine for every stage; what differs between stages is the :class:`Objective`.

An objective knows its data and its loss; the engine owns everything else::

    class Objective(Protocol):
        def train_batches(self, ctx: TrainContext) -> ResumableIterator: ...
        def eval_batches(self, ctx: TrainContext) -> Iterable[dict[str, Tensor]] | None: ...
        def loss(self, model, batch) -> tuple[Tensor, dict[str, float | Tensor]]: ...
        def tokens(self, batch) -> int: ...

* ``train_batches`` yields this rank's micro-batches (dicts of CPU tensors; the engine moves
  them to the device). Its ``position``/``state_dict`` go into every checkpoint, and the
  engine calls ``skip(start, end)`` to drop a data window after a loss-spike rollback. Build
  it from :class:`crucible.trainer.sampler.BatchIterator` (a ``GlobalSampler`` over your
  examples plus a ``fetch(indices) -> batch``) and resume, resharding and skipping come free.
* ``eval_batches`` yields held-out micro-batches, the same number on every rank (the engine
  takes ``training.evalBatches`` of them); None: no held-out evaluation.
* ``loss`` returns the mean loss of the micro-batch (a scalar with grad) and extra metrics
  (e.g. DPO reward accuracy). The engine averages extras over micro-batches and ranks,
  weighted by ``tokens(batch)``, logs them, and reports them from evaluation.

The engine: process group and strategy (ddp / FSDP2 / DeepSpeed ZeRO; only parameters with
``requires_grad`` are optimized, so LoRA works unchanged), gradient accumulation up to
``training.globalBatchTokens``, clipping, the LR schedule, ``training.precision`` (bf16/fp16
autocast, fp16 loss scaling), sharded checkpoints with resume (model, optimizer, RNG, data
position, skipped windows), loss-spike rollback/alert, the hang watchdog, Prometheus + metrics.jsonl, and held-out evaluation.
``Engine(...).fit()`` returns the measured results; :meth:`Engine.export` writes the final
Hugging Face model and :mod:`crucible.trainer.output` the ``_SUCCESS`` receipt.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import signal
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from itertools import islice
from typing import Any, Protocol

import torch

from crucible.trainer import storage as st
from crucible.trainer.checkpoint import Checkpointer, rng_state, set_rng_state, young_daly_interval
from crucible.trainer.config.stages import TrainStageConfig
from crucible.trainer.distributed import DistEnv, Strategy, broadcast_object, build_strategy
from crucible.trainer.faults import RetriableError, SpecError
from crucible.trainer.flops import count_params, flops_per_token, mfu, peak_flops
from crucible.trainer.loss_spike import LossSpikeDetector, Spike
from crucible.trainer.metrics import Metrics, StepLog
from crucible.trainer.optim import lr_at
from crucible.trainer.precision import autocast
from crucible.trainer.sampler import ResumableIterator
from crucible.trainer.watchdog import Watchdog

Batch = dict[str, torch.Tensor]


@dataclass
class TrainContext:
    """What an objective may need to build its data."""

    config: TrainStageConfig
    env: DistEnv
    store: st.Storage
    tokenizer: Any
    seq_len: int
    micro_batch_size: int
    grad_accum: int
    seed: int


class Objective(Protocol):
    def train_batches(self, ctx: TrainContext) -> ResumableIterator: ...
    def eval_batches(self, ctx: TrainContext) -> Iterable[Batch] | None: ...
    def loss(self, model: Any, batch: Batch) -> tuple[torch.Tensor, dict[str, Any]]: ...
    def tokens(self, batch: Batch) -> int: ...


@dataclass
class FitResult:
    steps: int
    tokens: int
    final_loss: float
    eval: dict[str, float] = field(default_factory=dict)
    loss_spikes: int = 0
    rollbacks: int = 0
    tokens_per_second: float = 0.0
    mfu: float | None = None
    resumed_from: int | None = None
    precision: str = "fp32"
    overflow_steps: int | None = None

    def results(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "steps": self.steps,
            "tokens": self.tokens,
            "finalLoss": self.final_loss,
            "lossSpikes": self.loss_spikes,
            "rollbacks": self.rollbacks,
            "tokensPerSecond": round(self.tokens_per_second, 2),
        }
        if self.mfu is not None:
            out["mfu"] = round(self.mfu, 4)
        if "loss" in self.eval:
            out["evalLoss"] = self.eval["loss"]
            out["perplexity"] = self.eval["perplexity"]
        out.update({f"eval{k[0].upper()}{k[1:]}": v for k, v in self.eval.items() if k not in ("loss", "perplexity")})
        if self.resumed_from is not None:
            out["resumedFromStep"] = self.resumed_from
        out["precision"] = self.precision  # what `precision: auto` chose, or what was asked for
        if self.overflow_steps is not None:
            out["overflowSteps"] = self.overflow_steps
        return out


def config_hash(config: TrainStageConfig) -> str:
    """Hash of what decides the training math (not max steps, checkpoint or metrics settings)."""
    wire = config.to_wire()
    relevant = {k: wire.get(k) for k in ("model", "optimizer", "method", "lora", "dpo", "rl", "reward", "prompts")}
    training = dict(wire.get("training", {}))
    for volatile in ("maxSteps", "maxTokens", "evalEvery", "evalBatches", "compile"):
        training.pop(volatile, None)
    relevant["training"] = training
    return hashlib.sha256(json.dumps(relevant, sort_keys=True, default=str).encode()).hexdigest()[:16]


def data_parallel_size(config: TrainStageConfig, world_size: int) -> int:
    """Ranks that see different data: the world, or replicate × shard of a parallelism layout."""
    par = config.training.parallelism
    return world_size if par is None else par.data_size(world_size)


def _state_dict_mismatch(exc: BaseException) -> str | None:
    """The first line of a load_state_dict error about shapes or keys (None for other errors)."""
    text = str(exc)
    for marker in ("size mismatch for", "Size mismatch between", "Missing key(s)", "Unexpected key(s)"):
        at = text.find(marker)
        if at >= 0:
            line = text[at:].splitlines()[0].strip()
            return line[:300]
    return None


class UnstableTrainingError(RuntimeError):
    """Loss spikes the engine cannot (or may no more) roll back from: an application error, never retried."""


def grad_accum_steps(config: TrainStageConfig, world_size: int) -> int:
    tr = config.training
    data_ranks = data_parallel_size(config, world_size)
    per_micro = tr.micro_batch_size * tr.seq_len * data_ranks
    if tr.global_batch_tokens % per_micro:
        raise SpecError(
            f"training.globalBatchTokens ({tr.global_batch_tokens}) must be a multiple of "
            f"microBatchSize × seqLen × data-parallel ranks = {tr.micro_batch_size} × {tr.seq_len} × {data_ranks} "
            f"= {per_micro}; use {max(1, round(tr.global_batch_tokens / per_micro)) * per_micro}"
        )
    return tr.global_batch_tokens // per_micro


def _moe_experts(model: torch.nn.Module) -> int:
    from crucible.trainer.moe import moe_blocks

    blocks = moe_blocks(model)
    return blocks[0].num_experts if blocks else 0


UNSEEN_FAILURES_OVERHEAD = 0.01
"""``checkpoint.interval: auto`` before any failure is seen (no ``failurePolicy.failureRatePerHour``,
no restart yet): the interval is the shorter of Young/Daly with :data:`PRIOR_FAILURES_PER_HOUR`
and the one that spends this share of the time on blocking saves (τ = C / 1 %). An unknown
failure rate is no reason to risk hours of work when a save costs a fraction of a second."""
PRIOR_FAILURES_PER_HOUR = 1.0 / 24.0


def _local_tensor(t: torch.Tensor) -> torch.Tensor:
    """This rank's storage of a parameter (the local shard of an FSDP2/tensor-parallel DTensor)."""
    inner = getattr(t, "_local_tensor", None)
    return inner if isinstance(inner, torch.Tensor) else t


def total_steps(config: TrainStageConfig) -> int:
    tr = config.training
    if tr.max_steps is not None:
        return tr.max_steps
    assert tr.max_tokens is not None
    return max(1, math.ceil(tr.max_tokens / tr.global_batch_tokens))


class Engine:
    def __init__(
        self,
        config: TrainStageConfig,
        model: torch.nn.Module,
        objective: Objective,
        tokenizer: Any,
        env: DistEnv,
        store: st.Storage | None = None,
        log: Callable[[str], None] | None = None,
    ) -> None:
        self.config = config
        self.objective = objective
        self.tokenizer = tokenizer
        self.env = env
        self.store = store or st.Storage.from_config(config.storage)
        self._log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
        tr = config.training
        self.grad_accum = grad_accum_steps(config, env.world_size)
        self.total_steps = total_steps(config)
        self.total_params = sum(p.numel() for p in model.parameters())
        n_params = count_params(model)
        mcfg = getattr(model, "config", None)
        layers = int(getattr(mcfg, "num_hidden_layers", 0) or 0)
        hidden = int(getattr(mcfg, "hidden_size", 0) or 0)
        self.flops_per_token = flops_per_token(n_params, layers, hidden, tr.seq_len)
        self.peak = peak_flops(torch.cuda.get_device_name(env.device)) if env.device.type == "cuda" else None
        self.moe_experts = _moe_experts(model)
        if self.moe_experts:  # MoE FLOPs count the active experts only
            from crucible.trainer.flops import active_params

            n_params = active_params(model)
            self.flops_per_token = flops_per_token(n_params, layers, hidden, tr.seq_len)
        self.strategy: Strategy = build_strategy(model, env, tr, config.optimizer, self.grad_accum)
        self.data_rank = int(getattr(self.strategy, "data_rank", env.rank))
        self.data_size = int(getattr(self.strategy, "data_size", env.world_size))
        self.report_weight = float(getattr(self.strategy, "report_weight", 1.0))
        self.pipelined = bool(getattr(self.strategy, "pipelined", False))
        if self.moe_experts:
            from crucible.trainer.moe import moe_blocks

            for block in moe_blocks(model):  # pipeline schedules scale gradients by 1/microbatches themselves
                block.aux_grad_scale = 1.0 if self.pipelined else 1.0 / self.grad_accum
        data_env = DistEnv(self.data_rank, self.data_size, env.local_rank, env.local_world_size, env.device)
        self.ctx = TrainContext(
            config, data_env, self.store, tokenizer, tr.seq_len, tr.micro_batch_size, self.grad_accum, tr.seed
        )
        self.precision = self.strategy.precision
        self.use_autocast = self.precision.dtype is not None and not self.strategy.precision_in_params
        ckpt_uri = config.checkpoint.uri or st.join(config.output.uri or "", "checkpoints")
        self.checkpointer = Checkpointer(
            ckpt_uri, self.store, env, config.checkpoint.keep, config.checkpoint.async_save is not False,
            config_hash(config), self.log,
        )
        self.detector = LossSpikeDetector(config.loss_spike)
        self.metrics = Metrics(config.metrics.port, enabled=env.is_main)
        self.step_log = StepLog(ckpt_uri, enabled=env.is_main)
        self.train_iter: ResumableIterator = objective.train_batches(self.ctx)
        self.step = 0
        self.tokens = 0
        self.last_loss = math.nan
        self.interval: int = self._initial_interval()
        self._save_costs: list[float] = []
        self._median_step_s: float | None = None
        self._initial: dict[str, Any] | None = None
        self._stop_signal = False

    # -- small helpers ------------------------------------------------------------------------

    def log(self, msg: str) -> None:
        if self.env.is_main:
            self._log(f"[crucible rank0] {msg}")

    def _initial_interval(self) -> int:
        interval = self.config.checkpoint.interval
        if isinstance(interval, int):
            return interval
        return 1  # auto: the first checkpoint follows the first step, so its cost is measured, not assumed

    def _failure_rate(self) -> tuple[float | None, str]:
        """Failures per hour: the spec's, or this run's restarts so far; None before any is seen."""
        rate = self.config.failure_policy.failure_rate_per_hour
        if rate:
            return rate, "failurePolicy.failureRatePerHour"
        restarts = int(os.environ.get("CRUCIBLE_RESTARTS", "0") or 0)
        started = float(os.environ.get("CRUCIBLE_RUN_STARTED", "0") or 0)
        if restarts and started:
            hours = max((time.time() - started) / 3600.0, 1e-3)
            return restarts / hours, f"{restarts} restarts in {hours:.2f} h"
        return None, "none seen yet"

    def _to_device(self, batch: Batch) -> Batch:
        return {k: v.to(self.env.device, non_blocking=True) if isinstance(v, torch.Tensor) else v
                for k, v in batch.items()}

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.use_autocast:
            return autocast(self.precision, self.env.device)
        return contextlib.nullcontext()

    def trainer_state(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "tokens": self.tokens,
            "data": self.train_iter.state_dict(),
            "lossSpike": self.detector.state_dict(),
            "interval": self.interval,
            "loss": self.last_loss,
            "saveSeconds": self._save_cost(),
            "stepSeconds": self._median_step_s,
        }

    # -- checkpoints ----------------------------------------------------------------------------

    def save(self) -> None:
        started = time.perf_counter()
        self.checkpointer.save(self.step, self.trainer_state(), self.strategy)
        blocking = time.perf_counter() - started
        self.step_log.event("checkpoint", step=self.step, blockingSeconds=round(blocking, 4))
        self.metrics.set(checkpoint_save_seconds=self.checkpointer.last_total_s or blocking)
        if self.checkpointer.last_step is not None:
            self.metrics.set(checkpoint_last_step=self.checkpointer.last_step)
            self._initial = None  # a checkpoint exists now: rollbacks go there
        self._save_costs = [*self._save_costs[-4:], blocking]
        if self.config.checkpoint.interval == "auto":
            self._retune_interval()

    def _save_cost(self) -> float | None:
        """C of Young/Daly: the median blocking time of the last saves (what a save costs training)."""
        costs = sorted(self._save_costs)
        return costs[len(costs) // 2] if costs else None

    def _retune_interval(self) -> None:
        """``checkpoint.interval: auto``: Young/Daly's √(2·C·MTBF) from the measured save cost and step time."""
        decision = None
        if self.env.is_main:
            cost = self._save_cost() or 1e-3
            rate, source = self._failure_rate()
            step_s = self._median_step_s or 1.0
            if rate is None:
                daly = young_daly_interval(cost, PRIOR_FAILURES_PER_HOUR, step_s)
                bounded = max(1, round(cost / UNSEEN_FAILURES_OVERHEAD / step_s))
                decision = min(daly, bounded)
                why = (f"no failure seen yet: one a day, or at most {UNSEEN_FAILURES_OVERHEAD:.0%} of the time "
                       "on saves, whichever checkpoints more often")
            else:
                decision = young_daly_interval(cost, rate, step_s)
                why = f"failures {rate:.3g}/h from {source}"
            if decision != self.interval:
                self.log(f"checkpoint interval auto: {decision} steps (Young/Daly: save {cost:.3f}s, "
                         f"step {step_s:.3f}s, {why})")
        self.interval = int(broadcast_object(decision))

    def resume(self) -> int | None:
        if self.config.checkpoint.resume == "never":
            return None
        where = self.checkpointer.uri
        try:
            found = self.checkpointer.latest_valid(self.strategy)
            if found is None:
                return None
            ref, local = found
            where = f"{ref.uri} (step {ref.step})"
            state = self.checkpointer.load(ref, local, self.strategy, self.config.training.seed)
        except (RuntimeError, ValueError) as exc:  # torch.load / DCP say it either way
            shape = _state_dict_mismatch(exc)
            if shape is None:
                raise
            raise SpecError(
                f"checkpoint.uri: {where} was written by a model of another shape, so this spec cannot resume "
                f"from it ({shape}). The model settings changed since those checkpoints were written: to start "
                "fresh, point checkpoint.uri at a new folder (or delete the old checkpoints); to resume, restore "
                "the model settings they were written with"
            ) from exc
        self._restore(state)
        self.log(f"resumed from {ref.uri} (step {self.step}, {self.tokens} tokens)")
        return self.step

    def _restore(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])
        self.tokens = int(state["tokens"])
        self.train_iter.load_state_dict(state["data"])
        for start, end in self.checkpointer.read_skips():  # windows skipped after this checkpoint
            if [start, end] not in state["data"].get("skips", []):
                self.train_iter.skip(start, end)
        self.detector.load_state_dict(state.get("lossSpike", {}))
        self.last_loss = float(state.get("loss", math.nan))
        if self.config.checkpoint.interval == "auto":
            self.interval = int(state.get("interval", self.interval))
            if isinstance(state.get("saveSeconds"), int | float) and not self._save_costs:
                self._save_costs = [float(state["saveSeconds"])]
            if isinstance(state.get("stepSeconds"), int | float) and self._median_step_s is None:
                self._median_step_s = float(state["stepSeconds"])
            if self._save_costs and self._median_step_s:
                self._retune_interval()  # a restart since the save may have taught the failure rate

    def _snapshot_initial(self) -> None:
        """Before the first step of a fresh run: the state a spike before the first checkpoint rolls back to.

        The trainable parameters (this rank's shards, on CPU), the RNG, the data position and the
        loss scaler; the optimizer has no state yet. Dropped once a checkpoint exists. DeepSpeed
        keeps fp32 master weights of its own, so there a spike before the first checkpoint fails."""
        cfg = self.config.loss_spike
        if not (cfg.enabled and cfg.action == "rollback") or self.strategy.world_size_bound:
            return
        import copy

        params = [p for opt in self._optimizers() for group in opt.param_groups for p in group["params"]]
        self._initial = {
            "params": [_local_tensor(p).detach().to("cpu", copy=True) for p in params],
            "rng": rng_state(),
            "trainer": copy.deepcopy(self.trainer_state()),
            "extra": copy.deepcopy(self.strategy.extra_state()),
        }

    def _optimizers(self) -> list[torch.optim.Optimizer]:
        return list(getattr(self.strategy, "optimizers", None) or [self.strategy.optimizer])

    def _restore_initial(self) -> None:
        assert self._initial is not None
        params = [p for opt in self._optimizers() for group in opt.param_groups for p in group["params"]]
        with torch.no_grad():
            for param, saved in zip(params, self._initial["params"], strict=True):
                _local_tensor(param).copy_(saved)
        for opt in self._optimizers():
            opt.zero_grad(set_to_none=True)
            opt.state.clear()  # as before the first step: Adam starts its moments (and step count) afresh
        self.strategy.load_extra_state(self._initial["extra"])
        set_rng_state(self._initial["rng"])
        self._restore(self._initial["trainer"])

    def rollback(self, spike: Spike, window: tuple[int, int]) -> None:
        """PaLM-style: reload the last checkpoint and never train on the offending window again.

        Before the first checkpoint the run rolls back to its initial state (the snapshot taken
        before step 1), counted against ``lossSpike.maxRollbacks`` like any rollback."""
        spikes, rollbacks = self.detector.spikes, self.detector.rollbacks + 1
        if rollbacks > self.config.loss_spike.max_rollbacks:
            raise UnstableTrainingError(
                f"training is unstable: {spike.describe()}; {rollbacks} loss-spike rollbacks exceed "
                f"lossSpike.maxRollbacks ({self.config.loss_spike.max_rollbacks}); lower optimizer.lr or raise "
                "warmupSteps"
            )
        self.checkpointer.wait()
        found = self.checkpointer.latest_valid(self.strategy)
        if found is None and self._initial is None:
            # Continuing would train on from weights the spike already damaged (a NaN poisons every
            # later step): fail now, counted, instead of retrying until the hang watchdog fires.
            self.detector.rollbacks = rollbacks
            raise UnstableTrainingError(
                f"training is unstable: {spike.describe()} before the first checkpoint, and strategy "
                f"{self.strategy.name} keeps no initial state to roll back to (rollback {rollbacks} of "
                f"lossSpike.maxRollbacks {self.config.loss_spike.max_rollbacks}); lower optimizer.lr, raise "
                "optimizer.warmupSteps, or checkpoint earlier (checkpoint.interval)"
            )
        extra = self.config.loss_spike.skip_batches * self.grad_accum * self.ctx.micro_batch_size * self.data_size
        skip = (window[0], window[1] + extra)
        skips = [*self.checkpointer.read_skips(), list(skip)]
        self.checkpointer.write_skips(skips)
        if found is None:
            self._restore_initial()
            where = "the initial state (no checkpoint yet)"
        else:
            ref, local = found
            self._restore(self.checkpointer.load(ref, local, self.strategy, self.config.training.seed))
            where = f"step {self.step}"
        self.detector.spikes, self.detector.rollbacks = spikes, rollbacks
        self.log(
            f"loss spike: {spike.describe()}; rolled back to {where} and skipping "
            f"data positions [{skip[0]}, {skip[1]}) (rollback {rollbacks} of lossSpike.maxRollbacks "
            f"{self.config.loss_spike.max_rollbacks})"
        )
        self.step_log.event("rollback", step=spike.step, toStep=self.step, skip=list(skip), loss=spike.loss)

    # -- the loop -------------------------------------------------------------------------------

    def train_step(self) -> tuple[float, float, int, dict[str, Any]]:
        """One optimizer step over grad_accum micro-batches; (loss, grad norm, tokens, extras), global."""
        self.strategy.train(True)
        loss_sum = torch.zeros((), device=self.env.device, dtype=torch.float64)
        extras: dict[str, torch.Tensor] = {}
        tokens = 0
        if self.pipelined:  # the step's micro-batches are the pipeline's microbatches
            batches = [next(self.train_iter) for _ in range(self.grad_accum)]
            loss_sum += self.strategy.pipeline_step(batches)  # type: ignore[attr-defined]
            tokens = sum(self.objective.tokens(b) for b in batches)
        for i in range(0 if self.pipelined else self.grad_accum):
            last = i == self.grad_accum - 1
            batch = self._to_device(next(self.train_iter))
            with self.strategy.micro_step(last), self._autocast():
                loss, extra = self.objective.loss(self.strategy.model, batch)
            self.strategy.backward(loss / self.grad_accum, last)
            n = self.objective.tokens(batch)
            tokens += n
            loss_sum += loss.detach().to(torch.float64)
            for key, value in extra.items():
                extras[key] = extras.get(key, 0.0) + torch.as_tensor(value, dtype=torch.float64).to(self.env.device) * n
        lr = lr_at(self.step, self.total_steps, self.config.optimizer)
        grad_norm = self.strategy.optimizer_step(lr, self.config.optimizer.grad_clip)
        # one all-reduce for everything logged: loss, tokens, extras, MoE counters and the stop flag;
        # with a layout only one rank per data-parallel rank reports (weight 1), the others add 0
        w = self.report_weight
        keys = sorted(extras)
        parts = [
            (loss_sum / self.grad_accum * w).reshape(1),
            torch.tensor([float(tokens) * w, float(self._stop_signal)], dtype=torch.float64, device=self.env.device),
            *[(extras[k] * w).reshape(1) for k in keys],
        ]
        if self.moe_experts:
            from crucible.trainer.moe import take_stats

            # every pipeline stage's blocks count, once per data-parallel rank (the tensor leader)
            moe_w = float(getattr(self.strategy, "moe_report_weight", w))
            holders = getattr(self.strategy, "stages", None) or [self.strategy.module]
            stats = torch.stack([take_stats(m, self.moe_experts, self.env.device) for m in holders]).sum(0)
            parts.append(stats * moe_w)
        packed = torch.cat(parts)
        if self.env.world_size > 1:
            torch.distributed.all_reduce(packed)
        values = packed.tolist()
        global_tokens = int(values[1])
        self._stop_all = values[2] > 0
        extra_out: dict[str, Any] = {
            k: v / max(global_tokens, 1) for k, v in zip(keys, values[3:3 + len(keys)], strict=True)
        }
        if self.moe_experts:
            from crucible.trainer.moe import summarize_stats

            extra_out.update(summarize_stats(values[3 + len(keys):], self.moe_experts))
        return values[0] / self.data_size, grad_norm, global_tokens, extra_out

    def evaluate(self) -> dict[str, float]:
        batches = self.objective.eval_batches(self.ctx)
        if batches is None:
            return {}
        self.strategy.train(False)
        sums: dict[str, float] = {}
        count = 0.0
        w = self.report_weight
        with torch.no_grad():
            if self.pipelined:  # whole pipeline steps of grad_accum micro-batches
                group = max(self.grad_accum, 1)
                rounds = -(-self.config.training.eval_batches // group)
                chunk = list(islice(batches, rounds * group))
                for start in range(0, len(chunk) - group + 1, group):
                    part = chunk[start:start + group]
                    loss_sum = self.strategy.pipeline_step(part, train=False)  # type: ignore[attr-defined]
                    n = sum(self.objective.tokens(b) for b in part)
                    count += n * w
                    sums["loss"] = sums.get("loss", 0.0) + float(loss_sum) / group * n * w
            for batch in [] if self.pipelined else islice(batches, self.config.training.eval_batches):
                batch = self._to_device(batch)
                with self._autocast():
                    loss, extra = self.objective.loss(self.strategy.model, batch)
                n = self.objective.tokens(batch)
                count += n * w
                sums["loss"] = sums.get("loss", 0.0) + float(loss) * n * w
                for key, value in extra.items():
                    sums[key] = sums.get(key, 0.0) + float(value) * n * w
        self.strategy.train(True)
        keys = sorted(sums)
        from crucible.trainer.distributed import all_reduce_sum

        totals = all_reduce_sum([float(count), *[sums[k] for k in keys]], self.env.device)
        if totals[0] == 0:
            return {}
        out = {k: v / totals[0] for k, v in zip(keys, totals[1:], strict=True)}
        out["perplexity"] = math.exp(min(out["loss"], 50.0))
        return out

    def fit(self) -> FitResult:
        cfg = self.config
        watchdog = Watchdog(float(cfg.failure_policy.hang_timeout_seconds)).start()
        # checkpoint download, verification and load beat as they make progress: a long restore is not a hang
        self.checkpointer.progress = watchdog.beat
        previous_sigterm = signal.signal(signal.SIGTERM, self._on_sigterm)
        try:
            return self._fit(watchdog)
        finally:
            watchdog.stop()
            self.checkpointer.progress = None
            signal.signal(signal.SIGTERM, previous_sigterm)
            # The metrics server stays up: export, prompts, harness and upload follow, and a run whose
            # endpoint vanished would look dead. The stage closes it last (close_metrics) or exits.

    def _record_attempt_start(self, resumed: int | None) -> None:
        """When this process had imported its stage and read its checkpoint (``bench/goodput.py`` times restarts)."""
        import crucible.trainer

        self.step_log.event("attempt", step=self.step, resumedFrom=resumed, attempt=os.environ.get("CRUCIBLE_ATTEMPT"),
                            importsDoneAt=crucible.trainer.IMPORTS_DONE_AT, resumedAt=round(time.time(), 3),
                            warm=os.environ.get("CRUCIBLE_WARM_START") == "1",
                            transformersImported="transformers" in sys.modules)

    def _on_sigterm(self, signum: int, frame: Any) -> None:
        self._stop_signal = True

    def _fit(self, watchdog: Watchdog) -> FitResult:
        cfg = self.config
        resumed = self.resume()
        watchdog.beat("resume")
        if resumed is None:
            if cfg.checkpoint.resume != "never":
                for start, end in self.checkpointer.read_skips():  # windows an earlier attempt rolled back from
                    self.train_iter.skip(start, end)
            self._snapshot_initial()
        self._record_attempt_start(resumed)
        self.log(
            f"training {self.total_steps} steps of {cfg.training.global_batch_tokens} tokens: "
            f"{self.data_size} data-parallel ranks × {cfg.training.micro_batch_size} × {cfg.training.seq_len} tokens "
            f"× {self.grad_accum} accumulation, strategy {self.strategy.name}, device {self.env.device}"
            + (f", layout {self.strategy.layout.describe()}" if hasattr(self.strategy, "layout") else "")
            + f", precision {self.precision.name} ({self.precision.reason})"
        )
        step_times: list[float] = []
        last_eval: dict[str, float] = {}
        tps = 0.0
        self._stop_all = False
        while self.step < self.total_steps:
            position_before = self.train_iter.position
            started = time.perf_counter()
            loss, grad_norm, step_tokens, extras = self.train_step()
            elapsed = time.perf_counter() - started
            watchdog.beat(f"step {self.step + 1}")
            spike = self.detector.observe(self.step + 1, loss)
            if spike is not None and cfg.loss_spike.action == "rollback":
                self.metrics.set(train_loss_spikes_total=self.detector.spikes)
                self.rollback(spike, (position_before, self.train_iter.position))
                continue
            if spike is not None:
                self.log(f"loss spike (alert only): {spike.describe()}")
                self.step_log.event("loss_spike", step=spike.step, loss=spike.loss, z=spike.z)
            self.step += 1
            self.tokens += step_tokens
            self.last_loss = loss
            step_times.append(elapsed)
            self._median_step_s = sorted(step_times[-50:])[len(step_times[-50:]) // 2]
            if cfg.checkpoint.interval == "auto" and len(step_times) == 5 and self._save_costs:
                self._retune_interval()  # the first steps' times are known now, not only the first one's
            tps = step_tokens / elapsed if elapsed > 0 else 0.0
            util = mfu(tps, self.flops_per_token, self.peak, self.env.world_size)
            lr = lr_at(self.step - 1, self.total_steps, cfg.optimizer)
            self.metrics.set(
                train_loss=loss, train_step=self.step, train_tokens_total=self.tokens,
                train_tokens_per_second=tps, train_mfu_ratio=util or 0.0, train_grad_norm=grad_norm,
                train_learning_rate=lr, train_loss_spikes_total=self.detector.spikes,
            )
            step_metrics = getattr(self.objective, "step_metrics", None)  # e.g. RL: generation share, its gauges
            if step_metrics is not None:
                more, gauges = step_metrics(extras, elapsed)
                extras = {**extras, **more}
                self.metrics.set(**gauges)
            record = {"step": self.step, "loss": loss, "lr": lr, "gradNorm": grad_norm, "tokens": self.tokens,
                      "tokensPerSecond": round(tps, 2), "mfu": util, "stepSeconds": round(elapsed, 5), **extras}
            scaler = self.strategy.scaler
            if scaler is not None:  # fp16: the scale, and whether this step's update was skipped (overflow)
                record.update(lossScale=scaler.scale, overflowSteps=scaler.overflows)
                if self.strategy.skipped_last_step:
                    record["overflowSkipped"] = True
                    self.log(f"step {self.step}: fp16 gradients overflowed; update skipped, loss scale now "
                             f"{scaler.scale:g} ({scaler.overflows} skipped so far)")
            if self.moe_experts:
                self.metrics.set_moe(extras["moeExpertShare"], extras["moeDroppedFraction"], extras["moeAuxLoss"],
                                     extras["moeImbalance"])
            self.step_log.write(record)
            if self.step % cfg.metrics.log_every == 0 or self.step == 1:
                self.log(f"step {self.step}/{self.total_steps} loss {loss:.4f} lr {lr:.3g} "
                         f"grad_norm {grad_norm:.3f} tok/s {tps:,.0f}")
            done = self.step >= self.total_steps
            if self._stop_all:
                self.save()
                self.checkpointer.wait()
                raise RetriableError(f"SIGTERM received: checkpoint saved at step {self.step}; exiting to be rescheduled")
            if cfg.training.eval_every and self.step % cfg.training.eval_every == 0 and not done:
                last_eval = self._eval_and_record()
                watchdog.beat("evaluation")
            if self.step % self.interval == 0 or done:
                self.save()
                watchdog.beat("checkpoint")
        self.checkpointer.wait()
        watchdog.beat("final checkpoint")
        final_eval = self._eval_and_record() or last_eval
        watchdog.beat("final evaluation")
        return FitResult(
            steps=self.step,
            tokens=self.tokens,
            final_loss=self.last_loss,
            eval=final_eval,
            loss_spikes=self.detector.spikes,
            rollbacks=self.detector.rollbacks,
            tokens_per_second=tps,
            mfu=mfu(tps, self.flops_per_token, self.peak, self.env.world_size),
            resumed_from=resumed,
            precision=self.precision.name,
            overflow_steps=self.strategy.scaler.overflows if self.strategy.scaler is not None else None,
        )

    def _eval_and_record(self) -> dict[str, float]:
        result = self.evaluate()
        if result:
            self.metrics.set(train_eval_loss=result["loss"])
            self.step_log.event("eval", step=self.step, **result)
            self.log(f"eval at step {self.step}: loss {result['loss']:.4f} perplexity {result['perplexity']:.2f}")
        return result

    def export(self, out_dir: str, shard_bytes: int | None = None) -> dict[str, int]:
        """The final model in Hugging Face format into the local folder ``out_dir`` (rank 0 writes).

        Streamed: tensors are gathered one at a time and written into safetensors files whose
        headers were planned from the shapes, so no rank materialises the whole model. Collective.
        """
        from crucible.trainer.output import SHARD_BYTES, write_hf_model

        specs, items = self.strategy.export_stream()
        stats = write_hf_model(self.strategy.module, specs, items, out_dir if self.env.is_main else None,
                               self.tokenizer, shard_bytes or SHARD_BYTES)
        if self.env.is_main:
            self.log(f"exported {stats['bytes'] / 2**20:.1f} MiB in {stats['files']} safetensors file(s); "
                     f"largest group held at once {stats['peakGroupBytes'] / 2**20:.1f} MiB")
        return stats

    def close(self) -> None:
        """Stop the checkpointer's background writes; the metrics endpoint stays until :meth:`close_metrics`."""
        self.checkpointer.close()

    def close_metrics(self) -> None:
        """Stop serving metrics: the stage calls it after its last step (upload and _SUCCESS)."""
        self.metrics.close()
