"""Compiles the fused MoE kernels for Hopper (sm_90) without a GPU and reports what the machine code does.

    python -m grokserve.model.kernels.hopper_check

Triton's wheel carries ptxas and cuobjdump, so the kernels can be built for sm_90 on any machine. For
each tile configuration of `tuning.py` this prints registers, stack (local-memory spills), and the
counts of the instructions that matter: HGMMA (Hopper warpgroup MMA) or HMMA (the older mma.sync),
16-byte cp.async loads (LDGSTS.E.BYPASS.128), narrower ones, and local loads/stores (LDL/STL).
Integer arguments are compiled as divisible by 16, as Triton's launcher specialises them for the real
shapes (D 6144, F 32768).
"""

from __future__ import annotations

import argparse
import collections
import json
import re
import subprocess
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from grokserve.model.kernels import moe_triton
from grokserve.model.kernels.support import triton_interpreting as interpreting
from grokserve.model.kernels.tuning import HOPPER_CONFIGS, MoeTileConfig

HOPPER = GPUTarget("cuda", 90, 32)
_INSTRUCTIONS = re.compile(r"\b(HGMMA\.\S+|HMMA\.\S+|LDGSTS\.\S+|LDL\S*|STL\S*)")
# Integer arguments that are multiples of 16 at every real size (strides, D, F, rows per scale).
_ALIGNED_INTEGERS = ("stride", "D", "F", "rows_per_scale")


@dataclass(frozen=True)
class MachineCode:
    kernel: str
    registers: int
    stack_bytes: int
    instructions: dict[str, int]

    @property
    def spills(self) -> bool:
        return self.stack_bytes > 0 or any(i.startswith(("LDL", "STL")) for i in self.instructions)

    def count(self, prefix: str) -> int:
        return sum(n for name, n in self.instructions.items() if name.startswith(prefix))


def _tool(name: str) -> str:
    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name)


def compile_for_hopper(kernel_name: str, quantized: bool, config: MoeTileConfig) -> MachineCode:
    """Builds `_gate_up_kernel` or `_down_kernel` for sm_90 and reads back its machine code."""
    fn = getattr(moe_triton, f"_{kernel_name}_kernel")
    gate_up = kernel_name == "gate_up"
    constexprs = {
        "NUM_EXPERTS": 8,
        "QUANTIZED": quantized,
        "INTERPRET": False,
        "BLOCK_M": config.block_m,
        "BLOCK_N": config.gate_up_block_n if gate_up else config.down_block_n,
        "BLOCK_K": config.gate_up_block_k if gate_up else config.down_block_k,
        "GROUP_M": config.group_m,
    }
    if gate_up:
        constexprs["TOP_K"] = 2
    weight = "*i8" if quantized else "*bf16"
    pointer_types = {"wg_ptr": weight, "wu_ptr": weight, "w_ptr": weight}
    pointer_types.update(sorted_pairs_ptr="*i32", block_expert_ptr="*i32", gates_ptr="*fp32")
    signature, attrs = {}, {}
    for index, name in enumerate(fn.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
            continue
        pointer = name.endswith("_ptr")
        signature[name] = pointer_types.get(name, "*bf16") if pointer else "i32"
        if pointer or name.startswith(_ALIGNED_INTEGERS):
            attrs[(index,)] = [["tt.divisibility", 16]]
    source = ASTSource(
        fn=fn,
        signature=signature,
        constexprs={(fn.arg_names.index(k),): v for k, v in constexprs.items()},
        attrs=attrs,
    )
    warps = config.gate_up_warps if gate_up else config.down_warps
    stages = config.gate_up_stages if gate_up else config.down_stages
    compiled = triton.compile(
        source, target=HOPPER, options={"num_warps": warps, "num_stages": stages}
    )
    with tempfile.TemporaryDirectory() as scratch:
        cubin = Path(scratch) / "kernel.cubin"
        cubin.write_bytes(compiled.asm["cubin"])
        usage = _run(_tool("cuobjdump"), "--dump-resource-usage", str(cubin))
        sass = _run(_tool("cuobjdump"), "-sass", str(cubin))
    resources = re.search(r"REG:(\d+) STACK:(\d+)", usage)
    if resources is None:
        raise RuntimeError(f"cuobjdump printed no resource usage for {kernel_name}:\n{usage}")
    return MachineCode(
        kernel_name,
        int(resources.group(1)),
        int(resources.group(2)),
        dict(collections.Counter(_INSTRUCTIONS.findall(sass))),
    )


def _run(*command: str) -> str:
    return subprocess.run(command, capture_output=True, text=True, check=True, timeout=120).stdout


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--buckets", type=int, nargs="+", default=sorted(HOPPER_CONFIGS), help="tuning.py keys"
    )
    parser.add_argument("--json", action="store_true", help="one JSON object per kernel instead")
    args = parser.parse_args()
    unknown = sorted(set(args.buckets) - set(HOPPER_CONFIGS))
    if unknown:
        parser.error(f"no tuning entry for {unknown}; entries: {sorted(HOPPER_CONFIGS)}")
    if interpreting():
        parser.error("TRITON_INTERPRET=1 is set: unset it to compile for the GPU")
    if not args.json:
        print("| tokens ≤ | weights | kernel | regs | stack B | MMA | 16 B cp.async | narrower |")
        print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for tokens in args.buckets:
        for quantized in (False, True):
            for kernel in ("gate_up", "down"):
                code = compile_for_hopper(kernel, quantized, HOPPER_CONFIGS[tokens])
                weights = "int8" if quantized else "bf16"
                if args.json:
                    print(json.dumps({"tokens": tokens, "weights": weights, **asdict(code)}))
                    continue
                mma = "HGMMA" if code.count("HGMMA") else "HMMA"
                wide = code.count("LDGSTS.E.BYPASS.128")
                print(
                    f"| {tokens} | {weights} | {kernel} | {code.registers} | {code.stack_bytes} "
                    f"| {mma} ×{code.count(mma)} | {wide} | {code.count('LDGSTS') - wide} |",
                    flush=True,
                )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
