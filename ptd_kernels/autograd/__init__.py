"""The autograd layer: typed configs, masked-row stripping, and the ``torch.autograd.Function``s.

Layering: public functions (``functional``, ``logits_level``) validate and dispatch → this
package (``linear`` for the fused functions, ``logits`` for the functions on given logits,
``common`` for configs and row handling) → a backend (``backends``) → shared per-row math
(``rowmath``).

Masked rows (target == ignore_index, mask False) are removed before any sweep, so they cost
nothing, give exactly 0 and get no gradient, and a NaN in one of them cannot leak into the
weight gradient. Backends return compute-dtype statistics and gradients; gradients are cast to
the input dtypes here, once.
"""
