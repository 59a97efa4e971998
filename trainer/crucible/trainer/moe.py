"""Mixture of experts: a Mixtral-style sparse MLP inside the Llama blocks, and the Mixtral export.

A MoE block replaces a Llama block's MLP. A linear router scores the ``numExperts`` SwiGLU
experts per token; each token goes to its ``topK`` best (token choice), weighted by the softmax
probabilities renormalised over the chosen ones — exactly Mixtral's routing, and the weights are
stored the way ``transformers``' Mixtral stores them (``mlp.gate.weight`` (E, H),
``mlp.experts.gate_up_proj`` (E, 2I, H), ``mlp.experts.down_proj`` (E, H, I)), so the export is a
rename-free copy.

Training only:

* **capacity** (``capacityFactor``): an expert takes at most ``ceil(cf · N · k / E)`` of the N·k
  assignments of a micro-batch; first choices are served before second choices, earlier tokens
  before later ones (GShard). Dropped assignments contribute nothing (the residual carries the
  token). Inference never drops, which is what the Mixtral export computes.
* **load-balancing loss** (Switch/Mixtral): ``E · Σ_e f_e · P_e`` with f_e the fraction of tokens
  routed to e (summed over the k choices) and P_e the mean router probability; k when balanced.
* **router z-loss** (ST-MoE): ``mean(logsumexp(logits)²)``, keeps router logits small.

The auxiliary losses reach the gradient without passing through the loss plumbing: the block's
output carries them through :class:`_AttachAuxLoss` (identity forward, adds d(aux)/d(params) in
backward), so the same model trains unchanged under DDP, FSDP2 and pipeline schedules. Each block
counts tokens per expert, dropped assignments and its auxiliary loss; :func:`take_stats` reads and
resets the counters after a step.

**Expert parallel** (``training.parallelism.expert`` = EP, set up by
:func:`crucible.trainer.parallel.expert.expert_parallel`): each rank of an EP group holds experts
``[r·E/EP, (r+1)·E/EP)`` (a DTensor ``Shard(0)`` over the ``ep`` mesh). Routing, capacity and
the counters stay on the token's own rank (so the math is the same as without EP: capacity per
rank and micro-batch); the kept assignments are sorted by expert, the per-expert counts exchanged
(one all-to-all of E integers), the tokens sent to their expert's owner (``all_to_all_single``
with those splits, dispatch), computed there grouped by local expert, sent back (combine) and
weighted into the output. :class:`_AllToAll` is differentiable: its backward is the reverse
exchange, so expert gradients land on the owner and token gradients on the source.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from crucible.trainer.config.training import ModelConfig, MoEConfig


class _AttachAuxLoss(torch.autograd.Function):
    """y = x in forward; in backward also sends ``scale`` as the gradient of ``aux``."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, aux: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        ctx.aux_shape, ctx.aux_dtype = aux.shape, aux.dtype
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None]:
        aux_grad = torch.full(ctx.aux_shape, ctx.scale, dtype=ctx.aux_dtype, device=grad.device)
        return grad, aux_grad, None


