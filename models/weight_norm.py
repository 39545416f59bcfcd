"""EDM2's forced weight normalisation, applied to the weights the optimizer owns, whatever the engine.

EDM2 keeps every MPConv weight on the unit sphere per output channel (unit RMS over its fan-in), so Adam's updates
turn it and never grow it: the effective learning rate stays the scheduled one.  The net's forward normalises in
the graph only (models/edm2.py); the trainer calls `normalize_forced_weights_` once before the first step and
after every optimizer step, on the copy the optimizer updates:
  * one process or DDP: the module's parameters (every replica holds and updates the full weight);
  * DeepSpeed ZeRO-1/2: the optimizer updates its own fp32 master partition and writes it back over the module's
    parameters after each step, so normalising the module alone would be undone at the next step.  Each rank
    scales the fragments of the master partition it owns (DeepSpeed links every parameter to its fragment:
    `param._hp_mapping`) and its module copy by the same per-channel norms.  ZeRO-1/2 keep the full parameters
    on every rank, and the engine runs in fp32 (training/train.py checks it), so after a step the module copy is
    an exact replica of the master: each rank reads every channel's norm off it, with no communication, and the
    norms are bit for bit those of the one-process trainer.

The norm is models.edm2.rms_norm's (eps + RMS over the fan-in), so the stored weight is exactly what EDM2's
in-place `weight.copy_(normalize(weight))` writes.
"""

from __future__ import annotations

import torch

from models.edm2 import MPConv, rms_norm


def forced_weights(net: torch.nn.Module) -> list[torch.nn.Parameter]:
    """Every weight EDM2 renormalises (each MPConv's, in module order), whatever the family."""
    return [m.weight for m in net.modules() if isinstance(m, MPConv)]


@torch.no_grad()
def normalize_forced_weights_(weights: list[torch.nn.Parameter]) -> None:
    """Renormalise `weights` (forced_weights of the unwrapped net) in place where the optimizer keeps them."""
    if any(hasattr(w, "ds_id") for w in weights):
        raise NotImplementedError("forced weight normalisation under DeepSpeed ZeRO stage 3 (parameters "
                                  "partitioned) is not supported: use ZeRO stage 1 or 2")
    for w in weights:
        norms = rms_norm(w.to(torch.float32))
        master = getattr(w, "_hp_mapping", None)  # ZeRO-1/2: this rank's fragment of the fp32 master, if any
        if master is not None:
            fragment = master.get_hp_fragment()
            flat_norms = norms.reshape(-1)
            for channel, count, part in channel_blocks(master.lp_fragment_address.start, fragment.numel(),
                                                       w[0].numel()):
                block = fragment[part].view(count, -1)
                block.div_(flat_norms[channel:channel + count, None].to(block.device, block.dtype))
        w.copy_(w / norms.to(w.dtype))


def channel_rms(weight: torch.Tensor) -> torch.Tensor:
    """RMS of each output channel of a weight over its fan-in (1 for a normalised MPConv weight, up to eps)."""
    return weight.detach().to(torch.float32).flatten(1).square().mean(1).sqrt()


def channel_blocks(start: int, numel: int, fan_in: int):
    """Split the flat range [start, start + numel) of a weight [C_out, fan_in] into runs of whole channels and
    partial ones (a fragment's boundary may cut a channel): (first channel, channel count, slice of the range),
    the slice covering count·fan_in elements, or for a partial channel its part of the range."""
    end, pos = start + numel, start
    while pos < end:
        channel = pos // fan_in
        if pos % fan_in or end - pos < fan_in:  # a partial channel: the fragment's first or last
            stop = min(end, (channel + 1) * fan_in)
            yield channel, 1, slice(pos - start, stop - start)
        else:
            count = (end - pos) // fan_in
            stop = pos + count * fan_in
            yield channel, count, slice(pos - start, stop - start)
        pos = stop
