"""CPU: does bf16 autocast (the GPU's precision) change how GSA learns MQAR? The 'cpu' task, GSA d=64, lr 3e-3,
2,500 steps, the same seed, in float32 or under bf16 autocast (torch backend); prints loss and validation accuracy.

    PYTHONPATH=src python benchmarks/mqar_precision.py bf16 > bf16.log &
    PYTHONPATH=src python benchmarks/mqar_precision.py fp32 > fp32.log
"""
import sys
import time

import torch
import torch.nn.functional as F

from gsa.eval import mqar_sweep as ms
from gsa.eval.mqar import MQARTask
mode = sys.argv[1]
torch.manual_seed(0)
torch.set_num_threads(1)
o = {k: getattr(ms.ModelOptions(), k) for k in ms.ModelOptions.__dataclass_fields__}
model = ms.MODEL_BUILDERS["gsa"](64, 256, o)
task = MQARTask(vocab_size=256, seq_len=64, num_pairs=8)
opt = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.98), weight_decay=0.1)
gen = torch.Generator().manual_seed(1)
vx, vy = task.sample(256, torch.Generator().manual_seed(5))
t0 = time.time()
steps = 2500
for step in range(steps + 1):
    lr = 3e-3 * min(1, (step + 1) / 100) * (0.5 * (1 + torch.cos(torch.tensor(step / steps * 3.14159))).item())
    for g in opt.param_groups: g["lr"] = lr
    x, y = task.sample(64, gen)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode == "bf16"):
        logits, wanted = ms._query_logits(model, x, y, task.num_pairs)
    loss = F.cross_entropy(logits.float(), wanted)
    opt.zero_grad(); loss.backward(); torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0); opt.step()
    if step % 250 == 0:
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode == "bf16"):
            lg, w = ms._query_logits(model, vx, vy, task.num_pairs)
        accuracy = (lg.argmax(-1) == w).float().mean().item()
        print(mode, step, f"loss {loss.item():.3f} val acc {accuracy:.3f} {time.time()-t0:.0f}s", flush=True)