class _AllToAll(torch.autograd.Function):
    """Rows of ``x`` (split ``send`` per peer) to the peers of ``group``; ``recv`` rows arrive from each."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, send: list[int], recv: list[int], group: Any) -> torch.Tensor:
        import torch.distributed as dist

        ctx.send, ctx.recv, ctx.group = send, recv, group
        out = x.new_empty((sum(recv), *x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), output_split_sizes=recv, input_split_sizes=send, group=group)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:
        import torch.distributed as dist

        out = grad.new_empty((sum(ctx.send), *grad.shape[1:]))
        dist.all_to_all_single(out, grad.contiguous(), output_split_sizes=ctx.send, input_split_sizes=ctx.recv,
                               group=ctx.group)
        return out, None, None, None


def all_to_all(x: torch.Tensor, send: list[int], recv: list[int], group: Any) -> torch.Tensor:
    out: torch.Tensor = _AllToAll.apply(x, send, recv, group)
    return out


class MoERouter(nn.Module):
    def __init__(self, hidden: int, experts: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(experts, hidden))


class MoEExperts(nn.Module):
    def __init__(self, hidden: int, intermediate: int, experts: int) -> None:
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.empty(experts, 2 * intermediate, hidden))
        self.down_proj = nn.Parameter(torch.empty(experts, hidden, intermediate))

    def forward(self, x: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """Rows of ``x`` grouped by expert (``counts[e]`` rows for this module's e-th expert) through
        their experts. Used under expert parallelism, where the weights are this rank's experts (a
        DTensor over the ``ep`` mesh) and FSDP gathers them around this call."""
        gate_up, down = _local(self.gate_up_proj), _local(self.down_proj)
        outs = []
        for e, rows in enumerate(x.split(counts)):  # an expert without rows still joins the graph: every
            g, u = F.linear(rows, gate_up[e]).chunk(2, dim=-1)
            outs.append(F.linear(F.silu(g) * u, down[e]))  # rank has expert gradients for FSDP to reduce
        return torch.cat(outs)


def _local(t: torch.Tensor) -> torch.Tensor:
    to_local = getattr(t, "to_local", None)
    return to_local() if to_local is not None else t


class MoEBlock(nn.Module):
    """Token-choice top-k MoE MLP; input and output (B, T, H)."""

    def __init__(self, hidden: int, intermediate: int, cfg: MoEConfig) -> None:
        super().__init__()
        self.num_experts = cfg.num_experts
        self.top_k = cfg.top_k
        self.aux_loss_coef = cfg.aux_loss_coef
        self.z_loss_coef = cfg.router_z_loss_coef
        self.capacity_factor = cfg.capacity_factor
        self.gate = MoERouter(hidden, cfg.num_experts)
        self.experts = MoEExperts(hidden, intermediate, cfg.num_experts)
        #: d(total loss)/d(aux loss): 1/gradient-accumulation steps, set by the engine
        self.aux_grad_scale = 1.0
        #: expert parallel: the EP process group, its size and this rank's place (set by expert_parallel)
        self.ep_group: Any = None
        self.ep_size, self.ep_rank = 1, 0
        #: off while a pipeline stage infers its shapes (a forward that is not training)
        self.counting = True
        self._stats: dict[str, torch.Tensor] = {}

    def init_weights(self, std: float) -> None:
        for p in (self.gate.weight, self.experts.gate_up_proj, self.experts.down_proj):
            nn.init.normal_(p, mean=0.0, std=std)

    def route(self, flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(router logits (N, E), top-k weights (N, k), top-k experts (N, k), kept (N, k) bool)."""
        logits = F.linear(flat, self.gate.weight)  # (N, E)
        probs = torch.softmax(logits.float(), dim=-1)
        top_w, top_i = torch.topk(probs, self.top_k, dim=-1)  # (N, k)
        top_w = top_w / top_w.sum(dim=-1, keepdim=True)
        kept = torch.ones_like(top_i, dtype=torch.bool)
        if self.training and self.capacity_factor is not None:
            n = flat.shape[0]
            capacity = math.ceil(self.capacity_factor * n * self.top_k / self.num_experts)
            with torch.no_grad():
                choice_major = F.one_hot(top_i.t().reshape(-1), self.num_experts)  # (k·N, E)
                position = (choice_major.cumsum(0) * choice_major).sum(-1)  # 1-based place in its expert's queue
                kept = (position <= capacity).reshape(self.top_k, n).t()
        return logits, top_w.to(flat.dtype), top_i, kept

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        shape = hidden_states.shape
        flat = hidden_states.reshape(-1, shape[-1])  # (N, H)
        logits, top_w, top_i, kept = self.route(flat)
        if self.ep_size > 1:
            out = self._experts_parallel(flat, top_w, top_i, kept)
        else:
            out = torch.zeros_like(flat)
            gate_up, down = self.experts.gate_up_proj, self.experts.down_proj
            for e in range(self.num_experts):
                token, slot = torch.where((top_i == e) & kept)
                if token.numel() == 0:
                    continue
                g, u = F.linear(flat[token], gate_up[e]).chunk(2, dim=-1)  # (n_e, I) each
                y = F.linear(F.silu(g) * u, down[e])  # (n_e, H)
                out.index_add_(0, token, y * top_w[token, slot, None])
        out = out.reshape(shape)
        if self.training and torch.is_grad_enabled():
            aux = self._aux_loss(logits, top_i)
            if aux is not None:
                out = _AttachAuxLoss.apply(out, aux, self.aux_grad_scale)
            if self.counting:
                self._count(top_i, kept, aux)
        return out

    def _experts_parallel(self, flat: torch.Tensor, top_w: torch.Tensor, top_i: torch.Tensor,
                          kept: torch.Tensor) -> torch.Tensor:
        """Dispatch the kept assignments to their experts' owners, compute there, combine back."""
        import torch.distributed as dist

        ep, local = self.ep_size, self.num_experts // self.ep_size
        token, slot = torch.where(kept)
        expert = top_i[token, slot]
        order = torch.argsort(expert, stable=True)  # grouped by expert, so by owner
        token, slot, expert = token[order], slot[order], expert[order]
        counts = torch.bincount(expert, minlength=self.num_experts)  # (E,) this rank's assignments per expert
        arriving = torch.empty_like(counts)  # [peer, local expert]: what each peer sends to my experts
        dist.all_to_all_single(arriving, counts, group=self.ep_group)
        send = counts.view(ep, local).sum(1).tolist()
        arriving = arriving.view(ep, local)
        recv = arriving.sum(1).tolist()
        x = all_to_all(flat[token], send, recv, self.ep_group)  # (Σ recv, H), by peer then local expert
        local_expert = torch.repeat_interleave(torch.arange(local, device=flat.device).repeat(ep), arriving.flatten())
        by_expert = torch.argsort(local_expert, stable=True)
        y = self.experts(x[by_expert], arriving.sum(0).tolist())
        y = torch.empty_like(y).index_copy(0, by_expert, y)  # back to the arrival order
        y = all_to_all(y, recv, send, self.ep_group)  # (Σ send, H), in the order sent
        out = torch.zeros_like(flat)
        return out.index_add(0, token, y * top_w[token, slot, None])

    def _aux_loss(self, logits: torch.Tensor, top_i: torch.Tensor) -> torch.Tensor | None:
        terms = []
        if self.aux_loss_coef > 0:
            probs = torch.softmax(logits.float(), dim=-1)
            routed = F.one_hot(top_i, self.num_experts).float().sum(1).mean(0)  # (E,) Σ over choices
            terms.append(self.aux_loss_coef * self.num_experts * (routed * probs.mean(0)).sum())
        if self.z_loss_coef > 0:
            terms.append(self.z_loss_coef * torch.logsumexp(logits.float(), dim=-1).pow(2).mean())
        return torch.stack(terms).sum() if terms else None

    @torch.no_grad()
    def _count(self, top_i: torch.Tensor, kept: torch.Tensor, aux: torch.Tensor | None) -> None:
        routed = torch.bincount(top_i[kept], minlength=self.num_experts).to(torch.float64)
        balance = F.one_hot(top_i, self.num_experts).float().sum(1).mean(0)
        imbalance = float(self.num_experts) * balance.max().to(torch.float64) / self.top_k  # 1.0 = even
        new = {
            "expertTokens": routed,
            "assignments": torch.tensor(float(top_i.numel()), dtype=torch.float64),
            "dropped": torch.tensor(float((~kept).sum()), dtype=torch.float64),
            "auxLoss": (aux.detach().to(torch.float64).reshape(()) if aux is not None
                        else torch.zeros((), dtype=torch.float64)),
            "imbalance": imbalance,
            "calls": torch.ones((), dtype=torch.float64),
        }
        for key, value in new.items():
            value = value.to(top_i.device)
            self._stats[key] = self._stats[key] + value if key in self._stats else value


