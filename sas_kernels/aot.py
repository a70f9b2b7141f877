"""Ahead-of-time compilation of every kernel and autotune config for NVIDIA targets, on any machine.

``python -m sas_kernels.aot 80 90`` compiles each kernel x each autotune config (see ``_jobs``)
for each listed compute capability and prints one JSON line per compilation with its shared-memory use,
registers per thread and stack/local (spill) bytes. It must run
without ``TRITON_INTERPRET`` (the interpreter replaces the JIT functions this needs); the test
suite runs it in a subprocess. This catches code the interpreter accepts and the compiler rejects.
"""
from __future__ import annotations

import inspect
import json
import os
import re
import subprocess
import sys
import tempfile

import torch
import triton
from triton.backends.compiler import GPUTarget

from . import sas_adapter as kernels

# Per-block shared-memory limits (bytes) of the targets: sm_80 (A100) 163 KB, sm_90 (H100) 227 KB.
SMEM_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
# fp32 and one half type: fp16 and bf16 compile to the same tile shapes.
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
AUTOTUNED_KERNELS = ("_sas_forward_kernel", "_sas_backward_rows_kernel", "_sas_backward_weights_kernel")
# Boolean constexprs some kernels take besides HAS_TASKS, set to their most demanding branch (every
# optional load and store on; the weights kernel's multi-split reduction with its atomics).
FEATURE_FLAGS = {"SAVE_U": True, "ACCUMULATE_DX": True, "ONE_SPLIT": False, "ACCUMULATE_DA": True,
                 "ACCUMULATE_DB": True, "SAVE_X": kernels.SAVED_FULL.value, "SAVED_X": kernels.SAVED_FULL.value}
# Side tensors the host launchers always allocate in fp32 or int64, whatever the input dtype (the
# split counters are int32 words at the tail of the fp32 partials buffer, bitcast in the kernel).
FP32_POINTERS = {"u_ptr", "gb_ptr", "partial_ptr", "qscale_ptr", "xscale_ptr"}
# The saved-input variants (SaSConfig.saved_input, train_down=False), each compiled once more in bf16 at
# the smallest padded rank with the first config: the forward writing an 8-bit copy (SAVE_X), the weights
# kernel reading one or none (SAVED_X); name -> (constexpr, code, dtype of the copy's pointer).
SAVED_INPUT_VARIANTS = {
    "int8": ("_sas_forward_kernel", "SAVE_X", kernels.SAVED_INT8.value, "i8"),
    "fp8": ("_sas_forward_kernel", "SAVE_X", kernels.SAVED_FP8.value, "u8"),
    "from int8": ("_sas_backward_weights_kernel", "SAVED_X", kernels.SAVED_INT8.value, "i8"),
    "from fp8": ("_sas_backward_weights_kernel", "SAVED_X", kernels.SAVED_FP8.value, "u8"),
    "no dA": ("_sas_backward_weights_kernel", "SAVED_X", kernels.SAVED_NONE.value, "bf16"),  # x_ptr unread
}
# The pointer each variant's copy travels through.
COPY_POINTERS = {"_sas_forward_kernel": "q_ptr", "_sas_backward_weights_kernel": "x_ptr"}
# Strides the kernels take for A, B and h besides their usual unit ones: Triton specializes an int
# argument equal to 1 as a constant, so the usual launch compiles them as constexpr 1, as here. One
# extra compilation per kernel (see _jobs) takes them as runtime ints, as a transposed A does.
UNIT_STRIDES = ("stride_ak", "stride_br", "stride_hr")


def _signature(fn, dtype_name: str, constexprs: dict, copy_pointer=None) -> dict:
    """Triton's signature of ``fn``: ``copy_pointer`` is ``(name, dtype)`` of an 8-bit copy's pointer."""
    signature = {}
    for name in inspect.signature(fn.fn).parameters:
        if copy_pointer is not None and name == copy_pointer[0]:
            signature[name] = f"*{copy_pointer[1]}"
        elif name in constexprs:
            signature[name] = "constexpr"
        elif name == "task_ptr":
            signature[name] = "*i64"
        elif name.endswith("_ptr"):
            signature[name] = "*fp32" if name in FP32_POINTERS else f"*{dtype_name}"
        elif name == "scale":
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
    return signature


