"""Undo in-place model edits when a transform fails part-way (``rollback_on_error``).

``StaticW8A8`` folds BatchNorm, equalizes and stretches weights before calibration can reject a batch;
without this, a wrong-shape batch or a NaN activation would leave the caller's model folded and
rescaled though nothing was quantized.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn


@contextmanager
def rollback_on_error(model: nn.Module):
    """On an exception inside the block, put ``model`` back as it was on entry, then re-raise.

    Restored: every module's children, parameters and buffers (the objects, so swapped or re-assigned
    ones come back) and their values (so in-place edits are undone), plus attributes added to ``model``.
    Costs one copy of the parameters and buffers for the block's duration.
    """
    tree = [(m, dict(m._modules), dict(m._parameters), dict(m._buffers)) for m in model.modules()]
    values = {id(t): (t, t.detach().clone()) for _, _, p, b in tree for t in (*p.values(), *b.values())
              if t is not None}  # fmt: skip
    attrs = set(vars(model))
    try:
        yield
    except BaseException:
        with torch.no_grad():
            for m, children, params, buffers in tree:
                m._modules.clear(), m._modules.update(children)
                m._parameters.clear(), m._parameters.update(params)
                m._buffers.clear(), m._buffers.update(buffers)
            for t, saved in values.values():
                t.copy_(saved)
        for name in set(vars(model)) - attrs:
            delattr(model, name)
        raise
