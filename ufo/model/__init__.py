"""The supernet model: a plain `nn.Module` (no DeepSpeed, MLflow or torch.distributed here)."""

from ufo.model.ffn import SHARED, MultiPathFFN
from ufo.model.heads import ClassificationHead, MarginSoftmax, RetrievalHead, postprocess
from ufo.model.params import ParamCounts, count_params, format_params
from ufo.model.supernet import (
    SupernetViT,
    TaskSlice,
    narrow_attention,
    subnet_args,
    subnet_state_dict,
    supernet_state_from_vit,
    vit_args,
)

__all__ = [
    "SHARED", "MultiPathFFN", "ClassificationHead", "MarginSoftmax", "RetrievalHead", "postprocess",
    "ParamCounts", "count_params", "format_params", "SupernetViT", "TaskSlice", "narrow_attention", "subnet_args",
    "subnet_state_dict", "supernet_state_from_vit", "vit_args",
]
