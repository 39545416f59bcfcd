"""Run `python -m training.train ARGS` as on a GPU: the no-argument `torch.is_autocast_enabled()` (CUDA's autocast
state, which DeepSpeed's engine forward asks) answers with the CPU autocast's state, and every MPConv's output
dtype is recorded in $AUTOCAST_PROBE_OUT.<rank>.json (tests/test_autocast_engines.py launches it)."""

import json
import os
import sys

import torch

cpu_autocast_state = torch.is_autocast_enabled


def autocast_state_as_on_a_gpu(device_type=None):
    return cpu_autocast_state("cpu" if device_type is None else device_type)


torch.is_autocast_enabled = autocast_state_as_on_a_gpu
seen: set[str] = set()


def record_dtype(module, args, output):
    if type(module).__name__ == "MPConv" and output.device.type != "meta":  # not the FLOP count's forward
        seen.add(str(output.dtype))


torch.nn.modules.module.register_module_forward_hook(record_dtype)

from training.train import main  # noqa: E402  (after the patch: nothing may hold the original first)

status = main(sys.argv[1:])
with open(f"{os.environ['AUTOCAST_PROBE_OUT']}.{os.environ.get('RANK', '0')}.json", "w") as f:
    json.dump(sorted(seen), f)
sys.exit(status)
