"""`gsa eval ppl | mqar | harness | recall`: each writes JSON (and PNG plots) and prints a readable table."""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

from ..data.corpora import BUNDLED_CORPORA


def _write_json(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, default=str) + "\n", encoding="utf-8")


def _environment(device) -> dict:
    return {"device": str(device), "torch": torch.__version__, "python": platform.python_version()}


def _model_arguments(parser: argparse.ArgumentParser, several: bool = False) -> None:
    if several:
        parser.add_argument("--model", action="append", required=True, metavar="DIR",
                            help="model folder (GSA or any transformers causal LM); repeat to compare models")
        parser.add_argument("--tokenizer", action="append", metavar="TOK",
                            help="bytes, mistral, a SentencePiece .model file or a tokenizer folder: once for all "
                                 "models or once per --model (default: the tokenizer saved in each model folder)")
        parser.add_argument("--label", action="append", help="a name per --model for tables and plots")
    else:
        parser.add_argument("--model", required=True, metavar="DIR",
                            help="model folder (GSA or any transformers causal LM)")
        parser.add_argument("--tokenizer", metavar="TOK",
                            help="bytes, mistral, a SentencePiece .model file or a tokenizer folder (default: the "
                                 "tokenizer saved in the model folder)")
    parser.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda, cuda:1, ...")
    parser.add_argument("--dtype", default="auto",
                        help="auto (bfloat16 on CUDA, float32 on CPU), float32, bfloat16, ...")
    parser.add_argument("--batch-size", type=int, default=8, help="sequences per forward pass")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="eval_command", metavar="<evaluation>")

    ppl = sub.add_parser("ppl", help="perplexity and bits per byte on text files or a bundled corpus")
    _model_arguments(ppl)
    source = ppl.add_mutually_exclusive_group(required=True)
    source.add_argument("--corpus", help=f"a bundled corpus by name: {', '.join(BUNDLED_CORPORA)}")
    source.add_argument("--files", nargs="+", metavar="FILE",
                        help="UTF-8 text files (one document each), JSON-lines files (one document a line, field "
                             "'text'), folders of those or glob patterns, read as gsa train --data reads them")
    ppl.add_argument("--max-length", type=int, default=2048, help="tokens a window reads (default 2048)")
    ppl.add_argument("--stride", type=int, help="tokens each later window predicts (default: max-length, disjoint)")
    ppl.add_argument("--max-documents", type=int, help="evaluate only the first N documents")
    ppl.add_argument("--max-chars", type=int, help="cut every document to its first N characters")
    ppl.add_argument("--output", type=Path, help="write the result (with per-document numbers) to this JSON file")
    ppl.set_defaults(eval_run=_run_ppl)

    mqar = sub.add_parser("mqar", help="train and test small models on MQAR (the paper's Fig. 3a)")
    mqar.add_argument("--profile", default="cpu", help="gpu (the paper's task: 16 runs, 300 s of training; about "
                      "7 min on one H200 with --workers 8, estimated), cpu (a small task; about 4.5 min on 2 cores "
                      "with --workers 2) or smoke (seconds); flags below override it")
    mqar.add_argument("--models", nargs="+", help="gsa, attention, fla-gsa, fla-gla (default: the profile's, plus "
                      "fla-gsa and fla-gla when flash-linear-attention and a GPU are there)")
    mqar.add_argument("--widths", nargs="+", type=int, help="model widths (hidden sizes)")
    mqar.add_argument("--lrs", nargs="+", type=float, help="learning rates to sweep")
    mqar.add_argument("--seeds", nargs="+", type=int, help="training seeds")
    mqar.add_argument("--steps", type=int, help="training steps per run (at most: runs stop at --stop-accuracy, "
                      "and a time budget can plan fewer)")
    mqar.add_argument("--batch-size", type=int, help="training examples per step")
    mqar.add_argument("--seq-len", type=int, help="tokens per example")
    mqar.add_argument("--num-pairs", type=int, help="key-value pairs per example")
    mqar.add_argument("--vocab-size", type=int, help="vocabulary: keys from the lower half, values from the upper")
    mqar.add_argument("--mixture-levels", type=int, help="train on the target and its copies with seq_len and "
                      "num_pairs halved, this many sizes in all, in turn (Zoology's mixed sizes; default 4; 1 = the "
                      "target only)")
    mqar.add_argument("--test-examples", type=int, help="examples in the fixed test set")
    mqar.add_argument("--stop-accuracy", type=float, help="stop a run once validation accuracy reaches this")
    mqar.add_argument("--time-budget", type=float, help="training seconds for the whole sweep, shared out over the "
                      "runs, --workers at a time; each run warms up outside its share, times a few steps and plans "
                      "its steps (and learning-rate schedule) to fit in it; gpu and cpu profiles: 300")
    mqar.add_argument("--gsa-head-dim", type=int, help="head width of GSA (and FLA) models: heads = width // this "
                      "(default 64)")
    mqar.add_argument("--no-short-conv", action="store_true", help="GSA without the short causal conv on q/k/v")
    mqar.add_argument("--gsa-gate-damping", type=float, help="τ of GSA's slot gates, alpha = sigmoid(f)^(1/τ) "
                      "(default 8, the paper's; larger forgets more slowly at initialisation)")
    mqar.add_argument("--gsa-conv-init-std", type=float, help="draw our GSA's short-convolution weights from "
                      "N(0, this), as FLA does with 0.02 (default: PyTorch's Conv1d initialisation)")
    mqar.add_argument("--gsa-backend", choices=("auto", "torch", "triton"), help="operator backend of our GSA layers")
    mqar.add_argument("--no-cuda-graphs", action="store_true",
                      help="train with eager steps on CUDA (default: each step replayed from a CUDA graph)")
    mqar.add_argument("--workers", type=int, default=1,
                      help="processes training runs side by side (one GPU: 8); with several GPUs visible and "
                      "--device auto or cuda, spread over them (one run per GPU: --workers = their number)")
    mqar.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda, ...")
    mqar.add_argument("--output-dir", type=Path, default=Path("results/mqar"),
                      help="where mqar.json, mqar.md (the table) and mqar.png go")
    mqar.add_argument("--sitting-seconds", type=float, help="runs longer than one command: each run trains its "
                      "--steps schedule for at most this many seconds, then saves its state under OUTPUT_DIR/"
                      "checkpoints; the same command again continues every run (no --time-budget with it)")
    mqar.add_argument("--merge", nargs="+", type=Path, metavar="FILE",
                      help="train nothing: one table and plot of the runs in these mqar.json / mqar.runs.jsonl files "
                      "(a sweep split over GPUs or calls), which must be of the task the flags describe")
    mqar.set_defaults(eval_run=_run_mqar)

    harness = sub.add_parser("harness", help="lm-evaluation-harness tasks (offline: gsa_offline, ruler_vt)")
    _model_arguments(harness)
    harness.add_argument("--tasks", required=True, help="comma-separated lm-eval tasks; offline: gsa_offline (all "
                         "three), gsa_shakespeare_ppl, gsa_shakespeare_cloze, gsa_shakespeare_next_line, ruler_vt")
    harness.add_argument("--limit", type=float, help="examples per task (an integer) or a fraction below 1")
    harness.add_argument("--num-fewshot", type=int, help="few-shot examples (default: each task's own)")
    harness.add_argument("--max-length", type=int, help="tokens the model reads at once (default 2048 for GSA)")
    harness.add_argument("--add-bos-token", action="store_true", help="start every context with BOS")
    harness.add_argument("--data-dir", type=Path, help="where offline task data is built (default $GSA_EVAL_DATA "
                         "or ~/.cache/gsa/eval)")
    harness.add_argument("--ruler-lengths", nargs="+", type=int, default=[1024],
                         help="prompt lengths (tokens) of RULER tasks (ruler_vt needs about 960 or more with a "
                              "32k-50k subword vocabulary; a shorter one is refused with the minimum)")
    harness.add_argument("--bootstrap-iters", type=int, default=0, help="bootstrap resamples for standard errors")
    harness.add_argument("--output", type=Path, help="write lm-eval's results to this JSON file")
    harness.set_defaults(eval_run=_run_harness)

    recall = sub.add_parser("recall", help="phonebook look-up and needle-in-a-haystack at growing lengths")
    _model_arguments(recall, several=True)
    recall.add_argument("--tasks", nargs="+", default=["phonebook", "needle"], help="phonebook and/or needle")
    recall.add_argument("--lengths", nargs="+", type=int, default=[256, 512, 1024, 2048],
                        help="prompt lengths (tokens)")
    recall.add_argument("--examples", type=int, default=20, help="examples per length (needle: per length and depth)")
    recall.add_argument("--depths", nargs="+", type=float, default=[0.0, 0.25, 0.5, 0.75, 1.0], help="needle depths")
    recall.add_argument("--seed", type=int, default=0)
    recall.add_argument("--output-dir", type=Path, default=Path("results/recall"), help="where recall.json and PNGs go")
    recall.set_defaults(eval_run=_run_recall)


