"""Task-grouped, sharded WebDataset data: writing shards, inspecting them, and the per-rank loader."""

from ufo.data.loader import MixedLoader, TaskLoader, build_transform, endless, task_loader
from ufo.data.shards import Shard, label_counts, read_manifest, resolve_shards, write_task_shards
from ufo.data.sources import open_source

__all__ = ["MixedLoader", "TaskLoader", "build_transform", "endless", "task_loader", "Shard", "label_counts",
           "read_manifest", "resolve_shards", "write_task_shards", "open_source"]
