"""The UFO supernet: a timm VisionTransformer whose every FFN is a `MultiPathFFN`, plus task heads.

Shared parts are timm's own modules under timm's names (`patch_embed.proj.weight`,
`blocks.3.attn.qkv.weight`, `norm.weight`), so a task's subnet is a plain timm ViT whose state
dict is a renaming of the supernet's (`subnet_state_dict`).
"""

from __future__ import annotations

import contextlib
import hashlib
from functools import partial
from typing import Any, Callable, ContextManager, Mapping, NamedTuple, Sequence

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from timm.layers import Attention, trunc_normal_
from timm.models.vision_transformer import Block, VisionTransformer, get_init_weights_vit
from torch import nn

from ufo.config import ModelConfig, TaskConfig, UfoConfig, ffns_on_path
from ufo.model.ffn import SHARED, MultiPathFFN, Route
from ufo.model.heads import MarginSoftmax, PartialFC, build_head, fold_bnneck, head_out_dim
from ufo.model.paths import OPEN, PathLogits


# Parameters -> a context in which they are whole and writable (a ZeRO-3 engine's gather); the
# initialisation writes one module at a time through it.
Gather = Callable[[list[nn.Parameter]], ContextManager]


class TaskSlice(NamedTuple):
    """`size` consecutive rows of a micro-batch that belong to `task` and run on `path`, through the
    first `depth` blocks (None: all) with `hidden` FFN units and the first `heads` attention heads
    (None: all): an elastic subnet."""

    task: str
    path: str
    size: int
    depth: int | None = None
    hidden: int | None = None
    # a learned path's open blocks (OPEN in `path`): the step's (Gumbel noise (depth, 2), temperature)
    gate: tuple[torch.Tensor, float] | None = None
    # a classification slice mixed by mixup/cutmix: its soft targets (size, classes), in place of labels
    targets: torch.Tensor | None = None
    heads: int | None = None


def vit_args(model: ModelConfig) -> dict[str, Any]:
    """timm `VisionTransformer` architecture arguments shared by the supernet and every subnet (plain
    JSON: a subnet's config.json holds them). The LayerNorm epsilon is not among them: see `norm_layer`."""
    args = dict(
        img_size=model.img_size,
        patch_size=model.patch_size,
        in_chans=model.in_chans,
        embed_dim=model.embed_dim,
        depth=model.depth,
        num_heads=model.num_heads,
        mlp_ratio=model.mlp_ratio,
        qkv_bias=model.qkv_bias,
        init_values=model.init_values,
        global_pool=model.global_pool,
        class_token=True,
    )
    variants = dict(reg_tokens=model.reg_tokens, no_embed_class=model.no_embed_class, pre_norm=model.pre_norm,
                    fc_norm=model.fc_norm, act_layer=model.act_layer)
    defaults = dict(reg_tokens=0, no_embed_class=False, pre_norm=False, fc_norm=None, act_layer="gelu")
    args.update({k: v for k, v in variants.items() if v != defaults[k]})  # a plain ViT's args stay as they were
    return args


def norm_layer(model: ModelConfig) -> dict[str, Any]:
    """The LayerNorm argument of a ViT whose epsilon is not timm's default (CLIP's 1e-5), else nothing.
    A subnet's config.json carries it through its architecture name (the pretrained model's)."""
    return {} if model.norm_eps == 1e-6 else {"norm_layer": partial(nn.LayerNorm, eps=model.norm_eps)}


def subnet_args(cfg: UfoConfig, task: str, depth: int | None = None, mlp_ratio: float | None = None,
                num_heads: int | None = None) -> dict[str, Any]:
    """Arguments that rebuild `task`'s subnet: `timm.create_model(architecture, **subnet_args(cfg, task))`
    (`VisionTransformer(**...)` for a ViT with timm's LayerNorm epsilon); an elastic subnet keeps the
    first `depth` blocks with FFNs of `mlp_ratio` and the first `num_heads` attention heads (their
    head width stays the supernet's: `narrow_attention`); the task's input size is its own."""
    h, w = cfg.size_of(task)
    args = dict(vit_args(cfg.model), num_classes=head_out_dim(cfg.tasks[task], cfg.model.embed_dim),
                img_size=h if h == w else [h, w])
    if depth is not None:
        args["depth"] = depth
    if mlp_ratio is not None:
        args["mlp_ratio"] = mlp_ratio
    if num_heads is not None:
        args["num_heads"] = num_heads
    return args


