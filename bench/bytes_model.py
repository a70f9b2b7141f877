"""Ideal bytes moved through device memory (docs/design.md §3), the numerator of every GB/s figure.

"Ideal" means one kernel pass that reads each input once and writes each output once;
the adapter op is memory-bound (about 0.67 r FLOP/byte), so bytes / bandwidth is its floor.
``e`` is the element size in bytes, ``N`` the number of rows. The parameters A, B, h are
counted too (read in the forward; read and their gradients written in the backward):
they are negligible at large N but not at N = 197, r = 64.
"""
from __future__ import annotations

#: A saved ``u = x @ A.T`` is kept in float32 whatever the activation dtype.
SAVED_U_BYTES = 4


def adapter_parameter_bytes(element_size: int, d_in: int, d_out: int, rank: int) -> int:
    """A (r, d_in) + B (d_out, r) + h (r,)."""
    return element_size * rank * (d_in + d_out + 1)


def adapter_forward_bytes(element_size: int, rows: int, d_in: int, d_out: int, rank: int,
                          save_u: bool = False) -> int:
    """Read x and base, write y: ``e*N*(d_in + 2*d_out)``; plus ``4*N*r`` when u is written for the backward."""
    activations = element_size * rows * (d_in + 2 * d_out)
    saved = SAVED_U_BYTES * rows * rank if save_u else 0
    return activations + saved + adapter_parameter_bytes(element_size, d_in, d_out, rank)


def adapter_backward_bytes(element_size: int, rows: int, d_in: int, d_out: int, rank: int,
                           save_u: bool = False) -> int:
    """Read g and x, write dx: ``e*N*(d_out + 2*d_in)``; plus ``4*N*r`` when a saved u is read.

    x is needed for dA = du.T @ x anyway, so u can be recomputed from it in the same
    pass at no extra traffic; dbase = g is the incoming gradient itself (no bytes).
    The parameters are read once and their gradients dA, dB, dh written once.
    """
    activations = element_size * rows * (d_out + 2 * d_in)
    saved = SAVED_U_BYTES * rows * rank if save_u else 0
    return activations + saved + 2 * adapter_parameter_bytes(element_size, d_in, d_out, rank)


def linear_forward_bytes(element_size: int, rows: int, d_in: int, d_out: int) -> int:
    """Frozen ``nn.Linear``: read x, W0 and b0, write y."""
    return element_size * (rows * (d_in + d_out) + d_out * d_in + d_out)


def linear_backward_bytes(element_size: int, rows: int, d_in: int, d_out: int) -> int:
    """Frozen ``nn.Linear`` (no weight gradient): read g and W0, write dx."""
    return element_size * (rows * (d_out + d_in) + d_out * d_in)


def layer_forward_bytes(element_size: int, rows: int, d_in: int, d_out: int, rank: int) -> int:
    """Adapted layer fused into one pass (the GEMM-epilogue design): the frozen layer's
    traffic plus the adapter parameters; the adapter adds no activation traffic."""
    return linear_forward_bytes(element_size, rows, d_in, d_out) + adapter_parameter_bytes(
        element_size, d_in, d_out, rank)


def layer_backward_bytes(element_size: int, rows: int, d_in: int, d_out: int, rank: int) -> int:
    """Fused adapted layer backward: the frozen backward plus a second read of x for dA
    (x is not otherwise needed when W0 is frozen) and the adapter parameters and gradients."""
    return (linear_backward_bytes(element_size, rows, d_in, d_out) + element_size * rows * d_in
            + 2 * adapter_parameter_bytes(element_size, d_in, d_out, rank))


def pass_bytes(forward: int, backward: int, pass_name: str) -> int:
    """Bytes of one timed pass ("forward", "backward" or "forward+backward")."""
    return {"forward": forward, "backward": backward, "forward+backward": forward + backward}[pass_name]


#: The 8-bit saved-input modes keep one float32 scale per row of x.
ROW_SCALE_BYTES = 4


def saved_adapter_bytes(rows: int, d_in: int, rank: int, x_element_bytes: int, row_scale_bytes: int = 0) -> int:
    """Bytes an adapted layer keeps for its backward beyond the frozen layer's: x at ``x_element_bytes``
    per element (0 when A is frozen and x is not kept), ``row_scale_bytes`` per row, and the float32 u."""
    return rows * (d_in * x_element_bytes + row_scale_bytes) + SAVED_U_BYTES * rows * rank
