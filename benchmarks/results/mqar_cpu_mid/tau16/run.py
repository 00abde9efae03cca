import os
import sys
from gsa.eval import mqar_sweep as ms
from gsa.layers.gsa import GatedSlotAttention
TAU = float(os.environ["GSA_TAU"])
orig = ms.build_model
def build(*a, **k):
    m = orig(*a, **k)
    for mod in m.modules():
        if isinstance(mod, GatedSlotAttention):
            mod.gate_logit_normalizer = TAU  # slower forgetting at init: alpha = sigmoid(f)^(1/tau)
    return m
ms.build_model = build
from gsa.cli import main
sys.exit(main(sys.argv[1:]))
