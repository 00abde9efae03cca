"""Registers and spills of the operator's Triton kernels for an H100/H200 (sm_90), compiled here without a GPU.

Triton compiles each kernel to PTX for the target; ptxas (shipped in the Triton wheel) assembles it and reports
the registers a thread uses and the bytes it spills to local memory. A kernel that spills reads and writes those
bytes again per program, on top of its global traffic: the first thing to look at when a kernel is slower than
its bytes and flops say, and a check that needs no GPU. (The GPU's Triton and ptxas versions may allocate
differently; the times come from tune_ops.py on the device.)

    python benchmarks/kernel_registers.py                    # the chunk kernels at the paper shape's blocks
    python benchmarks/kernel_registers.py --warps 4 8 --kernels _output_fwd _state_grads_bwd
    python benchmarks/kernel_registers.py --slots 64 256 --stages 1 2 3   # shared memory (H200: 232448 B at most)
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import tempfile
from pathlib import Path

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from gsa.ops.triton import chunk as kernels

TARGET = GPUTarget("cuda", 90, 32)
INT64 = {"cu_ptr", "chunk_start_ptr", "chunk_slot_ptr", "slot_base_ptr", "chunk_base_ptr", "seg_first_ptr",
         "seg_cu_ptr", "seg_chunk_ptr"}
FLOAT32 = {"decay_ptr", "start_ptr", "end_ptr", "end_v_ptr", "logits_ptr", "ds_part_ptr", "dgq_ptr", "ends_ptr",
           "starts_ptr", "final_ptr", "final_v_ptr", "dl_ptr"}
DOT = {"DOT_DT": tl.bfloat16, "PRECISION": "tf32"}  # bf16 inputs
BLOCKS = {"BT": 64, "BK": 64, "BV": 64, "BD": 64, "BM": 64}  # the paper shape: K = V = 512, M = 64
CONSTANTS = {
    "_output_fwd": {**BLOCKS, "FLOOR": kernels.LOG_GATE_FLOOR, "SPAN_LIMIT": kernels.FACTORED_SPAN_LIMIT,
                    "SUB": kernels.SUB_CHUNK, **DOT},
    "_intra_bwd": {**BLOCKS, "FLOOR": kernels.LOG_GATE_FLOOR, "SPAN_LIMIT": kernels.FACTORED_SPAN_LIMIT,
                   "SUB": kernels.SUB_CHUNK, **DOT},
    "_state_grads_bwd": {**BLOCKS, "FLOOR": kernels.LOG_GATE_FLOOR, "SPAN_LIMIT": kernels.FACTORED_SPAN_LIMIT,
                         "SUB": kernels.SUB_CHUNK, "GROUP": 1, **DOT},
    "_walk_states": {**BLOCKS, "HAS_START": False, "STORE_SLOTS": True, "STORE_EDGE": True, "STORE_END": True,
                     "SPLIT_END": True, **DOT},
    "_walk_dstates": {**BLOCKS, "HAS_START": False, "STORE_SLOTS": True, "STORE_EDGE": True, "STORE_END": True,
                      "SPLIT_END": True, **DOT},
}


def signature(fn, constants: dict) -> dict:
    """Argument types as the launcher passes them for bf16 inputs (index tensors int64, chunk ids int32)."""
    types = {}
    for name in fn.arg_names:
        if name in constants:
            types[name] = "constexpr"
        elif name == "chunk_seq_ptr":
            types[name] = "*i32"
        elif name in INT64:
            types[name] = "*i64"
        elif name in FLOAT32:
            types[name] = "*fp32"
        elif name.endswith("_ptr"):
            types[name] = "*bf16"
        elif name in ("scale", "x_scale"):
            types[name] = "fp32"
        else:
            types[name] = "i32"
    return types


def ptxas() -> str:
    binaries = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    for name in ("ptxas-blackwell", "ptxas"):  # the newer one reads the PTX versions that newer Triton writes
        if (binaries / name).exists():
            return str(binaries / name)
    raise FileNotFoundError(f"no ptxas in {binaries}")


def report(name: str, warps: int, stages: int, slots: int = 64) -> dict:
    fn = getattr(kernels, name)
    constants = {key: value for key, value in {**CONSTANTS[name], "BM": slots}.items() if key in fn.arg_names}
    compiled = triton.compile(ASTSource(fn=fn, signature=signature(fn, constants), constexprs=constants),
                              target=TARGET, options={"num_warps": warps, "num_stages": stages})
    with tempfile.TemporaryDirectory() as folder:
        source = os.path.join(folder, "kernel.ptx")
        Path(source).write_text(compiled.asm["ptx"])
        log = subprocess.run([ptxas(), "-v", "--gpu-name", "sm_90a", source, "-o", os.path.join(folder, "k.cubin")],
                             capture_output=True, text=True, check=True).stderr
    registers = re.search(r"Used (\d+) registers", log)
    spills = re.search(r"(\d+) bytes spill stores", log)
    return {"registers": int(registers.group(1)) if registers else None,
            "spill_bytes": int(spills.group(1)) if spills else 0, "shared_bytes": compiled.metadata.shared}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kernels", nargs="+", default=list(CONSTANTS), choices=list(CONSTANTS))
    parser.add_argument("--warps", nargs="+", type=int, default=None, help="default: each kernel's LAUNCH entry")
    parser.add_argument("--stages", nargs="+", type=int, default=None, help="default: each kernel's LAUNCH entry")
    parser.add_argument("--slots", nargs="+", type=int, default=[64], help="the slot block BM (power of two)")
    args = parser.parse_args()
    print(f"{'kernel':<18} {'slots':>5} {'warps':>5} {'stages':>6} {'registers':>9} {'spilled B':>9} {'shared B':>8}")
    for name in args.kernels:
        launch = kernels.LAUNCH.get(name, {})
        for slots in args.slots:
            for warps in args.warps or [launch.get("num_warps", 4)]:
                for stages in args.stages or [launch.get("num_stages", 3)]:
                    row = report(name, warps, stages, slots)
                    print(f"{name:<18} {slots:>5} {warps:>5} {stages:>6} {row['registers']:>9} "
                          f"{row['spill_bytes']:>9} {row['shared_bytes']:>8}", flush=True)


if __name__ == "__main__":
    main()
