"""The roofline estimate of a compiled train step, from figures that cannot make it look free.

XLA's `cost_analysis()` of a compiled TPU program leaves work out (checked with libtpu):

- a Pallas/Mosaic kernel (a custom call "tpu_custom_call", e.g. splash attention) counts no FLOPs
  and no bytes unless the kernel carries a `pl.CostEstimate`, which is then taken as given;
- a while loop's body (a `jax.lax.fori_loop`, e.g. a loss taken chunk by chunk, or the windowed
  einsum loops XLA makes of matmuls over an FSDP-sharded dimension) counts once, whatever its trip
  count: 8 matmuls in a loop of 8 count as one.

So the estimate takes the larger of XLA's FLOPs and the model formula's (`flops.flops_per_token`,
which counts attention and every matmul), and adds to XLA's bytes what `hidden_bytes` reads from
the compiled module's text: each kernel without a cost estimate reads its operands and writes its
outputs at least once (a lower bound: for attention, q, k, v in and o out per layer forward; q, k,
v, o, dO in and dq, dk, dv out backward), and each loop trip after the first moves its body's
operands and outputs again (the compiler's own way of counting bytes, applied to the trips it
skipped). The JSON says which figures were used.
"""

from __future__ import annotations

import math
import re
from typing import NamedTuple

_COMPUTATION = re.compile(r"^(ENTRY )?%([\w.\-]+) \(")
_INSTRUCTION = re.compile(r"^\s*(ROOT )?%([\w.\-]+) = ")
_ARRAY = re.compile(r"\b(pred|bf16|f8e\w+|[suf]\d+)\[([\d,]*)\]")
_OPERAND = re.compile(r"%([\w.\-]+)")
# Instructions that only name, alias or assemble buffers: no HBM traffic of their own.
_NO_TRAFFIC = {"parameter", "get-tuple-element", "tuple", "constant", "bitcast", "after-all", "partition-id",
               "replica-id", "while"}


class _Op(NamedTuple):
    name: str
    root: bool
    out_bytes: int
    opcode: str
    operands: list[str]
    args: str  # the text between the parentheses (a constant's value)
    attrs: str


def _array_bytes(shape: str) -> int:
    total = 0
    for dtype, dims in _ARRAY.findall(shape):
        bits = 8 if dtype == "pred" or dtype.startswith("f8") else 16 if dtype == "bf16" else int(dtype[1:])
        total += math.prod(int(d) for d in dims.split(",") if d) * bits // 8
    return total


def _parse(line: str, m: re.Match) -> _Op:
    rest = line[m.end():]
    if rest.startswith("("):  # a tuple shape; its layouts hold parentheses too, e.g. {1,0:T(8,128)(2,1)}
        depth, end = 0, len(rest)
        for i, c in enumerate(rest):
            depth += (c == "(") - (c == ")")
            if depth == 0:
                end = i + 1
                break
        shape, rest = rest[:end], rest[end:]
    else:
        shape, _, rest = rest.partition(" ")
    opcode, _, rest = rest.strip().partition("(")
    args, _, attrs = rest.partition(")")  # operand lists hold no parentheses, only /*index=5*/ comments
    return _Op(m.group(2), bool(m.group(1)), _array_bytes(shape), opcode, _OPERAND.findall(args), args, attrs)


def _module(hlo: str) -> tuple[dict[str, list[_Op]], str | None]:
    """The compiled module's computations (name -> instructions) and its entry computation's name."""
    comps: dict[str, list[_Op]] = {}
    entry, ops, text = None, None, []  # text: the lines of one instruction (a kernel's config spans several)

    def flush() -> None:
        if text:
            ops.append(_parse(" ".join(text), _INSTRUCTION.match(text[0])))
            text.clear()

    for line in hlo.splitlines():
        if m := _COMPUTATION.match(line):
            ops = comps.setdefault(m.group(2), [])
            entry = m.group(2) if m.group(1) else entry
        elif ops is not None and line.rstrip() == "}":
            flush()
            ops = None
        elif ops is not None and _INSTRUCTION.match(line):
            flush()
            text.append(line)
        elif text:
            text.append(line)
    return comps, entry


def layout_copies(hlo: str) -> dict:
    """The copy and transpose instructions the compiled step runs outside fusions (in the entry
    computation and loop bodies: layout changes that go through HBM), and the bytes they move
    (read and written once each)."""
    comps, entry = _module(hlo)
    found = {"count": 0, "bytes": 0}

    def walk(comp: str) -> None:
        for op in comps.get(comp, []):
            if op.opcode == "while":
                walk(_attr(op.attrs, "body"))
            elif op.opcode in ("copy", "transpose"):
                found["count"] += 1
                found["bytes"] += 2 * op.out_bytes

    walk(entry)
    return found