def narrow_attention(vit: nn.Module, num_heads: int, head_dim: int) -> nn.Module:
    """`vit` (a timm ViT) with every block's attention made timm's `Attention` of `num_heads` heads of
    `head_dim` each (timm's ViT arguments size a head as embed_dim // num_heads; a subnet with fewer
    heads keeps the supernet's head width). Built on `vit`'s device; returns `vit`."""
    for block in vit.blocks:
        old = block.attn
        block.attn = Attention(old.qkv.in_features, num_heads=num_heads, attn_head_dim=head_dim,
                               qkv_bias=old.qkv.bias is not None, proj_bias=old.proj.bias is not None,
                               device=old.qkv.weight.device)
    return vit


class SupernetBlock(Block):
    """timm's pre-norm block; its FFN takes the routes of this block, its attention their head counts."""

    def forward(self, x: torch.Tensor, routes: Sequence[Route]) -> torch.Tensor:
        x = x + self.drop_path1(self.ls1(self._attention(self.norm1(x), routes)))
        x = x + self.drop_path2(self.ls2(self.mlp(self.norm2(x), routes)))
        return x

    def _attention(self, x: torch.Tensor, routes: Sequence[Route]) -> torch.Tensor:
        """timm's attention; the rows of a route with fewer heads see only the first ones: the other
        heads' outputs are zeroed before the projection, which is exactly the attention of the kept
        heads (their q/k/v rows, the projection's columns of them: what a narrower subnet holds)."""
        attn = self.attn
        if all(r.heads is None for r in routes):
            return attn(x)
        B, N, _ = x.shape
        keep = torch.ones(B, attn.num_heads, 1, 1, dtype=x.dtype, device=x.device)
        for r in routes:
            if r.heads is not None:
                keep[r.start:r.end, r.heads:] = 0
        q, k, v = attn.qkv(x).reshape(B, N, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = attn.q_norm(q), attn.k_norm(k)
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=attn.attn_drop.p if self.training else 0.0)
        out = (out * keep).transpose(1, 2).reshape(B, N, attn.attn_dim)
        return attn.proj_drop(attn.proj(attn.norm(out)))


def ffn_plan(tasks: Sequence[str], held: Sequence[str], paths: Mapping[str, str] | None,
             depth: int) -> list[tuple[bool, tuple[str, ...]]]:
    """Per block: whether it builds FFN-shared, and the held tasks whose FFN-task it builds.

    `paths` None: every FFN. Else only those on the paths: a block's FFN-shared where some task (held
    or not: every rank holds the same shared parts) takes S, a held task's FFN-task where it takes T.
    """
    if paths is None:
        return [(True, tuple(held))] * depth
    return [(any(paths[t][i] == "S" for t in tasks), tuple(t for t in held if paths[t][i] == "T"))
            for i in range(depth)]


def _seed_of(seed: int, name: str) -> int:
    return int.from_bytes(hashlib.blake2b(f"{seed}:{name}".encode(), digest_size=8).digest(), "little") >> 1


_TIMM_INIT = get_init_weights_vit("")


def _timm_init(module: nn.Module, seed: int, name: str) -> None:
    """timm's ViT initialisation of `module`, drawn from the seed of `name` (another module's name
    gives that module's values: how an FFN-task starts as FFN-shared)."""
    torch.manual_seed(_seed_of(seed, name))
    _TIMM_INIT(module, name)


