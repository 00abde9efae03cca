"""CPU: bytes that autograd saves for backward, per token per block, broken down by op (issue 8).

    python benchmarks/activation_memory.py                       # ours GSA / ours attention / FLA GSA, ~10 min
    python benchmarks/activation_memory.py --configs gsa --modes bf16 --variants fused

Every tensor that autograd packs for backward during one forward pass (model + loss) goes through a
`torch.autograd.graph.saved_tensors_hooks` pack hook. Storages are counted once (by untyped storage address: views
and re-saves of one tensor cost nothing extra); parameters, and storages that are not activations (autocast's
bf16 copies of the weights, the loss's weight gradient), are constants per step and drop out of the per-token
figure, which is the slope between two sequence lengths: (bytes(T2) - bytes(T1)) / (tokens(T2) - tokens(T1)).
Each storage is charged to the first op that saved it: the innermost project source line on the Python stack,
the torch function or autograd.Function running there, and the module it ran in.

Configs (d 2048, 4 heads, 64 slots, vocab 32000 by default: the 1.3B layer, 2 layers):
  gsa        ours, GSA layers. The operator runs its Triton kernels (what the GPU runs; on CPU through the
             Triton interpreter) unless --operator torch (the CPU path, which keeps float32 copies).
  attention  ours, softmax attention (the transformer-1.3b twin: 16 heads).
  fla        FLA 0.6.0's GSAForCausalLM, bf16 weights, its defaults (fused norm, fused SwiGLU, fused CE). On CPU
             its kernels run in the Triton interpreter with three stand-ins, none of which changes what is saved:
             autotuning picks the first config without timing; `chunk_fwd_h` (the chunk-state kernel, which the
             interpreter cannot run: `i_t.to(...)` on a Python int) returns zeros of its true shape and dtype
             (FLA's default checkpoint_level=2 drops those states before saving anyway); the fused cross-entropy
             skips its CUDA-only assertion.
Modes: bf16 = bf16 weights, no autocast (benchmarks/bench_train.py); autocast = float32 weights under
torch.autocast(bfloat16) (the trainer).
Variants of ours: fused (the model as it runs) and plain (the same model through the plain PyTorch
compositions that the fused autograd Functions replace: gsa.layers.fused.use_fused(False)).
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import json
import os
import re
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

from torch.overrides import TorchFunctionMode  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PROJECT_DIRS = (str(ROOT / "src" / "gsa"), os.sep + "fla" + os.sep)
SKIP_DIRS = (os.sep + "torch" + os.sep, os.sep + "triton" + os.sep, os.sep + "transformers" + os.sep)


# ----------------------------------------------------------------------------------------------------- counting


class _CurrentTorchFunction(TorchFunctionMode):
    """Keeps the name of the torch function being run (the op that packs a saved tensor runs inside it)."""

    def __init__(self):
        super().__init__()
        self.stack: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.stack.append(getattr(func, "__name__", str(func)))
        try:
            return func(*args, **(kwargs or {}))
        finally:
            self.stack.pop()


class SavedTensorCounter:
    """Records every storage that autograd saves during a forward pass, with who saved it."""

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.names = {m: n for n, m in model.named_modules()}
        self.param_storages = {p.untyped_storage().data_ptr() for p in model.parameters()}
        self.module_stack: list[str] = []
        self.records: list[dict] = []
        self.seen: dict[int, dict] = {}
        self.keep: list[torch.Tensor] = []  # saved tensors stay alive, so addresses are not reused
        self.functions = _CurrentTorchFunction()

    def _who(self):
        """(location, op) of the innermost project frame, and the autograd.Function applying, if any."""
        frame = inspect.currentframe().f_back.f_back
        location = function = None
        while frame is not None:
            filename = frame.f_code.co_filename
            if function is None and frame.f_code.co_name == "apply":
                cls = frame.f_locals.get("cls")
                if isinstance(cls, type) and issubclass(cls, torch.autograd.Function):
                    function = cls.__name__
            hook = frame.f_code.co_name in ("pack", "<lambda>") and filename.endswith("fused.py")  # hooks in hooks
            if location is None and not hook and any(d in filename for d in PROJECT_DIRS) and not any(
                d in filename for d in SKIP_DIRS
            ):
                line = inspect.getframeinfo(frame, context=1)
                code = (line.code_context or [""])[0].strip()
                location = f"{_short_path(filename)}:{frame.f_lineno} {code[:70]}"
                break
            frame = frame.f_back
        op = function or (self.functions.stack[-1] if self.functions.stack else "?")
        return location or "?", op

    def pack(self, t: torch.Tensor):
        storage = t.untyped_storage()
        key = storage.data_ptr()
        if storage.nbytes() == 0 or key in self.seen:
            return t
        location, op = self._who()
        module = self.module_stack[-1] if self.module_stack else ""
        if key in self.param_storages:
            kind = "parameter"
        else:
            kind = "saved"
        record = dict(
            module=module, location=location, op=op, kind=kind, bytes=storage.nbytes(), dtype=str(t.dtype),
            shape=list(t.shape),
        )
        self.seen[key] = record
        self.records.append(record)
        self.keep.append(t)
        return t

    @contextlib.contextmanager
    def counting(self):
        # The module stack comes from a wrapper around Module.__call__, not from forward hooks: with any forward hook
        # registered the layers run their plain compositions (gsa.layers.fused.must_call: hooks must be called),
        # which is not what a model runs.
        original = torch.nn.Module.__call__

        def call(module, *args, **kwargs):
            self.module_stack.append(self.names.get(module, type(module).__name__))
            try:
                return original(module, *args, **kwargs)
            finally:
                self.module_stack.pop()

        torch.nn.Module.__call__ = call
        try:
            with self.functions, torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t):
                yield self
        finally:
            torch.nn.Module.__call__ = original


def _short_path(filename: str) -> str:
    for marker in (os.sep + "src" + os.sep, os.sep + "site-packages" + os.sep, os.sep + "benchmarks" + os.sep):
        if marker in filename:
            return filename.split(marker, 1)[1]
    return os.path.basename(filename)


def _block_of(module: str) -> int | None:
    match = re.search(r"(?:^|\.)layers\.(\d+)(?:\.|$)", module)
    return int(match.group(1)) if match else None


def _generic(module: str) -> str:
    return re.sub(r"(^|\.)layers\.\d+(\.|$)", r"\1layers.*\2", module)


# ------------------------------------------------------------------------------------------------------- models


def _ours(config: str, args):
    from gsa.models import GSAForCausalLM, preset_config

    name = "gsa-1.3b" if config == "gsa" else "transformer-1.3b"
    overrides = dict(hidden_size=args.hidden, num_hidden_layers=args.layers, num_heads=args.heads,
                     num_slots=args.slots, vocab_size=args.vocab)
    if config == "attention":
        overrides.pop("num_heads")
        overrides["attn"] = {"layers": list(range(args.layers)), "num_heads": args.attn_heads, "rope_theta": 10000.0}
    return GSAForCausalLM(preset_config(name, **overrides))


def _use_triton_operator_on_cpu():
    """Make the GSA layer call the Triton kernels on any device (the interpreter on CPU), as the GPU does."""
    import gsa.layers.gsa as layer
    from gsa.ops.triton import chunk_gsa_triton

    def operator(q, k, v, s, g, scale=None, initial_state=None, output_final_state=False, cu_seqlens=None, **_):
        scale = q.shape[-1] ** -0.5 if scale is None else scale
        with torch.autocast(q.device.type, enabled=False):
            return chunk_gsa_triton(q, k, v, s, g, scale, initial_state, output_final_state, cu_seqlens)

    layer.gated_slot_attention = operator


def _fla(args):
    import triton.runtime.autotuner as autotuner

    if os.environ.get("TRITON_INTERPRET") == "1":
        # no GPU to time configs on: take the first one (saves the same tensors whichever config runs)
        autotuner.Autotuner._bench = lambda self, *a, config=None, **k: [0.0, 0.0, 0.0]
        import fla.ops.gla.chunk as gla_chunk
        import fla.ops.gsa.chunk_fwd as gsa_chunk_fwd

        def chunk_fwd_h(k, v, g=None, g_gamma=None, gk=None, gv=None, h0=None, output_final_state=False,
                        state_v_first=False, cu_seqlens=None, chunk_size=64, split_size=None, states_in_fp32=False):
            B, T, H, K, V = *k.shape, v.shape[-1]
            chunks = -(-T // (split_size or chunk_size))
            shape = (V, K) if state_v_first else (K, V)
            h = k.new_zeros(B, chunks, H, *shape, dtype=torch.float if states_in_fp32 else k.dtype)
            ht = k.new_zeros(B, H, *shape, dtype=torch.float) if output_final_state else None
            return h, ht

        gla_chunk.chunk_fwd_h = gsa_chunk_fwd.chunk_fwd_h = chunk_fwd_h

        import fla.modules.fused_cross_entropy.ops as ce

        def forward(self, input, target):
            loss, _ = ce.cross_entropy_loss(logits=input, target=target, label_smoothing=self.label_smoothing,
                                            logit_scale=self.logit_scale, lse_square_scale=self.lse_square_scale,
                                            logit_softcapping=self.logit_softcapping, ignore_index=self.ignore_index,
                                            inplace_backward=self.inplace_backward, process_group=self.process_group)
            return loss.sum() / (target != self.ignore_index).sum()

        ce.FusedCrossEntropyLoss.forward = forward
    from fla.models import GSAConfig, GSAForCausalLM

    return GSAForCausalLM(GSAConfig(hidden_size=args.hidden, num_hidden_layers=args.layers, num_heads=args.heads,
                                    num_slots=args.slots, vocab_size=args.vocab))


def count_saved(model, mode: str, T: int, vocab: int, B: int = 1):
    """Records of one forward (with loss) at [B, T]."""
    torch.manual_seed(0)
    ids = torch.randint(0, vocab, (B, T))
    counter = SavedTensorCounter(model)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if mode == "autocast" else contextlib.nullcontext()
    with counter.counting(), autocast:
        loss = model(input_ids=ids, labels=ids).loss
    assert torch.isfinite(loss), loss
    return counter.records


def summarize(runs: dict[int, list[dict]], layers: int, B: int = 1) -> dict:
    """Per-token slopes between the two lengths, per block (averaged over blocks) and outside blocks."""
    (t1, r1), (t2, r2) = sorted(runs.items())
    tokens = B * (t2 - t1)

    def grouped(records):
        out = defaultdict(lambda: dict(bytes=0))
        for r in records:
            if r["kind"] != "saved":
                continue
            block = _block_of(r["module"])
            key = ("block" if block is not None else "outside", _generic(r["module"]), r["op"], r["location"],
                   r["dtype"])
            out[key]["bytes"] += r["bytes"]
            out[key].update(dtype=r["dtype"], shape=r["shape"])
        return out

    g1, g2 = grouped(r1), grouped(r2)
    rows = []
    for key in sorted(set(g1) | set(g2), key=lambda k: (k[0], list(g2).index(k) if k in g2 else 0)):
        diff = g2.get(key, {}).get("bytes", 0) - g1.get(key, {}).get("bytes", 0)
        per_token = diff / tokens / (layers if key[0] == "block" else 1)
        fixed = g1.get(key, {}).get("bytes", 0) - per_token * B * t1 * (layers if key[0] == "block" else 1)
        info = g2.get(key, g1.get(key))
        rows.append(dict(where=key[0], module=key[1], op=key[2], location=key[3], bytes_per_token=per_token,
                         fixed_bytes=fixed, dtype=key[4], shape_at_T2=info["shape"]))
    block = sum(r["bytes_per_token"] for r in rows if r["where"] == "block")
    outside = sum(r["bytes_per_token"] for r in rows if r["where"] == "outside")
    fixed = sum(r["fixed_bytes"] for r in rows)
    return dict(tokens=[B * t1, B * t2], bytes_per_token_per_block=block, bytes_per_token_outside_blocks=outside,
                fixed_bytes=fixed, rows=rows)


def measure(config: str, mode: str, variant: str, args) -> dict:
    torch.manual_seed(0)
    if config == "fla":
        model = _fla(args)
        lengths = args.fla_lengths
    else:
        model = _ours(config, args)
        lengths = args.lengths
    if mode == "bf16":
        model = model.to(torch.bfloat16)
    model.train()
    context = contextlib.nullcontext()
    if config != "fla":
        try:
            from gsa.layers import fused
        except ImportError:  # a checkout before the fused layers: the model as it is
            fused = None
        if fused is not None:
            context = fused.use_fused(variant == "fused")
    runs = {}
    start = time.perf_counter()
    with context:
        for T in lengths:
            runs[T] = count_saved(model, mode, T, args.vocab)
    result = summarize(runs, args.layers)
    result["seconds"] = time.perf_counter() - start
    return result


# -------------------------------------------------------------------------------------------------------- report


def print_breakdown(name: str, result: dict, top: int):
    print(f"\n{name}: {result['bytes_per_token_per_block']:.0f} B/token/block "
          f"(outside blocks {result['bytes_per_token_outside_blocks']:.0f} B/token, "
          f"constants {result['fixed_bytes'] / 2**20:.0f} MiB)")
    rows = sorted((r for r in result["rows"] if r["where"] == "block" and abs(r["bytes_per_token"]) > 0.5),
                  key=lambda r: -r["bytes_per_token"])
    for r in rows[:top]:
        print(f"  {r['bytes_per_token']:>8.0f}  {r['dtype'].replace('torch.', ''):>8}  {r['op'][:26]:<26} "
              f"{r['module'][:30]:<30} {r['location'][:80]}")
    rows = sorted((r for r in result["rows"] if r["where"] == "outside" and abs(r["bytes_per_token"]) > 0.5),
                  key=lambda r: -r["bytes_per_token"])
    for r in rows[:top]:
        print(f"  {r['bytes_per_token']:>8.0f}  {r['dtype'].replace('torch.', ''):>8}  {r['op'][:26]:<26} "
              f"{'(outside) ' + r['module'][:20]:<30} {r['location'][:80]}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="*", default=["gsa", "attention", "fla"])
    parser.add_argument("--modes", nargs="*", default=["bf16", "autocast"])
    parser.add_argument("--variants", nargs="*", default=["plain", "fused"])
    parser.add_argument("--operator", choices=["triton", "torch"], default="triton")
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--attn-heads", type=int, default=16)
    parser.add_argument("--slots", type=int, default=64)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--lengths", nargs=2, type=int, default=[256, 512], help="two sequence lengths (B = 1)")
    parser.add_argument("--fla-lengths", nargs=2, type=int, default=[128, 256],
                        help="FLA: > 64 (shorter inputs take its recurrent path), small: its kernels are interpreted")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "activation_memory_cpu.json"))
    args = parser.parse_args()
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    if args.operator == "triton":
        _use_triton_operator_on_cpu()

    results = dict(torch=torch.__version__, args=vars(args), runs={})
    for config in args.configs:
        for mode in args.modes if config != "fla" else ["bf16"]:
            for variant in args.variants if config != "fla" else ["fla"]:
                key = f"{config}/{mode}/{variant}"
                try:
                    results["runs"][key] = measure(config, mode, variant, args)
                except Exception as error:  # report and go on: one config failing should not lose the others
                    results["runs"][key] = dict(error=f"{type(error).__name__}: {error}")
                    print(f"{key}: {results['runs'][key]['error']}", file=sys.stderr)
                    continue
                print_breakdown(key, results["runs"][key], args.top)
                sys.stdout.flush()

    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1))
    d = args.hidden
    print(f"\nSaved for backward, bytes per token per block (d {d}, {args.layers} layers, B 1, T {args.lengths}; "
          f"FLA T {args.fla_lengths}):")
    print(f"{'config':<12} {'mode':<9} {'plain':>9} {'fused':>9} {'FLA':>9}")
    fla = results["runs"].get("fla/bf16/fla", {}).get("bytes_per_token_per_block")
    for config in [c for c in args.configs if c != "fla"]:
        for mode in args.modes:
            cells = []
            for variant in ("plain", "fused"):
                r = results["runs"].get(f"{config}/{mode}/{variant}", {})
                value = r.get("bytes_per_token_per_block")
                cells.append(f"{value:>9.0f}" if value is not None else f"{'-':>9}")
            f = f"{fla:>9.0f}" if (fla is not None and config == "gsa" and mode == "bf16") else f"{'-':>9}"
            print(f"{config:<12} {mode:<9} {cells[0]} {cells[1]} {f}")
    print(f"(written to {args.out})")


if __name__ == "__main__":
    main()
