"""Loading weights into a model, with one clear error for any mismatch."""

from __future__ import annotations

from torch import nn

from ..errors import CheckpointError


def load_model_state(model: nn.Module, state: dict, where: str, expected: str = "", found: str = "") -> None:
    """Load weights, turning key/shape mismatches into one clear :class:`CheckpointError`."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [k for k in own if k in state and tuple(own[k].shape) != tuple(state[k].shape)]
    if missing or unexpected or shapes:
        which = "" if not (expected or found) else (
            f" (a {found} of other sizes than this one: classes, input channels or width)" if found == expected
            else f" (checkpoint model '{found}', expected '{expected}')")
        detail = []
        if missing:
            detail.append(f"{len(missing)} missing tensors (e.g. {missing[0]})")
        if unexpected:
            detail.append(f"{len(unexpected)} unexpected tensors (e.g. {unexpected[0]})")
        if shapes:
            k = shapes[0]
            detail.append(f"{len(shapes)} shape mismatches (e.g. {k}: {tuple(state[k].shape)} vs {tuple(own[k].shape)})")
        raise CheckpointError(f"{where} holds weights of a different model{which}: {'; '.join(detail)}.")
    model.load_state_dict(state)