class SupernetViT(VisionTransformer):
    """All tasks' paths in one ViT. `forward(images, slices)` runs a task-grouped micro-batch.

    `held` names the tasks whose FFN-task MLPs and heads this instance builds (default: every
    task): a task-sharded rank holds the shared parts and its own task only. `paths` (default
    None: every FFN) builds only the FFNs on these paths (`ffn_plan`). What is not built is never
    allocated, and every parameter starts with the same values whatever else the instance holds:
    each module is initialised from a seed of its own, drawn from one seed and its name. `centres`
    (task -> (start, count)): the rows of a Partial FC task's class centres this instance holds.
    """

    def __init__(self, tasks: Mapping[str, TaskConfig], task_ffn_init: str = "copy_shared",
                 held: Sequence[str] | None = None, gather: Gather | None = None,
                 paths: Mapping[str, str] | None = None, learned: bool = False,
                 centres: Mapping[str, tuple[int, int]] | None = None, **vit_kwargs):
        held = tuple(tasks) if held is None else tuple(t for t in tasks if t in held)
        seed = int(torch.randint(0, 2**62, (), device="cpu"))  # one draw, whatever this instance holds
        plan = iter(ffn_plan(tuple(tasks), held, paths, vit_kwargs.get("depth", 12)))

        def mlp_layer(in_features: int, hidden_features: int, **kwargs) -> MultiPathFFN:
            shared, on = next(plan)  # timm builds the blocks in order
            return MultiPathFFN(in_features, hidden_features, on, shared=shared, **kwargs)

        super().__init__(
            num_classes=0,
            block_fn=SupernetBlock,
            mlp_layer=mlp_layer,
            weight_init="skip",
            **vit_kwargs,
        )
        self.task_kinds = {name: task.kind for name, task in tasks.items()}
        self.held = held
        self.paths = None if paths is None else {t: paths[t] for t in tasks}
        self.heads = nn.ModuleDict({name: build_head(tasks[name], self.embed_dim, (centres or {}).get(name))
                                    for name in held})
        # train.path_policy learned: each held task's path logits (zeros: both choices equal at the start)
        self.path_logits = nn.ModuleDict({name: PathLogits(len(self.blocks)) for name in held}) if learned else None
        self.path_probs: dict[str, torch.Tensor] = {}  # the latest forward's softmax(logits), with their gradient
        self.pretrained_note = ""  # where pretrained weights came from, what was adapted (ufo.checkpoint)
        self.checkpoint_every = 0  # train.activation_checkpointing: every k-th block recomputed in the backward
        if self.cls_token.is_meta:
            return  # shapes only (parameter counts)
        gather = gather or (lambda params: contextlib.nullcontext())
        devices = [torch.cuda.current_device()] if self.cls_token.is_cuda else []
        with torch.random.fork_rng(devices=devices):
            self._init_shared(seed, gather)
            for task in held:
                self._init_task(seed, task, task_ffn_init == "copy_shared", gather)

    @torch.no_grad()
    def _init_shared(self, seed: int, gather: Gather) -> None:
        """timm's ViT initialisation of every part that is not a task's, one module at a time."""
        with gather([self.pos_embed, self.cls_token]):
            torch.manual_seed(_seed_of(seed, "pos_embed"))
            trunc_normal_(self.pos_embed, std=0.02)
            torch.manual_seed(_seed_of(seed, "cls_token"))
            nn.init.normal_(self.cls_token, std=1e-6)
        for name, module in self.named_modules():
            touched = isinstance(module, nn.Linear) or hasattr(module, "init_weights") or \
                hasattr(module, "reset_parameters")
            if name and touched and not name.startswith("heads") and ".mlp.task" not in name:
                with gather(list(module.parameters())):
                    _timm_init(module, seed, name)

    @torch.no_grad()
    def _init_task(self, seed: int, task: str, copy_shared: bool, gather: Gather) -> None:
        """A task's FFN-task MLPs (FFN-shared's values, UFO's initialisation, or timm's init) and head.

        FFN-shared's values come from its modules' seeds, so a block that does not build FFN-shared
        gives its FFN-task the same start."""
        for i, block in enumerate(self.blocks):
            if task not in block.mlp.task:
                continue
            ffn = block.mlp.task[task]
            with gather(list(ffn.parameters())):
                for sub in ("fc1", "fc2"):
                    _timm_init(getattr(ffn, sub), seed, f"blocks.{i}.mlp.shared.{sub}" if copy_shared
                               else f"blocks.{i}.mlp.task.{task}.{sub}")
        with gather(list(self.heads[task].parameters())):
            for name, module in self.heads[task].named_modules():
                torch.manual_seed(_seed_of(seed, f"heads.{task}.{name}"))
                if isinstance(module, nn.Linear):
                    nn.init.trunc_normal_(module.weight, std=0.02)
                    nn.init.zeros_(module.bias)
                elif isinstance(module, PartialFC):
                    module.init_rows(lambda block: _seed_of(seed, f"heads.{task}.{name}.{block}"))
                elif isinstance(module, MarginSoftmax):
                    nn.init.normal_(module.weight, std=0.02)

    @classmethod
    def from_config(cls, cfg: UfoConfig, held: Sequence[str] | None = None, gather: Gather | None = None,
                    centres: Mapping[str, tuple[int, int]] | None = None) -> "SupernetViT":
        paths = {t: cfg.path_of(t) for t in cfg.tasks} if ffns_on_path(cfg) else None
        model = cls(cfg.tasks, task_ffn_init=cfg.model.task_ffn_init, held=held, gather=gather, paths=paths,
                   centres=centres, learned=cfg.train.path_policy == "learned", drop_path_rate=cfg.model.drop_path_rate,
                   dynamic_img_size=cfg.dynamic_size(), **vit_args(cfg.model), **norm_layer(cfg.model))
        model.checkpoint_every = cfg.train.activation_checkpointing
        return model

    def compile_blocks(self) -> None:
        """torch.compile every block's attention and each of its FFNs, in place (`nn.Module.compile`: the
        parameter names stay), with dynamic shapes: a task's slice has other rows every step, and a
        graph per row count would recompile every step. The routing between the FFNs stays eager."""
        for block in self.blocks:
            block.attn.compile(dynamic=True)
            for ffn in ([block.mlp.shared] if block.mlp.shared is not None else []) + list(block.mlp.task.values()):
                ffn.compile(dynamic=True)

    def lacks(self, task: str, path: str) -> str:
        """What `task` on `path` needs that this supernet does not build ("" if nothing)."""
        for i, (block, letter) in enumerate(zip(self.blocks, path)):
            key = SHARED if letter == "S" else task
            if not block.mlp.has(key):
                what = "FFN-shared" if key is SHARED else f"FFN-task of {task}"
                return (f"block {i} has no {what} (path {path} of task {task}): this supernet builds only the "
                        "FFNs on its configured paths (model.ffns: on_path)")
        return ""

    def routes(self, slices: Sequence[TaskSlice], batch: int,
               gates: Mapping[str, torch.Tensor] | None = None) -> list[list[Route]]:
        """For each block, which FFN each slice's rows take (`gates`: the step's, when the slices are
        one sub-batch of several)."""
        if sum(s.size for s in slices) != batch:
            raise ValueError(f"slices cover {sum(s.size for s in slices)} rows, the batch has {batch}")
        depth = len(self.blocks)
        bounds, start = [], 0
        for s in slices:
            self._check(s)
            bounds.append((start, start + s.size))
            start += s.size
        gates = self._gates(slices) if gates is None else gates
        return [[Route(SHARED if s.path[i] == "S" else s.task, a, b, s.hidden,
                       gates[s.task][i] if s.path[i] == OPEN else None, s.heads) for s, (a, b) in zip(slices, bounds)]
                for i in range(depth)]

    def _check(self, s: TaskSlice) -> None:
        """A slice this supernet can run, or the error that says why not."""
        depth = len(self.blocks)
        if s.task not in self.task_kinds:
            raise KeyError(f"unknown task {s.task!r}; the supernet has {', '.join(self.task_kinds)}")
        if s.task not in self.held:
            raise KeyError(f"task {s.task!r} is not held here (task-sharded: this supernet holds "
                           f"{', '.join(self.held)})")
        if len(s.path) != depth or set(s.path) - {"S", "T", OPEN}:
            raise ValueError(f"path {s.path!r} for task {s.task!r} is not {depth} letters of S/T")
        if OPEN in s.path and (s.gate is None or self.path_logits is None):
            raise ValueError(f"path {s.path!r} of task {s.task!r} has open blocks ({OPEN}) but "
                             + ("no gate" if self.path_logits is not None else "this supernet learns no path"))
        if s.depth is not None and not 1 <= s.depth <= depth:
            raise ValueError(f"elastic depth {s.depth} for task {s.task!r} is not in 1..{depth}")
        width = self.blocks[0].mlp.hidden_features
        if s.hidden is not None and not 1 <= s.hidden <= width:
            raise ValueError(f"elastic FFN width {s.hidden} for task {s.task!r} is not in 1..{width}")
        heads = self.blocks[0].attn.num_heads
        if s.heads is not None and not 1 <= s.heads <= heads:
            raise ValueError(f"elastic head count {s.heads} for task {s.task!r} is not in 1..{heads}")
        if self.paths is not None and s.path != self.paths[s.task] and OPEN not in s.path:
            missing = self.lacks(s.task, s.path)
            if missing:
                raise KeyError(missing)

    def _gates(self, slices: Sequence[TaskSlice]) -> dict[str, torch.Tensor]:
        """Each gated slice's straight-through gates (depth, 2) from its task's path logits, which are
        called for every gated slice, empty or not, so every rank calls the same modules."""
        gates = {}
        self.path_probs = {}
        for s in slices:
            if s.gate is not None and self.path_logits is not None:
                gates[s.task], self.path_probs[s.task] = self.path_logits[s.task](*s.gate)
        return gates

    def forward_features(self, images: torch.Tensor | Sequence[torch.Tensor],
                         slices: Sequence[TaskSlice]) -> torch.Tensor:
        """images -> pooled features (B, embed_dim), the slices' rows in order.

        `images` is one (B, C, H, W) batch, or one (rows, C, H, W) tensor per slice when the tasks'
        input sizes differ: the slices of one size then run through the blocks together, a sub-batch
        per size in the order the sizes first appear. Every rank of a run has the same tasks at the
        same sizes (empty slices included), so every rank calls the same modules in the same order.
        """
        if isinstance(images, torch.Tensor):
            return self.head_drop(self._trunk(images, slices, self.routes(slices, images.shape[0])))
        if len(images) != len(slices):
            raise ValueError(f"{len(images)} image tensors for {len(slices)} slices: give one per slice")
        for x, s in zip(images, slices):
            if x.shape[0] != s.size:
                raise ValueError(f"slice of task {s.task!r} has {s.size} rows, its images {x.shape[0]}")
        for s in slices:
            self._check(s)
        gates = self._gates(slices)  # once per step: a task's gates are the same in every sub-batch
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, x in enumerate(images):
            groups.setdefault(tuple(x.shape[-2:]), []).append(i)
        pooled: list[torch.Tensor] = list(images)
        for members in groups.values():
            sub = [slices[i] for i in members]
            rows = self._trunk(torch.cat([images[i] for i in members]), sub,
                               self.routes(sub, sum(s.size for s in sub), gates))
            for i, part in zip(members, rows.split([s.size for s in sub])):
                pooled[i] = part
        # one head_drop over every row: what the heads read (and a forward hook captures) in slice order
        return self.head_drop(torch.cat(pooled))

    def _pos_embed(self, x: torch.Tensor) -> torch.Tensor:
        if self.dynamic_img_size and x.shape[0] == 0:  # timm's view(B, -1, C) cannot size zero rows
            return super()._pos_embed(torch.cat([x, x.new_zeros(1, *x.shape[1:])]))[:0]
        return super()._pos_embed(x)

    def _trunk(self, images: torch.Tensor, slices: Sequence[TaskSlice], routes: list[list[Route]]) -> torch.Tensor:
        """Images of one size -> pooled, normed features (timm's forward_features and forward_head
        up to head_drop), each slice's rows on its route."""
        x = self.patch_embed(images)
        x = self._pos_embed(x)
        x = self.patch_drop(x)
        x = self.norm_pre(x)
        recompute = self.checkpoint_every and self.training and torch.is_grad_enabled()
        for i, (block, block_routes) in enumerate(zip(self.blocks, routes)):
            run = _checkpointed if recompute and i % self.checkpoint_every == 0 else _called
            if all(s.depth is None or s.depth > i for s in slices):
                x = run(block, x, block_routes)
            else:
                x = self._partial_block(block, x, block_routes, [s.depth is None or s.depth > i for s in slices], run)
        x = self.norm(x)
        return self.fc_norm(self.pool(x))

    @staticmethod
    def _partial_block(block: nn.Module, x: torch.Tensor, routes: Sequence[Route], active: Sequence[bool],
                       run: Callable | None = None):
        """Run a block on the rows of the slices still `active` at its depth; the others pass unchanged.

        Every slice keeps its route (with zero rows when inactive), so the same modules are called
        whatever the depths, as ZeRO-3 requires of every rank.
        """
        rows, moved, start = [], [], 0
        for route, on in zip(routes, active):
            n = route.end - route.start if on else 0
            rows.append(x[route.start:route.start + n])
            moved.append(route._replace(start=start, end=start + n))
            start += n
        out = (run or _called)(block, torch.cat(rows), moved)
        pieces, start = [], 0
        for route, on in zip(routes, active):
            n = route.end - route.start
            if on:
                pieces.append(out[start:start + n])
                start += n
            else:
                pieces.append(x[route.start:route.end])
        # out[:0] keeps the block in the graph when no slice is active: its parameters still get a
        # (zero) gradient, so every rank reduces the same tensors whatever its tasks' depths
        return torch.cat(pieces + [out[:0]])

    def forward(self, images: torch.Tensor, slices: Sequence[TaskSlice], labels: torch.Tensor | None = None,
                reduction: str = "mean", hits: bool = False) -> list:
        """Per slice: the head's output (logits or normalized embedding), or its loss given labels
        (with `hits`: a (loss, rows classified right) pair).

        A slice may be empty: its FFNs and head are still called (on zero rows), so that every
        rank of a distributed run calls the same modules in the same order whatever its data.
        """
        return apply_heads(self.heads, self.forward_features(images, slices), slices, labels, reduction, hits)

    def forward_task(self, images: torch.Tensor, task: str, path: str, depth: int | None = None,
                     hidden: int | None = None, heads: int | None = None) -> torch.Tensor:
        """The whole batch as one task on one path (of an elastic depth, FFN width and head count, if given)."""
        return self(images, [TaskSlice(task, path, images.shape[0], depth, hidden, heads=heads)])[0]


