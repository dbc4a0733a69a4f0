"""Reading device values on the host: where ptd does it, and when it costs nothing.

On a GPU, ``bool(t)``, ``t.item()``, ``t.tolist()``, a boolean-mask index or ``nonzero`` wait for every
kernel queued before them (a host synchronization). A few places of the library pick between a check
(cheap on a CPU, where there is no queue to wait for) and work that needs no check (what a GPU takes);
``free_to_read`` makes that choice. The host-sync counter (``bench/host_syncs.py``) sets
``AS_ON_A_DEVICE`` to take, on a CPU, the branches a GPU takes, so that what it counts is the GPU's path.
"""

from __future__ import annotations

import torch

#: Take the device branches on CPU tensors too (set by the host-sync counter; not a user setting).
AS_ON_A_DEVICE = False


def free_to_read(tensor: torch.Tensor) -> bool:
    """Whether reading ``tensor``'s values on the host waits for nothing: a CPU tensor."""
    return tensor.device.type == "cpu" and not AS_ON_A_DEVICE