def hidden_bytes(hlo: str) -> dict:
    """HBM bytes per device-step that `cost_analysis()` leaves out, read from `compiled.as_text()`:
    {"kernels": lower bound of the kernels without a cost estimate, "loops": the loop trips after
    the first, "kernel_calls": how many such kernels, "loops_found", "loops_unresolved": loops
    whose trip count the text does not give (counted once, as XLA does)}."""
    comps, entry = _module(hlo)
    defs = {op.name: op for body in comps.values() for op in body}
    size = lambda name: defs[name].out_bytes if name in defs else 0

    def const(name: str) -> int | None:
        op = defs.get(name)
        while op is not None and op.opcode == "copy" and op.operands:
            op = defs.get(op.operands[0])
        return int(op.args) if op is not None and op.opcode == "constant" and re.fullmatch(r"-?\d+", op.args) else None

    def trips(loop: _Op) -> int | None:
        """A counted loop's shape: counter at tuple index k starts at a constant, the body adds a
        positive constant (1 in a jax.lax.fori_loop; 2 in XLA's bidirectional windowed einsums,
        which an FSDP mesh makes of the weight-gradient matmuls), the condition is counter < constant."""
        cond, body = (comps.get(_attr(loop.attrs, key), []) for key in ("condition", "body"))
        root = next((op for op in cond if op.root), None)
        if root is None or root.opcode != "compare" or "direction=LT" not in root.attrs or len(root.operands) != 2:
            return None
        counter, limit = defs.get(root.operands[0]), const(root.operands[1])
        k = re.search(r"index=(\d+)", counter.attrs) if counter and counter.opcode == "get-tuple-element" else None
        init = defs.get(loop.operands[0]) if loop.operands else None
        out = next((op for op in body if op.root), None)
        if k is None or limit is None or init is None or init.opcode != "tuple" or out is None or out.opcode != "tuple":
            return None
        k = int(k.group(1))
        start, step = const(init.operands[k]), defs.get(out.operands[k])
        stride = max([c for c in map(const, step.operands) if c is not None], default=0) \
            if step is not None and step.opcode == "add" else 0
        if start is None or stride <= 0:
            return None
        return max(-(-(limit - start) // stride), 0)

    def is_kernel(op: _Op) -> bool:
        return op.opcode == "custom-call" and 'custom_call_target="tpu_custom_call"' in op.attrs \
            and '"cost_estimate"' not in op.attrs

    def op_bytes(op: _Op) -> int:
        if op.opcode in _NO_TRAFFIC or op.opcode.endswith("-done"):
            return 0
        if op.opcode == "dynamic-update-slice":  # in place: the update is read and written
            return 2 * size(op.operands[1])
        if op.opcode == "dynamic-slice":
            return 2 * op.out_bytes
        if op.opcode == "custom-call" and 'custom_call_target="tpu_custom_call"' not in op.attrs:
            return 0  # the compiler's own bookkeeping calls (AllocateBuffer, ConcatBitcast, ...)
        return op.out_bytes + sum(size(o) for o in op.operands)

    found = {"loops_found": 0, "loops_unresolved": 0, "kernel_calls": 0}

    def total(comp: str, loops: bool, kernels: bool, tally: bool = False) -> int:
        n = 0
        for op in comps.get(comp, []):
            if op.opcode == "while":
                t = trips(op)
                if tally:
                    found["loops_found"] += 1
                    found["loops_unresolved"] += t is None
                n += (t if loops and t is not None else 1) * total(_attr(op.attrs, "body"), loops, kernels, tally)
            elif is_kernel(op):
                found["kernel_calls"] += tally
                n += op_bytes(op) if kernels else 0
            else:
                n += op_bytes(op)
        return n

    everything = total(entry, True, True, tally=True)
    no_kernels = total(entry, True, False)
    return {"kernels": everything - no_kernels, "loops": no_kernels - total(entry, False, False), **found}


def _attr(attrs: str, key: str) -> str:
    m = re.search(rf"\b{key}=%([\w.\-]+)", attrs)
    return m.group(1) if m else ""


def step_estimate(*, xla_flops: float | None, formula_flops: float, xla_bytes: float | None,
                  hidden: dict | None, peak: float | None, bandwidth: float) -> dict:
    """Roofline max(FLOPs / peak, bytes / HBM bandwidth) from the figures that cannot make the step
    look free: the larger of XLA's and the formula's FLOPs, XLA's bytes plus what it left out
    (`hidden_bytes`). None when nothing compiled (no `xla_flops`) or the device has no peak."""
    hidden = hidden or {}
    flops = max(xla_flops or 0.0, formula_flops)
    parts = [k for k in ("kernels", "loops") if hidden.get(k)]
    bytes_used = (xla_bytes or 0.0) + sum(hidden[k] for k in parts)
    est = max(flops / peak, bytes_used / bandwidth) if xla_flops is not None and peak else None
    return {"flops_per_device_step_used": flops,
            "flops_used": "xla" if xla_flops is not None and xla_flops >= formula_flops else "formula",
            "bytes_accessed_per_device_step_used": bytes_used,
            "bytes_accessed_source": "+".join(["xla", *parts]),
            "bytes_accessed_hidden": {k: hidden.get(k, 0) for k in
                                      ("kernels", "loops", "kernel_calls", "loops_found", "loops_unresolved")},
            "est_step_time_s": est, "est_bound": None if est is None else
            ("compute" if flops / peak >= bytes_used / bandwidth else "memory")}
