"""Where an MQAR training step's time goes, one process alone on the GPU: step time by model and width, and the
GPU kernels and host time of one step of the widest GSA model (torch.profiler).

    python benchmarks/profile_mqar_step.py --widths 64 512
"""

from __future__ import annotations

import argparse
import time

import torch

from gsa.eval import mqar_sweep


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--widths", nargs="+", type=int, default=[64, 512])
    parser.add_argument("--models", nargs="+", default=["gsa", "attention"])
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    settings, task = mqar_sweep.PROFILES["gpu"].train, mqar_sweep.PROFILES["gpu"].task
    options = {k: getattr(mqar_sweep.ModelOptions(), k) for k in mqar_sweep.ModelOptions.__dataclass_fields__}
    device = torch.device("cuda")
    for width in args.widths:
        for kind in args.models:
            model = mqar_sweep.MODEL_BUILDERS[kind](width, task.vocab_size, options).to(device)
            optimizer = mqar_sweep._optimizer(model, 3e-3, settings, device)
            stream = torch.Generator(device=device).manual_seed(0)
            started = time.time()
            for _ in range(3):
                mqar_sweep._train_step(model, optimizer, task, settings, stream, device, 3e-3)
            torch.cuda.synchronize()
            warm = time.time() - started
            started = time.time()
            for _ in range(args.steps):
                mqar_sweep._train_step(model, optimizer, task, settings, stream, device, 3e-3)
            torch.cuda.synchronize()
            step_ms = 1e3 * (time.time() - started) / args.steps
            print(f"{kind:<10} d={width:<4} {step_ms:8.1f} ms/step  (first 3 steps {warm:.1f} s)", flush=True)
            if kind == "gsa" and width == max(args.widths):
                from torch.profiler import ProfilerActivity, profile

                with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                    for _ in range(2):
                        mqar_sweep._train_step(model, optimizer, task, settings, stream, device, 3e-3)
                    torch.cuda.synchronize()
                print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=14, max_name_column_width=60))
                print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=10, max_name_column_width=60))
            del model, optimizer
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