def _called(block: nn.Module, x: torch.Tensor, routes: Sequence[Route]) -> torch.Tensor:
    return block(x, routes)


def _checkpointed(block: nn.Module, x: torch.Tensor, routes: Sequence[Route]) -> torch.Tensor:
    """The block keeping only its input: its activations are recomputed in the backward (torch's
    non-reentrant checkpoint: the RNG of drop path is replayed, gates' gradients flow, ZeRO-3 fetches
    the block's parameters again for the recompute)."""
    return torch.utils.checkpoint.checkpoint(block, x, routes, use_reentrant=False)


def apply_heads(heads: nn.ModuleDict, features: torch.Tensor, slices: Sequence[TaskSlice],
                labels: torch.Tensor | None = None, reduction: str = "mean", hits: bool = False) -> list:
    """Each slice's rows of the pooled features through its task's head (and loss, given labels)."""
    results, start = [], 0
    for s in slices:
        head = heads[s.task]
        if labels is None:
            results.append(head(features[start:start + s.size]))
        else:
            y = labels[start:start + s.size]
            loss, out = head.losses(features[start:start + s.size], y, reduction, s.targets)
            results.append((loss, head.hits(out, y)) if hits else loss)
        start += s.size
    return results


def subnet_state_dict(state: Mapping[str, torch.Tensor], task: str, path: str, deployed_head: str,
                      depth: int | None = None, hidden: int | None = None,
                      heads: tuple[int, int] | None = None) -> dict[str, torch.Tensor]:
    """Rename a supernet state dict into the timm ViT state dict of `task` on `path`.

    Keeps the shared parts, each block's FFN on the path, and the task head's deployed layer
    (as timm's `head`, a BNNeck after it folded in); drops every other FFN and head. An elastic subnet keeps only the first
    `depth` blocks, the first `hidden` units of each FFN (rows of fc1, columns of fc2) and, `heads`
    (kept, of all), the first attention heads (their rows of q, k and v, the projection's columns).
    """
    out = {}
    head_prefix = f"heads.{task}.{deployed_head}."
    for name, tensor in state.items():
        if name.startswith("path_logits."):  # a learned path's logits: the path is chosen, not deployed
            continue
        if name.startswith("heads."):
            if name.startswith(head_prefix):
                out["head." + name[len(head_prefix):]] = tensor
            continue
        parts = name.split(".")
        if parts[0] == "blocks" and depth is not None and int(parts[1]) >= depth:
            continue
        if heads is not None and parts[0] == "blocks" and parts[2] == "attn":
            out[name] = _kept_heads(name, tensor, *heads)
            continue
        if len(parts) > 3 and parts[0] == "blocks" and parts[2] == "mlp":
            block, rest = int(parts[1]), parts[3:]
            if path[block] == "S" and rest[0] == "shared":
                key = ".".join(parts[:3] + rest[1:])
            elif path[block] == "T" and rest[0] == "task" and rest[1] == task:
                key = ".".join(parts[:3] + rest[2:])
            else:
                continue
            if hidden is not None and key.endswith(("fc1.weight", "fc1.bias")):
                tensor = tensor[:hidden]
            elif hidden is not None and key.endswith("fc2.weight"):
                tensor = tensor[:, :hidden]
            out[key] = tensor.contiguous()
            continue
        out[name] = tensor
    neck = {k[len(f"heads.{task}.neck."):]: v for k, v in state.items() if k.startswith(f"heads.{task}.neck.")}
    if "running_var" in neck:  # a BNNeck after the deployed layer: folded into it, so the subnet stays a plain ViT
        out["head.weight"], out["head.bias"] = fold_bnneck(out["head.weight"], out["head.bias"], neck)
    return out


