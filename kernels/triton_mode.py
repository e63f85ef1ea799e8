"""Whether fastsd's Triton kernels were built for the interpreter, asked of the kernel object itself.

`triton.jit` decides at decoration time: Triton 3.4+ reads `triton.knobs.runtime.interpret`, 3.0-3.3
read the TRITON_INTERPRET environment variable (and have no `triton.knobs`). Both return an
`InterpretedFunction` in interpreter mode, so checking the decorated object works on every version
that torch 2.4+ ships (importing `triton.knobs` crashed on 3.0-3.3).
"""
from __future__ import annotations


def is_interpreted(jitted) -> bool:
    return type(jitted).__name__ == "InterpretedFunction"