def run(args: argparse.Namespace) -> int:
    """Run the chosen evaluation; bad input (a ValueError, naming what is wrong) is one line on stderr, exit 2."""
    if getattr(args, "eval_command", None) is None:
        print("usage: gsa eval {ppl,mqar,harness,recall} ... (gsa eval <evaluation> --help for its options)")
        return 2
    try:
        return args.eval_run(args)
    except ValueError as error:
        print(f"gsa eval {args.eval_command}: error: {error}", file=sys.stderr)
        return 2


def _run_ppl(args) -> int:
    from itertools import islice

    from ..data import Corpus
    from .loading import load_causal_lm, model_tokenizer
    from .perplexity import evaluate_perplexity

    if args.corpus is not None and args.corpus not in BUNDLED_CORPORA:
        raise ValueError(f"unknown corpus {args.corpus!r}; expected one of {', '.join(BUNDLED_CORPORA)}")
    corpus = Corpus((args.corpus,) if args.corpus else tuple(args.files))  # checks every path before the model loads
    tokenizer = model_tokenizer(args.model, args.tokenizer)
    model = load_causal_lm(args.model, args.device, args.dtype)
    documents = corpus.documents()
    if args.max_documents is not None:
        documents = islice(documents, args.max_documents)
    if args.max_chars is not None:
        documents = ((name, text[: args.max_chars]) for name, text in documents)
    started = time.perf_counter()
    result = evaluate_perplexity(
        model, tokenizer, documents, args.max_length, args.stride, args.batch_size, progress=True
    )
    seconds = time.perf_counter() - started
    print(
        f"perplexity {result['perplexity']:.4f} | bits/byte {result['bits_per_byte']:.4f} | "
        f"nll/token {result['nll_per_token']:.4f} | {result['tokens']} tokens, {result['bytes']} bytes, "
        f"{result['documents']} documents, {result['windows']} windows of <= {result['max_length']} "
        f"(stride {result['stride']}) | {seconds:.1f} s"
    )
    if args.output:
        source = {"corpus": args.corpus} if args.corpus else {"files": args.files}
        _write_json(args.output, {"model": args.model, **source, **result, "seconds": round(seconds, 2),
                                  "environment": _environment(next(model.parameters()).device)})
        print(f"wrote {args.output}")
    return 0