def _kept_heads(name: str, tensor: torch.Tensor, kept: int, heads: int) -> torch.Tensor:
    """An attention tensor of the first `kept` of `heads` heads: q/k/v rows (qkv.weight and .bias are
    [q; k; v], each head after head), the projection's input columns; the rest as it is."""
    if name.endswith(("qkv.weight", "qkv.bias")):
        per_head = tensor.reshape(3, heads, -1, *tensor.shape[1:])
        return per_head[:, :kept].reshape(-1, *tensor.shape[1:]).contiguous()
    if name.endswith("proj.weight"):
        return tensor[:, :tensor.shape[1] // heads * kept].contiguous()
    return tensor


def supernet_state_from_vit(vit_state: Mapping[str, torch.Tensor],
                            supernet: SupernetViT) -> dict[str, torch.Tensor]:
    """Map a plain ViT state dict (timm names) onto the supernet: every FFN it builds takes that block's MLP.

    Heads are not taken (tasks have their own); what the ViT lacks is reported by the caller.
    """
    out = {}
    for name, tensor in vit_state.items():
        parts = name.split(".")
        if name.startswith("head.") or name.startswith("head_"):
            continue
        if len(parts) > 3 and parts[0] == "blocks" and parts[2] == "mlp" and int(parts[1]) < len(supernet.blocks):
            prefix, rest = ".".join(parts[:3]), ".".join(parts[3:])
            ffn = supernet.blocks[int(parts[1])].mlp
            if ffn.shared is not None:
                out[f"{prefix}.shared.{rest}"] = tensor
            for task in ffn.task:
                out[f"{prefix}.task.{task}.{rest}"] = tensor.clone()
            continue
        out[name] = tensor
    return out
