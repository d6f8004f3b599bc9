"""Checkpoints made from the session's smoke checkpoint for tests that need a worse network."""

from __future__ import annotations

import torch


def rotate_head(src, dst) -> None:
    """The same checkpoint with its classifier's rows rotated: class c answers as c + 1.

    Its INT8 still matches its FP32 (both are equally wrong), so only a comparison with another
    network, or with the labels, can tell.
    """
    payload = torch.load(src, map_location="cpu", weights_only=True)
    for state in (payload["float_state"], payload["qat_state"]):
        for k, t in state.items():
            if "fc" in k and t.ndim >= 1 and t.shape[0] == 10:  # weight, bias and per-channel scales
                state[k] = torch.roll(t, 1, dims=0)
    torch.save(payload, dst)