def _run_mqar(args) -> int:
    from .loading import resolve_device
    from .mqar import training_mixture
    from .mqar_sweep import PROFILES, default_models, load_runs, run_sweep, with_overrides

    if args.profile not in PROFILES:
        raise ValueError(f"unknown MQAR profile {args.profile!r}; expected one of {', '.join(PROFILES)}")
    overrides = {
        "models": tuple(args.models) if args.models else None,
        "widths": tuple(args.widths) if args.widths else None,
        "lrs": tuple(args.lrs) if args.lrs else None,
        "seeds": tuple(args.seeds) if args.seeds else None,
        "steps": args.steps, "batch_size": args.batch_size, "seq_len": args.seq_len, "num_pairs": args.num_pairs,
        "vocab_size": args.vocab_size, "mixture_levels": args.mixture_levels, "test_examples": args.test_examples,
        "stop_accuracy": args.stop_accuracy,
        "gsa_head_dim": args.gsa_head_dim, "gsa_backend": args.gsa_backend,
        "short_conv": False if args.no_short_conv else None, "gate_damping": args.gsa_gate_damping,
        "conv_init_std": args.gsa_conv_init_std,
        "time_budget_seconds": args.time_budget, "cuda_graphs": False if args.no_cuda_graphs else None,
    }
    if args.models is None and args.profile != "smoke":
        overrides["models"] = tuple(dict.fromkeys([*PROFILES[args.profile].models, *default_models()]))
    sweep = with_overrides(PROFILES[args.profile], **{k: v for k, v in overrides.items() if v is not None})
    if args.sitting_seconds is not None:
        if args.time_budget is not None:
            raise ValueError("--sitting-seconds follows the --steps schedule in sittings; --time-budget plans a "
                             "schedule to fit one sitting: give one of them")
        sweep = with_overrides(sweep, time_budget_seconds=None, sitting_seconds=args.sitting_seconds,
                               checkpoint_dir=str(args.output_dir / "checkpoints"))
    if args.merge:
        results = load_runs(args.merge, sweep.task)
        merged = with_overrides(sweep, models=tuple(dict.fromkeys(r["model"] for r in results)),
                                widths=tuple(sorted({r["width"] for r in results})),
                                lrs=tuple(sorted({r["lr"] for r in results})),
                                seeds=tuple(sorted({r["seed"] for r in results})))
        _write_mqar_report(merged, results, None, args, None)
        return 0
    device = resolve_device(args.device)
    runs = sweep.runs()
    cap = sweep.train_settings(args.workers).max_train_seconds
    sizes = ", ".join(f"{t.seq_len}/{t.num_pairs}" for t in training_mixture(sweep.task, sweep.train.mixture_levels))
    print(
        f"MQAR: seq {sweep.task.seq_len}, {sweep.task.num_pairs} pairs, vocab {sweep.task.vocab_size}; "
        f"{len(runs)} runs (models {', '.join(sweep.models)}; widths {list(sweep.widths)}; lrs {list(sweep.lrs)}; "
        f"seeds {list(sweep.seeds)}); <= {sweep.train.steps} steps of {sweep.train.batch_size}"
        + (f" or {cap:.0f} s" if cap else "")
        + (f", in sittings of {args.sitting_seconds:g} s" if args.sitting_seconds else "")
        + f" per run, trained on seq/pairs {sizes} in turn; {device}, {args.workers} worker(s)",
        flush=True,
    )
    started = time.perf_counter()
    done = []
    args.output_dir.mkdir(parents=True, exist_ok=True)
    partial = args.output_dir / "mqar.runs.jsonl"  # every finished run at once: a sweep cut short keeps them
    partial.write_text("", encoding="utf-8")

    def report(result: dict) -> None:
        done.append(result)
        with partial.open("a", encoding="utf-8") as out:
            out.write(json.dumps(result) + "\n")
        if result.get("error"):
            print(f"[{len(done)}/{len(runs)}] {result['model']} d={result['width']} lr={result['lr']:.0e} "
                  f"seed={result['seed']} FAILED: {result['error']}", flush=True)
            return
        print(
            f"[{len(done)}/{len(runs)} {time.perf_counter() - started:6.0f}s] {result['model']:>9} "
            f"d={result['width']:<4} "
            f"lr={result['lr']:.0e} seed={result['seed']}: accuracy {100 * result['accuracy']:5.1f}% after "
            f"{result['steps']}/{result['planned_steps']} steps ({result['train_seconds']:.0f} s, "
            f"{result['steps_per_second'] or 0:.1f} steps/s; warm-up {result['warmup_seconds']:.0f} s; "
            f"stopped: {result['stopped']})",
            flush=True,
        )

    results = run_sweep(sweep, device, args.workers, report)
    unfinished = _write_mqar_report(sweep, results, time.perf_counter() - started, args, device)
    if unfinished:
        print(f"{len(unfinished)} of {len(results)} runs stopped at the end of their sitting; the same command again "
              f"continues them from {args.output_dir / 'checkpoints'}")
    return 0


