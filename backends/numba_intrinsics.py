"""Two LLVM instructions Numba does not expose, for the numba backend's kernels.

``prefetch(array, row, col)``
    A hint that brings the cache line of ``array[row, col]`` toward the core before a loop reads it
    (``llvm.prefetch``). The decode kernels read weights and K/V pages that are not in any cache; while
    one block or page is computed, the next one's lines are already on their way.

``float_from_bits(bits)``
    The float whose IEEE-754 bit pattern is ``bits`` (int32 -> float32, int64 -> float64), LLVM's
    ``bitcast``. ``numba_cpu.exp_nonpositive`` builds 2^k from its exponent field this way, which keeps
    the loop around it vectorisable (``math.ldexp`` is a call per element).

Both are pure instructions: they change no memory and raise nothing.
"""

from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic


@intrinsic
def prefetch(typingctx, array, row, col):
    """Ask the CPU to bring the cache line holding array[row, col] (a 2-D array) toward the core, into
    the outer caches (LLVM's llvm.prefetch, read, locality 1: x86's prefetcht2). A hint only: it never
    faults and changes no value. Locality 1 measured best for both users (numba_decode.project_tiled;
    a draft of the split-K decode kernel on a cold-cache serving step, 17 rows, 1 thread: 0.37 ms per
    call with locality 1, 0.44 with 0, 0.45 with 3)."""
    if not isinstance(array, types.Array) or array.ndim != 2:
        return None

    def codegen(context, builder, signature, args):
        array_type = signature.args[0]
        view = context.make_array(array_type)(context, builder, args[0])
        index = [context.cast(builder, value, kind, types.intp) for value, kind in zip(args[1:], signature.args[1:])]
        address = builder.bitcast(cgutils.get_item_pointer(context, builder, array_type, view, index, wraparound=False),
                                  ir.IntType(8).as_pointer())
        i32 = ir.IntType(32)
        function = builder.module.declare_intrinsic(
            "llvm.prefetch", [address.type], ir.FunctionType(ir.VoidType(), [address.type, i32, i32, i32]))
        # (address, 0 = read, locality 1 of 0..3, 1 = data cache)
        builder.call(function, [address, ir.Constant(i32, 0), ir.Constant(i32, 1), ir.Constant(i32, 1)])
        return context.get_dummy_value()

    return types.void(array, row, col), codegen


@intrinsic
def float_from_bits(typingctx, bits):
    """The float with IEEE-754 bit pattern ``bits``: int32 -> float32, int64 -> float64 (no conversion of
    the value: float_from_bits(np.int32(0x3F800000)) is 1.0)."""
    widths = {types.int32: types.float32, types.int64: types.float64}
    if bits not in widths:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], context.get_value_type(signature.return_type))

    return widths[bits](bits), codegen
