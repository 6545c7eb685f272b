"""The one QONNX <-> ``ap_fixed`` mode table, read by the importer
(:mod:`qfx_onnx.importer.quant_types`) and the exporter (:mod:`qfx_onnx.qonnx_export`).

A QONNX ``Quant`` (spec: qonnx ``docs/qonnx-custom-ops/quant_op.md``; executor:
``qonnx.custom_op.general.intquant``) with scale ``2**-F``, zero point 0 and bit width W is a cast
to a W-bit type with F fraction bits that always saturates. Its attributes map as follows
(``rounding_mode`` as ``intquant.resolve_rounding_mode`` evaluates it):

===============================  ===============================  ==========================================
ap_fixed                         QONNX Quant                      note
===============================  ===============================  ==========================================
``AP_TRN``                       ``FLOOR``                        ``np.floor``
``AP_TRN_ZERO``                  ``DOWN``                         ``np.fix``, toward zero
``AP_RND_CONV``                  ``ROUND`` (= ``HALF_EVEN``)      ``np.round``, ties to even
``AP_RND_INF``                   ``HALF_UP``                      ties away from zero
``AP_RND_ZERO``                  ``HALF_DOWN``                    ties toward zero
``AP_RND`` (ties to +inf)        none for ``ap_fixed``            ``ap_ufixed`` saturating: ``HALF_UP``
``AP_RND_MIN_INF`` (to -inf)     none for ``ap_fixed``            ``ap_ufixed`` saturating: ``HALF_DOWN``
none                             ``CEIL``, ``UP``                 toward +inf / away from zero
``ap_fixed`` ``AP_SAT``          ``signed=1 narrow=0``
``ap_fixed`` ``AP_SAT_SYM``      ``signed=1 narrow=1``            codes ``-(2**(W-1)-1) .. 2**(W-1)-1``
``ap_ufixed`` ``AP_SAT``         ``signed=0 narrow=0``            (``AP_SAT_SYM``, ``AP_WRAP_SM`` alike)
none                             ``signed=0 narrow=1``            codes ``0 .. 2**W-2``
``AP_WRAP``, ``AP_SAT_ZERO``     none                             a Quant always saturates
signed 1-bit                     none                             qonnx runs it bipolar (``BipolarQuant``)
===============================  ===============================  ==========================================

For an ``ap_ufixed`` that saturates, negative values clip to 0 whatever the tie rule, so only the
rule on non-negative ties counts: ``AP_RND`` rounds like ``AP_RND_INF`` there, ``AP_RND_MIN_INF``
like ``AP_RND_ZERO``. Clipping before rounding (QONNX) equals rounding before saturating
(``ap_fixed``): both bounds are integers and every mode is monotone and leaves integers alone.

Checked value by value, ties and overflow included, against qonnx's own executor in both
directions: ``tests/test_qonnx_export.py::test_mode_table_found_by_qonnx_executor`` (every
(rounding_mode, narrow) pair against every ap_fixed (Q, O) pair) and
``tests/test_qonnx_import.py`` (every mode imported, run by both).
"""

from __future__ import annotations

from qfx_onnx.fixed.types import FixedType, OverflowMode as O, QuantMode as Q

# QONNX rounding_mode -> ap_q_mode (import; both spellings of half to even)
FROM_QONNX = {
    "ROUND": Q.RND_CONV,
    "HALF_EVEN": Q.RND_CONV,
    "FLOOR": Q.TRN,
    "DOWN": Q.TRN_ZERO,
    "HALF_UP": Q.RND_INF,
    "HALF_DOWN": Q.RND_ZERO,
}
# ap_q_mode -> the rounding_mode export writes (the spec's canonical names)
TO_QONNX = {Q.TRN: "FLOOR", Q.TRN_ZERO: "DOWN", Q.RND_CONV: "ROUND", Q.RND_INF: "HALF_UP", Q.RND_ZERO: "HALF_DOWN"}
# QONNX modes no ap_q_mode rounds like
NO_AP_MODE = {"CEIL": "rounds toward +infinity", "UP": "rounds away from zero"}
# ap_q_modes QONNX lacks -> the expressible mode that differs least (only at negative ties), and
# equals it on an ap_ufixed that saturates
NEAREST = {Q.RND: Q.RND_INF, Q.RND_MIN_INF: Q.RND_ZERO}
SATURATING = (O.SAT, O.SAT_SYM)

assert all(FROM_QONNX[name] is q for q, name in TO_QONNX.items())


def rounding_of(mode: str) -> Q:
    """The ``ap_q_mode`` of a QONNX ``rounding_mode`` (case-insensitive); ValueError naming the
    supported modes if none rounds that way."""
    key = mode.upper()
    if key in FROM_QONNX:
        return FROM_QONNX[key]
    if key in NO_AP_MODE:
        raise ValueError(f"rounding_mode {mode!r} {NO_AP_MODE[key]}, which no ap_fixed quantization mode does "
                         f"(supported: {', '.join(FROM_QONNX)})")
    raise ValueError(f"unknown rounding_mode {mode!r}")


def saturates(t: FixedType) -> bool:
    """Whether casts to ``t`` saturate (an ``ap_ufixed`` ``AP_WRAP_SM`` does: ap_fixed_base.h)."""
    return t.o in SATURATING or (t.o is O.WRAP_SM and not t.signed)


def narrow_of(t: FixedType) -> int:
    """QONNX ``narrow`` of a saturating type: 1 for a signed ``AP_SAT_SYM``, else 0."""
    return int(t.o is O.SAT_SYM and t.signed)


def quant_attributes(t: FixedType) -> dict[str, int | str]:
    """``signed``, ``narrow`` and ``rounding_mode`` of the Quant that casts to ``t`` (whose
    quantization mode is in :data:`TO_QONNX` and which saturates)."""
    return {"signed": int(t.signed), "narrow": narrow_of(t), "rounding_mode": TO_QONNX[t.q]}


def expressible_modes(t: FixedType) -> tuple[Q, O, bool]:
    """The (quantization, overflow) modes export writes for ``t``, and whether the rounding had to
    change for a signed type (then the values differ wherever a cast meets a negative tie):
    an unexpressible ``ap_ufixed`` rounding takes its equal from :data:`NEAREST`, a signed one
    ``AP_RND_CONV`` (right where nothing rounds), and a non-saturating overflow ``AP_SAT``."""
    o = t.o if t.o in SATURATING else O.SAT
    if t.q in TO_QONNX:
        return t.q, o, False
    if t.signed:
        return Q.RND_CONV, o, True
    return NEAREST[t.q], o, False


__all__ = ["FROM_QONNX", "NEAREST", "NO_AP_MODE", "SATURATING", "TO_QONNX", "expressible_modes", "narrow_of",
           "quant_attributes", "rounding_of", "saturates"]
