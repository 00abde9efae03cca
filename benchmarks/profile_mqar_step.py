"""Where an MQAR training step's time goes, one process alone on the device: milliseconds a step by model and width,
eager and replayed from CUDA graphs (as the sweep trains), over whole turns of the training mixture, and the
kernels of one turn of the widest GSA model's graphed steps (torch.profiler).

    python benchmarks/profile_mqar_step.py --widths 64 128 256 512            # GPU
    python benchmarks/profile_mqar_step.py --device cpu --profile smoke --widths 16 --turns 1   # plumbing check

The sweep's runs share a GPU between processes (time-sliced); this is a run's step with the GPU to itself, so
the difference between the two is what sharing costs.
"""

from __future__ import annotations

import argparse
import time

import torch

from gsa.eval import mqar_sweep


def step_ms(model, optimizer, mixture, device, graphs: bool, turns: int):
    """(milliseconds a training step, the stepper): over `turns` whole turns of the mixture after one untimed turn
    (compilation, each size's graph capture); the steps train the model, which is thrown away afterwards."""
    stepper = mqar_sweep._GraphedSteps(model, optimizer, mixture, device) if graphs else (
        lambda step, stream, lr: mqar_sweep._train_step(model, optimizer, mixture, step, stream, device, lr))
    stream = torch.Generator(device=device).manual_seed(0)
    for step in range(len(mixture)):
        stepper(step, stream, 3e-3)
    mqar_sweep._synchronize(device)
    steps = turns * len(mixture)
    started = time.perf_counter()
    for step in range(steps):
        stepper(step, stream, 3e-3)
    mqar_sweep._synchronize(device)
    return 1e3 * (time.perf_counter() - started) / steps, stepper


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="gpu", help="the sweep profile whose task and batch to use")
    parser.add_argument("--widths", nargs="+", type=int, default=[64, 128, 256, 512])
    parser.add_argument("--models", nargs="+", default=["gsa", "attention"])
    parser.add_argument("--turns", type=int, default=5, help="timed turns of the mixture (4 steps a turn)")
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args()
    sweep = mqar_sweep.PROFILES[args.profile]
    settings, task = sweep.train, sweep.task
    device = torch.device(args.device)
    graph_modes = (False, True) if device.type == "cuda" else (False,)
    print(f"MQAR step, seq {task.seq_len}, {task.num_pairs} pairs, vocab {task.vocab_size}, "
          f"{settings.batch_size} target examples' tokens a step, on {device}")
    print(f"{'model':<10} {'width':>5} " + " ".join(f"{'graphed' if g else 'eager':>12}" for g in graph_modes))
    for width in args.widths:
        for kind in args.models:
            cells = []
            for graphs in graph_modes:
                torch.manual_seed(0)
                model = mqar_sweep.build_model(kind, width, task.vocab_size, sweep.options).to(device).train()
                optimizer = mqar_sweep._optimizer(model, 3e-3, settings, device, graphs)
                mixture = mqar_sweep._Mixture(task, settings)
                ms, stepper = step_ms(model, optimizer, mixture, device, graphs, args.turns)
                cells.append(f"{ms:9.2f} ms")
                if graphs and kind == "gsa" and width == max(args.widths):
                    profiled = (model, mixture, stepper)
                else:
                    del model, optimizer, stepper
            print(f"{kind:<10} {width:>5} " + " ".join(f"{c:>12}" for c in cells), flush=True)
    if device.type == "cuda" and "gsa" in args.models:
        from torch.profiler import ProfilerActivity, profile

        model, mixture, stepper = profiled
        stream = torch.Generator(device=device).manual_seed(1)
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for step in range(len(mixture)):
                stepper(step, stream, 3e-3)
            torch.cuda.synchronize()
        print(f"\none turn of graphed GSA steps at d={max(args.widths)}:")
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=16, max_name_column_width=60))


if __name__ == "__main__":
    main()
