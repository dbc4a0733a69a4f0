"""The autograd layer: the prepared call, its rows, and the ``torch.autograd.Function``s.

Layering: public functions (``functional``, ``logits_level``) → one preparation step per call
(``_prepare``: checks, backend, vocabulary parallelism) → this package (``linear`` for the fused
functions, ``policy`` for the one-sweep policy loss, ``logits`` for the functions on given logits,
``common`` for the sweep config, the call and its rows) → a backend (``backends``) → shared per-row math (``rowmath``).

Masked rows (target == ignore_index, mask False) are removed before any sweep, so they cost
nothing, give exactly 0 and get no gradient, and a NaN in one of them cannot leak into the
weight gradient; on the sync-free path (``config.SYNC_FREE``) they go in with zero hidden states
and their outputs are zeroed, to the same effect. Backends return compute-dtype statistics and
gradients; gradients are cast to the input dtypes here, once.
"""