def _write_mqar_report(sweep, results: list[dict], seconds: float | None, args, device) -> list[dict]:
    """Print the table; write mqar.json (settings, summary, every run), mqar.md (the table) and mqar.png. Returns
    the runs their sitting stopped before the end."""
    from dataclasses import asdict

    from .mqar_sweep import PAPER_ACCURACY, is_paper_setting, plot_accuracy_by_width, report_text, summarize

    summary = summarize(results)
    order = {model: i for i, model in enumerate(sweep.models)}  # the order asked for, each kind's variants after it

    def position(label: str) -> tuple[int, bool, str]:
        kind = label.split(" (")[0]
        return order.get(kind, len(order)), label != kind, label

    summary = dict(sorted(summary.items(), key=lambda item: position(item[0])))
    paper_setting = is_paper_setting(sweep.task)
    report = report_text(sweep, summary, seconds)
    unfinished = [r for r in results if r.get("stopped") == "sitting"]
    if unfinished:  # their accuracy in the table is the one they had reached
        report += "\nNot finished yet (accuracy so far): " + "; ".join(
            f"{r['model']} d={r['width']} lr={r['lr']:g} seed={r['seed']} at step {r['steps']} of {r['planned_steps']}"
            for r in unfinished) + "\n"
    print("\n" + report)
    paths = [args.output_dir / name for name in ("mqar.json", "mqar.md", "mqar.png")]
    args.output_dir.mkdir(parents=True, exist_ok=True)
    if args.merge:  # the runs' own settings are in each run's record; the profile's would not be theirs
        sweep_record = {"task": sweep.task.as_dict(), "models": list(sweep.models), "widths": list(sweep.widths),
                        "lrs": list(sweep.lrs), "seeds": list(sweep.seeds), "merged_from": [str(p) for p in args.merge]}
    else:
        sweep_record = {**sweep.as_dict(), "workers": args.workers,
                        "train_per_run": asdict(sweep.train_settings(args.workers))}
    _write_json(paths[0], {"sweep": sweep_record, "summary": summary,
                           "paper": PAPER_ACCURACY if paper_setting else None, "runs": results,
                           "seconds": round(seconds, 1) if seconds is not None else None,
                           "environment": _environment(device) if device is not None else None})
    paths[1].write_text(report, encoding="utf-8")
    plot_accuracy_by_width(
        summary, paths[2], f"MQAR, seq {sweep.task.seq_len}, {sweep.task.num_pairs} pairs", include_paper=paper_setting
    )
    print(f"wrote {', '.join(map(str, paths))}")
    return unfinished