def _jobs():
    """(kernel name, JITFunction, dtype name, constexprs, num_warps, num_stages) for every compilation:
    every autotune config in bf16 at the smallest padded rank, and at the largest padded rank (the
    most shared memory) the configs that survive pruning there, in bf16 and fp32, all with the unit
    strides of contiguous A, B and h; then each kernel once more with those strides as runtime ints."""
    variants = [("bf16", kernels.MIN_RANK_PAD), ("bf16", kernels.MAX_RANK), ("fp32", kernels.MAX_RANK)]
    for dtype_name, r_pad in variants:
        for name, fn, constexprs, config in _kernel_configs(dtype_name, r_pad):
            yield name, fn, dtype_name, constexprs, config.num_warps, config.num_stages, None, None
    firsts = list(_kernel_configs("bf16", kernels.MIN_RANK_PAD, first_only=True))
    for name, fn, constexprs, config in firsts:
        constexprs = {k: v for k, v in constexprs.items() if k not in UNIT_STRIDES}
        yield name, fn, "bf16", constexprs, config.num_warps, config.num_stages, None, None
    for variant, (kernel, flag, code, pointer_dtype) in SAVED_INPUT_VARIANTS.items():
        for name, fn, constexprs, config in firsts:
            if name == kernel:
                yield (name, fn, "bf16", dict(constexprs, **{flag: code}), config.num_warps, config.num_stages,
                       variant, (COPY_POINTERS[name], pointer_dtype))


def _kernel_configs(dtype_name: str, r_pad: int, first_only: bool = False):
    element_size = torch.tensor([], dtype=DTYPES[dtype_name]).element_size()
    common = {"R_PAD": r_pad, "HAS_TASKS": True}
    for name in AUTOTUNED_KERNELS:
        autotuner = getattr(kernels, name)
        configs = kernels.fitting_configs(autotuner.configs, r_pad, element_size)
        for config in configs[:1] if first_only else configs:
            constexprs = dict(common, DOT_PRECISION=kernels.FP32_DOT_PRECISION, **config.kwargs)
            parameters = inspect.signature(autotuner.fn.fn).parameters
            constexprs.update({flag: on for flag, on in FEATURE_FLAGS.items() if flag in parameters})
            constexprs.update({stride: 1 for stride in UNIT_STRIDES if stride in parameters})
            yield name, autotuner.fn, constexprs, config


def resource_usage(cubin: bytes) -> dict:
    """Registers per thread and stack/local bytes (local memory is where registers spill) of a compiled
    kernel, from ``cuobjdump --dump-resource-usage`` shipped with Triton; {} when the tool is missing."""
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(tool):
        return {}
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    found = dict(re.findall(r"\b(REG|STACK|LOCAL):(\d+)", out))
    return {"registers": int(found["REG"]), "stack": int(found["STACK"]), "local": int(found["LOCAL"])} if found else {}


def compile_all(arch: int):
    target = GPUTarget("cuda", arch, 32)
    for name, fn, dtype_name, constexprs, num_warps, num_stages, variant, copy_pointer in _jobs():
        source = triton.compiler.ASTSource(fn=fn, signature=_signature(fn, dtype_name, constexprs, copy_pointer),
                                           constexprs=constexprs)
        compiled = triton.compile(source, target=target, options={"num_warps": num_warps, "num_stages": num_stages})
        yield {"kernel": name, "arch": arch, "dtype": dtype_name, "num_warps": num_warps, "num_stages": num_stages,
               "saved_input": variant,
               "constexprs": {k: v for k, v in constexprs.items() if k != "HAS_TASKS" and k not in UNIT_STRIDES},
               "unit_strides": all(k in constexprs for k in UNIT_STRIDES if k in inspect.signature(fn.fn).parameters),
               "shared": compiled.metadata.shared, "limit": SMEM_LIMIT[arch],
               **resource_usage(compiled.asm["cubin"])}


def main(argv):
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("run without TRITON_INTERPRET=1: the interpreter hides the JIT functions")
    for arch in (int(a) for a in argv or SMEM_LIMIT):
        for record in compile_all(arch):
            print(json.dumps(record), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