def moe_blocks(module: nn.Module) -> list[MoEBlock]:
    return [m for m in module.modules() if isinstance(m, MoEBlock)]


@contextlib.contextmanager
def counting_paused(module: nn.Module) -> Iterator[None]:
    """No MoE counters from the forwards inside (e.g. a pipeline stage's shape inference)."""
    blocks = moe_blocks(module)
    for block in blocks:
        block.counting = False
    try:
        yield
    finally:
        for block in blocks:
            block.counting = True


def stats_width(num_experts: int) -> int:
    return num_experts + 5


def take_stats(module: nn.Module, num_experts: int, device: torch.device) -> torch.Tensor:
    """This rank's counters since the last call, packed (float64): expert tokens (E), assignments,
    dropped, aux-loss sum, max-load/mean-load sum, calls. Resets the counters."""
    out = torch.zeros(stats_width(num_experts), dtype=torch.float64, device=device)
    for block in moe_blocks(module):
        s = block._stats
        if not s:
            continue
        out[:num_experts] += s["expertTokens"]
        out[num_experts:] += torch.stack([s["assignments"], s["dropped"], s["auxLoss"], s["imbalance"], s["calls"]])
        block._stats = {}
    return out


def summarize_stats(packed: list[float], num_experts: int) -> dict[str, Any]:
    """Global step metrics from the summed counters of every rank."""
    tokens = packed[:num_experts]
    assignments, dropped, aux, imbalance, calls = packed[num_experts:]
    routed = sum(tokens) or 1.0
    return {
        "moeExpertShare": [round(t / routed, 5) for t in tokens],
        "moeDroppedFraction": dropped / assignments if assignments else 0.0,
        "moeDroppedTokens": int(dropped),
        "moeAuxLoss": aux / calls if calls else 0.0,
        "moeImbalance": imbalance / calls if calls else 0.0,
    }