def _run_harness(args) -> int:
    try:
        from lm_eval.utils import make_table

        from .harness import GSAEvalLM, run_harness
    except ImportError as error:
        raise ValueError(f"gsa eval harness needs lm-eval ({error}): pip install 'lm-eval>=0.4.8,<0.5'") from None

    limit = args.limit
    if limit is not None and limit >= 1:
        limit = int(limit)
    lm = GSAEvalLM(
        args.model, args.tokenizer, device=args.device, dtype=args.dtype, batch_size=args.batch_size,
        max_length=args.max_length, add_bos_token=args.add_bos_token,
    )
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    started = time.perf_counter()
    results = run_harness(
        lm, tasks, args.data_dir, limit, args.num_fewshot, tuple(args.ruler_lengths),
        bootstrap_iters=args.bootstrap_iters,
    )
    seconds = time.perf_counter() - started
    if args.output:  # first: a failure while printing the table must not lose the results
        _write_json(args.output, {k: v for k, v in results.items() if k != "samples"})
        print(f"wrote {args.output}")
    print(make_table(results))
    if "groups" in results and results["groups"]:
        print(make_table(results, "groups"))
    print(f"{seconds:.0f} s")
    return 0


def _run_recall(args) -> int:
    from .loading import load_causal_lm, model_tokenizer
    from .recall import RecallSettings, evaluate_recall, format_tables, plot_needle_grid, plot_recall

    models = args.model
    tokenizers = args.tokenizer or [None]
    if len(tokenizers) not in (1, len(models)):
        raise ValueError(f"give --tokenizer once or once per --model ({len(models)}), got {len(tokenizers)}")
    labels = args.label or [Path(m).name for m in models]
    if len(labels) != len(models) or len(set(labels)) != len(labels):
        raise ValueError(f"give one distinct --label per --model, got {labels} for {len(models)} models")
    settings = RecallSettings(
        lengths=tuple(args.lengths), examples=args.examples, depths=tuple(args.depths), seed=args.seed,
        batch_size=args.batch_size,
    )
    by_model = {}
    for index, (label, path) in enumerate(zip(labels, models)):
        tokenizer = model_tokenizer(path, tokenizers[index if len(tokenizers) > 1 else 0])
        model = load_causal_lm(path, args.device, args.dtype)

        def progress(task: str, row: dict, label=label) -> None:
            depth = "" if row["depth"] is None else f" depth {row['depth']:.2f}"
            print(f"{label}: {task} length {row['length']}{depth}: accuracy {100 * row['accuracy']:.0f}%, "
                  f"token accuracy {100 * row['token_accuracy']:.0f}%", flush=True)

        by_model[label] = {"model": path, **evaluate_recall(model, tokenizer, settings, tuple(args.tasks), progress)}
        del model
    print("\naccuracy % (token accuracy %)\n" + format_tables(by_model))
    args.output_dir.mkdir(parents=True, exist_ok=True)
    _write_json(args.output_dir / "recall.json", {"models": by_model, "environment": _environment(args.device)})
    plot_recall(by_model, args.output_dir / "recall.png")
    written = ["recall.json", "recall.png"]
    if "needle" in args.tasks:
        for label, result in by_model.items():
            plot_needle_grid(label, result, args.output_dir / f"needle_{label}.png")
            written.append(f"needle_{label}.png")
    print(f"wrote {', '.join(written)} in {args.output_dir}")
    return 0

