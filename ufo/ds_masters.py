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


def full_optimizer_state(engine, param: torch.nn.Parameter) -> dict[str, torch.Tensor]:
    """A parameter's whole fp32 optimizer state by key (Adam's moments, SGD's momentum); {} before the
    first step. ZeRO 1/2: through DeepSpeed's fragment map (every rank holding a part takes part);
    fp32 without ZeRO: the torch optimizer's own."""
    if hasattr(param, "_hp_mapping"):
        mapping = param._hp_mapping
        if mapping is not None and not mapping.optim_fragment:
            link_optimizer_states(engine)
        keys = mapping.get_optim_state_keys() if mapping is not None and mapping.optim_fragment else []
        return {key: param.get_full_hp_param(key).detach().float().clone() for key in keys}
    state = engine.optimizer.state.get(param, {})
    return {k: v.detach().float().clone() for k, v in state.items() if torch.is_tensor(v) and v.dim() > 0}


def set_full_optimizer_state(engine, param: torch.nn.Parameter, state: dict[str, torch.Tensor]) -> None:
    """Write a parameter's whole optimizer state (each rank keeps its part); keys it has no state for
    yet (before the first step) are created only without ZeRO, as the torch optimizer creates them."""
    from deepspeed.utils import safe_set_full_optimizer_state

    if hasattr(param, "_hp_mapping"):
        mapping = param._hp_mapping
        if mapping is not None and not mapping.optim_fragment:
            link_optimizer_states(engine)
        have = set(mapping.get_optim_state_keys()) if mapping is not None and mapping.optim_fragment else set()
        for key, value in state.items():
            if key in have:
                safe_set_full_optimizer_state(param, value.to(param.device).float(), key)
        return
    own = engine.optimizer.state[param]
    for key, value in state.items():
        own[key] = value.to(param.device, param.dtype).clone().view(param.shape)


def link_optimizer_states(engine) -> None:
    """ZeRO 1/2 link each parameter to its optimizer state once, inside the first step of the first
    group, when the other groups have no state yet: linked again, now that all have (a no-op before
    the first step)."""
    optimizer = engine.optimizer
    if hasattr(optimizer, "_lazy_init_hp_params_optimizer_state") and optimizer.optimizer.state:
        optimizer._hp_optimizer_states_linked = False
        optimizer._lazy_init_hp_params_optimizer_state()
