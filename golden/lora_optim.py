"""Bit-accurate numpy twin of ``rtl/lora_optim.py``: the elementwise AdamW and SGD updates in float32.

This module *is* the arithmetic specification of the optimizer core. Every operation is one float32 operation,
rounded to nearest even (numpy's float32 ``*``, ``+``, ``-``, ``/`` and ``sqrt`` are correctly rounded IEEE
operations, with gradual underflow), in this order, ``fl`` meaning one rounding:

AdamW (decoupled weight decay and bias correction, as ``torch.optim.AdamW``)::

    p1    = fl(p * decay)
    m'    = fl(fl(beta1 * m) + fl(one_minus_beta1 * g))
    v'    = fl(fl(beta2 * v) + fl(one_minus_beta2 * fl(g * g)))
    denom = fl(fl(sqrt(v') * inv_bc2_sqrt) + eps)
    p'    = fl(p1 - fl(step_size * fl(m' / denom)))

SGD (``torch.optim.SGD`` without momentum, dampening or Nesterov)::

    g1 = fl(g + fl(weight_decay * p))
    p' = fl(p - fl(lr * g1))

torch computes the same quantities with another rounding order (``lerp`` for the first moment, a division by
``sqrt(1 - beta2 ** step)`` rather than a product with its inverse, ``addcdiv``), so the two agree to a few units in
the last place per step, not bit for bit; the semantics (which terms, which corrections) are the same. Every NaN
result is the canonical float32 NaN, as the hardware outputs it.
"""

import numpy as np

from ..constants import HYPER_FIELDS

__all__ = ["hyper_from", "adamw", "sgd"]

_CANONICAL_NAN = np.uint32(0x7FC00000).view(np.float32)


def hyper_from(lr, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01, step=1):
    """The float32 constants of optimizer step ``step`` (counted from 1, as torch counts).

    Each constant is computed in float64 from the Python floats given and rounded once to float32:
    ``step_size = lr / (1 - beta1 ** step)``, ``inv_bc2_sqrt = 1 / sqrt(1 - beta2 ** step)``,
    ``decay = 1 - lr * weight_decay``, ``one_minus_beta1 = 1 - beta1``, ``one_minus_beta2 = 1 - beta2``; the others
    are the arguments themselves. SGD uses only ``lr`` and ``weight_decay``.

    Returns
    -------
    dict of str to numpy.float32
        One entry per name of :data:`HYPER_FIELDS`.
    """
    if not isinstance(step, int) or isinstance(step, bool) or step < 1:
        raise ValueError(f"step must be an integer of at least 1, not {step!r}")
    for name, value in (("beta1", beta1), ("beta2", beta2)):
        if not 0.0 <= value < 1.0:
            raise ValueError(f"{name} must be in [0, 1), not {value!r}")
    lr, beta1, beta2, eps, weight_decay = (float(x) for x in (lr, beta1, beta2, eps, weight_decay))
    exact = {
        "lr": lr,
        "weight_decay": weight_decay,
        "beta1": beta1,
        "one_minus_beta1": 1.0 - beta1,
        "beta2": beta2,
        "one_minus_beta2": 1.0 - beta2,
        "eps": eps,
        "step_size": lr / (1.0 - beta1 ** step),
        "inv_bc2_sqrt": 1.0 / np.sqrt(1.0 - beta2 ** step),
        "decay": 1.0 - lr * weight_decay,
    }
    return {name: np.float32(exact[name]) for name in HYPER_FIELDS}


def _float32(values):
    return np.asarray(values, dtype=np.float32)


def _canonical(values):
    return np.where(np.isnan(values), _CANONICAL_NAN, values).astype(np.float32)


def adamw(param, grad, m, v, hyper):
    """Twin of the AdamW core: one step on every element, in the module's rounding order.

    Parameters
    ----------
    param, grad, m, v : array_like of float32
        The parameters, their gradients and the two moments, all of one shape.
    hyper : dict
        The step's constants, as :func:`hyper_from` returns them (every value is taken as float32).

    Returns
    -------
    tuple of numpy.ndarray
        The new ``(param, m, v)``, float32.
    """
    param, grad, m, v = (_float32(x) for x in (param, grad, m, v))
    h = {name: np.float32(hyper[name]) for name in HYPER_FIELDS}
    with np.errstate(all="ignore"):                     # overflow to inf and NaN are part of the arithmetic
        decayed = param * h["decay"]
        m_new = h["beta1"] * m + h["one_minus_beta1"] * grad
        v_new = h["beta2"] * v + h["one_minus_beta2"] * (grad * grad)
        denom = np.sqrt(v_new) * h["inv_bc2_sqrt"] + h["eps"]
        param_new = decayed - h["step_size"] * (m_new / denom)
    return _canonical(param_new), _canonical(m_new), _canonical(v_new)


def sgd(param, grad, weight_decay, lr):
    """Twin of the SGD core: ``p - lr * (g + weight_decay * p)``, each operation rounded to float32.

    Parameters
    ----------
    param, grad : array_like of float32
    weight_decay, lr : float
        Taken as float32, as the core's ``hyper`` fields carry them (see :func:`hyper_from`).

    Returns
    -------
    numpy.ndarray
        The new parameters, float32.
    """
    param, grad = _float32(param), _float32(grad)
    weight_decay, lr = np.float32(weight_decay), np.float32(lr)
    with np.errstate(all="ignore"):
        return _canonical(param - lr * (grad + weight_decay * param))