# -- building -------------------------------------------------------------------------------------


def is_moe_layer(index: int, every_n: int) -> bool:
    """The last block of each group of ``every_n`` is a MoE block (every_n = 1: all)."""
    return (index + 1) % every_n == 0


def expert_width(cfg: ModelConfig) -> int:
    from crucible.trainer.model import intermediate_size

    moe = cfg.moe_config
    assert moe is not None
    return moe.expert_intermediate_size or intermediate_size(cfg)


def install_moe(model: nn.Module, cfg: MoEConfig, width: int, std: float, seed: int | None = None) -> None:
    """Replace the MLP of every ``everyNLayers``-th decoder block of a Llama with a MoE block."""
    config: Any = model.config  # type: ignore[assignment]
    layers: Any = model.model.layers  # type: ignore[union-attr]
    if seed is not None:
        torch.manual_seed(seed + 1)
    for i, layer in enumerate(layers):
        if is_moe_layer(i, cfg.every_n_layers):
            block = MoEBlock(config.hidden_size, width, cfg)
            block.init_weights(std)
            layer.mlp = block
    config.crucible_moe = {**cfg.model_dump(), "expert_intermediate_size": width}


def seeded_moe_init(model: nn.Module, std: float, seed: int) -> Any:
    """:func:`install_moe`'s seeded init as a meta-init step: each expert tensor drawn at full size
    on CPU in the same order, handed to ``write(name, tensor)`` (which keeps this rank's slice)."""
    layers: Any = model.model.layers  # type: ignore[union-attr]
    names = [(f"model.layers.{i}.mlp.", layer.mlp) for i, layer in enumerate(layers) if isinstance(layer.mlp, MoEBlock)]

    def step(write: Any) -> None:
        torch.manual_seed(seed + 1)
        for prefix, block in names:
            for local in ("gate.weight", "experts.gate_up_proj", "experts.down_proj"):
                full = torch.empty(block.get_parameter(local).shape)
                nn.init.normal_(full, mean=0.0, std=std)
                write(prefix + local, full)
                del full

    return step


def mixtral_config(llama_config: Any) -> Any:
    """The MixtralConfig equivalent to a Llama config with ``crucible_moe`` set."""
    from transformers import MixtralConfig

    moe = llama_config.crucible_moe
    c = llama_config
    return MixtralConfig(
        vocab_size=c.vocab_size,
        hidden_size=c.hidden_size,
        intermediate_size=moe["expert_intermediate_size"],
        num_hidden_layers=c.num_hidden_layers,
        num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads,
        head_dim=c.hidden_size // c.num_attention_heads,
        max_position_embeddings=c.max_position_embeddings,
        rms_norm_eps=c.rms_norm_eps,
        rope_parameters=dict(c.rope_parameters),
        tie_word_embeddings=c.tie_word_embeddings,
        initializer_range=c.initializer_range,
        num_local_experts=moe["num_experts"],
        num_experts_per_tok=moe["top_k"],
        router_aux_loss_coef=moe["aux_loss_coef"],
        output_router_logits=False,
        sliding_window=None,
        eos_token_id=c.eos_token_id,
        bos_token_id=None,
        pad_token_id=None,
        use_cache=True,
        crucible_moe=moe,  # type: ignore[call-arg]
    )


def to_mixtral_state(state: dict[str, torch.Tensor], llama_config: Any,
                     layers: list[int] | None = None) -> dict[str, torch.Tensor]:
    """A Llama+MoE state dict in Mixtral's names; dense blocks become identical experts with a zero
    router (the renormalised top-k weights of identical experts sum to 1: the dense output).
    ``layers``: the decoder layers ``state`` holds (default all; the export streams one at a time)."""
    moe = llama_config.crucible_moe
    experts = moe["num_experts"]
    out: dict[str, torch.Tensor] = {}
    for i in (range(llama_config.num_hidden_layers) if layers is None else layers):
        prefix = f"model.layers.{i}.mlp."
        if is_moe_layer(i, moe["every_n_layers"]):
            continue
        gate, up, down = (state.pop(prefix + f"{n}_proj.weight") for n in ("gate", "up", "down"))
        out[prefix + "gate.weight"] = torch.zeros(experts, gate.shape[1], dtype=gate.dtype)
        out[prefix + "experts.gate_up_proj"] = torch.cat([gate, up], dim=0).unsqueeze(0).repeat(experts, 1, 1)
        out[prefix + "experts.down_proj"] = down.unsqueeze(0).repeat(experts, 1, 1).contiguous()
    return {**state, **out}


