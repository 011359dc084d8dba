"""The optimizer's fp32 master weights of a DeepSpeed engine: the one place ufo reads DeepSpeed's
private optimizer attributes (pinned: deepspeed==0.19.8 in pyproject.toml).

Each rank's masters are flat fp32 tensors holding the partition it owns (ZeRO 1/2:
`single_partition_of_fp32_groups`; bf16 without ZeRO, DeepSpeed's BF16_Optimizer:
`fp32_groups_flat_partition`; ZeRO-3: `fp32_partitioned_groups_flat`, one per sub-group); fp32
without ZeRO has no masters apart from the parameters themselves. After an optimizer step DeepSpeed
copies the masters into the working (bf16) weights; `refresh_weights` does that copy on demand.
"""

from __future__ import annotations

import torch

DEEPSPEED_VERSION = "0.19.8"  # what these attributes were read off (ufo/placement.py pins the same)


def check_version() -> None:
    """Refuse another DeepSpeed than the one these internals were read off (tests/test_ema.py fails
    when they change under it)."""
    import deepspeed

    from ufo.errors import ConfigError

    if deepspeed.__version__ != DEEPSPEED_VERSION:
        raise ConfigError(f"train.ema: relies on DeepSpeed {DEEPSPEED_VERSION}'s optimizer internals, this is "
                          f"{deepspeed.__version__}; install deepspeed=={DEEPSPEED_VERSION} or leave train.ema off")


def master_flats(engine) -> list[torch.Tensor]:
    """This rank's fp32 master tensors (the parameters themselves under fp32 without ZeRO)."""
    opt = engine.optimizer
    for attr in ("single_partition_of_fp32_groups", "fp32_groups_flat_partition", "fp32_partitioned_groups_flat"):
        flats = getattr(opt, attr, None)
        if flats:
            return [flat for flat in flats if flat is not None]
    return [p for group in opt.param_groups for p in group["params"]]


def refresh_weights(engine) -> None:
    """The working weights from the masters, as DeepSpeed's step leaves them (every rank takes part)."""
    opt = engine.optimizer
    if hasattr(opt, "update_lp_params"):  # ZeRO 1/2 and BF16_Optimizer: copy, then all-gather
        opt.update_lp_params()
    elif hasattr(opt, "_reassign_or_swap_out_partitioned_parameters"):  # ZeRO-3: each sub-group's partition
        for sub_group in range(len(opt.fp32_partitioned_groups_flat)):
            opt._reassign_or_swap_out_partitioned_parameters(sub_group)
    # fp32 without ZeRO: the parameters are the masters


def full_fp32(param: torch.nn.Parameter) -> torch.Tensor:
    """A parameter's whole fp32 master (every rank that holds a part of it takes part)."""
    from deepspeed.utils import safe_get_full_fp32_param

    full = safe_get_full_fp32_param(param)
    return param.detach() if full is None else full


def set_full_fp32(param: torch.nn.Parameter, value: torch.Tensor) -> None:
    """Write a parameter's whole fp32 master (each rank keeps its part)."""
    from deepspeed.utils import safe_set_full_fp32_param

    if hasattr(param, "ds_id") or hasattr(param, "_hp_mapping"):
        safe_set_full_fp32_param(param, value.to(torch.float32))
    else:
        with torch.no_grad():
            param.copy_(value)
