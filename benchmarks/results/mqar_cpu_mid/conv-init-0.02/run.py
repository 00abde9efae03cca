import sys
import torch
from gsa.eval import mqar_sweep as ms
from gsa.layers.conv import ShortConvolution
orig = ms.build_model
def build(*a, **k):
    m = orig(*a, **k)
    for mod in m.modules():
        if isinstance(mod, ShortConvolution):
            torch.nn.init.normal_(mod.weight, std=0.02)  # FLA's init for its nn.Conv1d-based short conv
    return m
ms.build_model = build
from gsa.cli import main
sys.exit(main(sys.argv[1:]))