def from_mixtral(model: nn.Module, cfg: MoEConfig | None) -> nn.Module:
    """A LlamaForCausalLM with MoE blocks holding a loaded MixtralForCausalLM's weights.

    ``cfg`` (the spec's ``model.moe``) sets the training knobs (aux/z-loss, capacity); its shape
    fields must match the source. Blocks exported as identical experts (``crucible_moe``
    everyNLayers > 1) become dense blocks again.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    from crucible.trainer.faults import SpecError

    mc: Any = model.config
    saved = dict(getattr(mc, "crucible_moe", None) or {})
    every_n = int(saved.get("every_n_layers", 1))
    source_shape = {"numExperts": mc.num_local_experts, "topK": mc.num_experts_per_tok,
                    "expertIntermediateSize": mc.intermediate_size}
    if cfg is not None:
        for name, attr in (("numExperts", "num_experts"), ("topK", "top_k"),
                           ("expertIntermediateSize", "expert_intermediate_size")):
            value = getattr(cfg, attr)
            if attr in cfg.model_fields_set and value is not None and value != source_shape[name]:
                raise SpecError(
                    f"model.moe.{name}: {value} differs from the source model's {source_shape[name]}; "
                    "leave it empty to continue with the source's experts"
                )
        if "every_n_layers" in saved and cfg.every_n_layers != every_n and "every_n_layers" in cfg.model_fields_set:
            raise SpecError(f"model.moe.everyNLayers: the source model has {every_n}; leave it empty or set {every_n}")
        knobs = cfg.model_copy(update={"num_experts": mc.num_local_experts, "top_k": mc.num_experts_per_tok,
                                       "expert_intermediate_size": mc.intermediate_size, "every_n_layers": every_n})
    else:
        knobs = MoEConfig(num_experts=mc.num_local_experts, top_k=mc.num_experts_per_tok,
                          expert_intermediate_size=mc.intermediate_size, every_n_layers=every_n,
                          aux_loss_coef=float(saved.get("aux_loss_coef", mc.router_aux_loss_coef)),
                          router_z_loss_coef=float(saved.get("router_z_loss_coef", 0.0)),
                          capacity_factor=saved.get("capacity_factor"))
    llama = LlamaConfig(
        vocab_size=mc.vocab_size, hidden_size=mc.hidden_size, intermediate_size=mc.intermediate_size,
        num_hidden_layers=mc.num_hidden_layers, num_attention_heads=mc.num_attention_heads,
        num_key_value_heads=mc.num_key_value_heads, max_position_embeddings=mc.max_position_embeddings,
        rms_norm_eps=mc.rms_norm_eps, rope_parameters=dict(mc.rope_parameters),
        tie_word_embeddings=mc.tie_word_embeddings, initializer_range=mc.initializer_range,
        eos_token_id=mc.eos_token_id, bos_token_id=None, pad_token_id=None, use_cache=False,
    )
    with torch.device("meta"):
        out = LlamaForCausalLM(llama)
    install_moe(out, knobs, mc.intermediate_size, std=mc.initializer_range)
    state = dict(model.state_dict())
    for i in range(mc.num_hidden_layers):
        if is_moe_layer(i, every_n):
            continue
        prefix = f"model.layers.{i}.mlp."
        gate_up = state.pop(prefix + "experts.gate_up_proj")[0]
        down = state.pop(prefix + "experts.down_proj")[0]
        state.pop(prefix + "gate.weight")
        gate, up = gate_up.chunk(2, dim=0)
        state.update({prefix + "gate_proj.weight": gate, prefix + "up_proj.weight": up,
                      prefix + "down_proj.weight": down})
    out.load_state_dict(state, assign=True, strict=True)
    if mc.tie_word_embeddings:
        out.tie_weights()
    out.model.rotary_emb = type(out.model.rotary_emb)(llama)  # its buffers were on meta
    out.config.use_cache = False
    return out
