"""Our Llama (crucible.trainer.llama) against transformers' LlamaForCausalLM on the same work.

    python bench/llama_native.py                 # CPU: imports, step time, equality
    python bench/llama_native.py --device cuda   # the same on a GPU (bench/gpu/run.sh)

Printed, ours and transformers' side by side with the ratio:

* the start-up import: a fresh interpreter importing what a PretrainRun attempt imports before
  its first step — the stage, DCP, safetensors, the model module — with our Llama, and with
  ``transformers.models.llama.modeling_llama`` on top (what every attempt imported before);
  best of ``--repeats`` fresh processes, wall and CPU seconds;
* a training step (forward, backward, AdamW) of the same model on the same batch: median of
  ``--steps`` after warm-up;
* whether the two give the same loss (``float.hex``) at every step and the same final weights.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STAGE_IMPORTS = ("crucible.trainer.pretrain", "torch.distributed.checkpoint", "torch.distributed.checkpoint.state_dict",
                 "safetensors.torch", "crucible.trainer.model", "crucible.trainer.checkpoint",
                 "crucible.trainer.output", "crucible.trainer.llama")
TRANSFORMERS = ("transformers", "transformers.models.llama.modeling_llama")


def import_cost(modules: tuple[str, ...], repeats: int) -> dict[str, float]:
    probe = ("import importlib, resource, sys, time; t = time.perf_counter(); "
             "[importlib.import_module(m) for m in sys.argv[1:]]; "
             "r = resource.getrusage(resource.RUSAGE_SELF); "
             "print(time.perf_counter() - t, r.ru_utime + r.ru_stime)")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "operator"), str(REPO / "trainer"),
                                                        os.environ.get("PYTHONPATH", "")])}
    runs = []
    for _ in range(repeats):
        out = subprocess.run([sys.executable, "-c", probe, *modules], capture_output=True, text=True, env=env,
                             check=True, timeout=600)
        wall, cpu = map(float, out.stdout.split()[-2:])
        runs.append((wall, cpu))
    wall, cpu = min(runs)
    return {"wallSeconds": round(wall, 2), "cpuSeconds": round(cpu, 2)}


def step_times(device: str, steps: int, hidden: int, layers: int, seq: int, batch: int) -> dict[str, object]:
    import torch
    from transformers import LlamaForCausalLM

    sys.path[:0] = [str(REPO / "trainer")]
    from crucible.trainer.config.training import ModelConfig
    from crucible.trainer.llama import LlamaForCausalLM as Ours
    from crucible.trainer.model import llama_config, llama_settings

    cfg = ModelConfig.model_validate({"hiddenSize": hidden, "numLayers": layers, "numHeads": max(1, hidden // 64),
                                      "maxPositionEmbeddings": max(seq, 2048)})
    vocab = 32000
    results: dict[str, object] = {}
    losses: dict[str, list[str]] = {}
    finals: dict[str, dict[str, torch.Tensor]] = {}
    models, opts, gens, times = {}, {}, {}, {}
    for name in ("ours", "transformers"):  # the same seed: the same initial weights
        torch.manual_seed(0)
        models[name] = (Ours(llama_settings(cfg, vocab, 0)) if name == "ours"
                        else LlamaForCausalLM(llama_config(cfg, vocab, 0))).to(device)
        opts[name] = torch.optim.AdamW(models[name].parameters(), lr=1e-4)
        gens[name] = torch.Generator().manual_seed(1)
        times[name], losses[name] = [], []
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    for step in range(steps + 3):  # interleaved, alternating who goes first: neither gets a warmer machine
        for name in (("ours", "transformers") if step % 2 else ("transformers", "ours")):
            model, opt = models[name], opts[name]
            ids = torch.randint(0, vocab, (batch, seq), generator=gens[name]).to(device)
            if device == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            with torch.autocast(device, dtype=dtype, enabled=device == "cuda"):
                loss = model(input_ids=ids, labels=ids, use_cache=False).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if device == "cuda":
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - t)
            losses[name].append(loss.item().hex())
    for name in ("ours", "transformers"):
        finals[name] = {k: v.detach().cpu() for k, v in models[name].state_dict().items()}
        results[name] = {"medianStepSeconds": round(statistics.median(times[name][3:]), 4)}
    results["lossesEqual"] = losses["ours"] == losses["transformers"]
    results["weightsEqual"] = all(torch.equal(finals["ours"][k], finals["transformers"][k]) for k in finals["ours"])
    ours_s = results["ours"]["medianStepSeconds"]  # type: ignore[index]
    theirs_s = results["transformers"]["medianStepSeconds"]  # type: ignore[index]
    results["stepTimeRatio"] = round(ours_s / theirs_s, 3)
    results["shape"] = {"hidden": hidden, "layers": layers, "seq": seq, "batch": batch, "vocab": vocab,
                        "device": device}
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    load = os.getloadavg()[0]
    ours = import_cost(STAGE_IMPORTS, args.repeats)
    theirs = import_cost(STAGE_IMPORTS + TRANSFORMERS, args.repeats)
    print(f"start-up imports (best of {args.repeats} fresh interpreters, load {load:.1f}):")
    print(f"  ours          {ours['wallSeconds']:6.2f} s wall {ours['cpuSeconds']:6.2f} s CPU")
    print(f"  +transformers {theirs['wallSeconds']:6.2f} s wall {theirs['cpuSeconds']:6.2f} s CPU"
          f"   ratio ours/transformers {ours['cpuSeconds'] / theirs['cpuSeconds']:.2f} (CPU)")
    steps = step_times(args.device, args.steps, args.hidden, args.layers, args.seq, args.batch)
    print(f"training step ({steps['shape']}), median of {args.steps}:")
    print(f"  ours          {steps['ours']['medianStepSeconds']:.4f} s")  # type: ignore[index]
    print(f"  transformers  {steps['transformers']['medianStepSeconds']:.4f} s"  # type: ignore[index]
          f"   ratio {steps['stepTimeRatio']}")
    print(f"  losses equal at every step: {steps['lossesEqual']}; final weights equal: {steps['weightsEqual']}")
    figures = {"imports": {"ours": ours, "withTransformers": theirs}, "steps": steps, "loadAverage": load,
               "maxRssMiB": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    return 0 if steps["lossesEqual"] and steps["weightsEqual"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
