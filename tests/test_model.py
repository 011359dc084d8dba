import math

import pytest
import torch
import torch.nn.functional as F
from timm.layers import Mlp
from timm.models.vision_transformer import VisionTransformer

from ufo.config import config_from_dict
from ufo.model import (
    MarginSoftmax,
    SupernetViT,
    TaskSlice,
    count_params,
    subnet_args,
    subnet_state_dict,
    vit_args,
)
from ufo.model.paths import PathPolicy


@pytest.fixture
def tiny_cfg(tiny_cfg):
    """Every FFN (model.ffns: all): these tests take paths other than the configured ones."""
    from tiny import with_every_ffn

    return with_every_ffn(tiny_cfg)


@pytest.fixture
def supernet(tiny_cfg):
    torch.manual_seed(0)
    return SupernetViT.from_config(tiny_cfg).eval()


def images(n, cfg, seed=0):
    m = cfg.model
    return torch.randn(n, m.in_chans, m.img_size, m.img_size, generator=torch.Generator().manual_seed(seed))


def test_shared_parameters_keep_timm_names(supernet, tiny_cfg):
    plain = VisionTransformer(**vit_args(tiny_cfg.model), num_classes=0)
    plain_names = {n for n in plain.state_dict() if ".mlp." not in n}
    super_names = set(supernet.state_dict())
    assert plain_names <= super_names
    assert "blocks.3.attn.qkv.weight" in super_names and "patch_embed.proj.weight" in super_names
    for i in range(tiny_cfg.model.depth):
        for part in ("fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"):
            assert f"blocks.{i}.mlp.shared.{part}" in super_names
            for task in tiny_cfg.tasks:
                assert f"blocks.{i}.mlp.task.{task}.{part}" in super_names
    others = super_names - plain_names
    assert all(".mlp.shared." in n or ".mlp.task." in n or n.startswith("heads.") for n in others)


def test_task_ffns_start_as_copies_of_shared(tiny_cfg):
    cfg = tiny_cfg.model_copy(update={"model": tiny_cfg.model.model_copy(update={"task_ffn_init": "copy_shared"})})
    model = SupernetViT.from_config(cfg)
    for block in model.blocks:
        for ffn in block.mlp.task.values():
            for a, b in zip(ffn.parameters(), block.mlp.shared.parameters()):
                assert torch.equal(a, b)


def test_grouped_forward_equals_per_task_forwards(supernet, tiny_cfg):
    sizes = {"face": 3, "person": 2, "digits": 4}
    slices = [TaskSlice(t, tiny_cfg.path_of(t), n) for t, n in sizes.items()]
    x = images(sum(sizes.values()), tiny_cfg)
    with torch.no_grad():
        grouped = supernet(x, slices)
        start = 0
        for s, out in zip(slices, grouped):
            alone = supernet.forward_task(x[start:start + s.size], s.task, s.path)
            torch.testing.assert_close(out, alone, atol=1e-5, rtol=1e-5)
            start += s.size


def test_tasks_of_different_input_sizes_run_as_sub_batches_each_as_it_would_alone(tiny_cfg):
    raw = tiny_cfg.to_dict()
    raw["tasks"]["person"]["img_size"] = [16, 8]  # 4 x 2 patches; face keeps model.img_size, digits 3 x 3
    raw["tasks"]["digits"]["img_size"] = 12
    cfg = config_from_dict(raw, "test")
    torch.manual_seed(0)
    model = SupernetViT.from_config(cfg).eval()
    assert model.pos_embed.shape[1] == 1 + 16 and cfg.dynamic_size()
    g = torch.Generator().manual_seed(1)
    rows = {"face": 3, "person": 2, "digits": 4}
    x = [torch.randn(n, 3, *cfg.size_of(t), generator=g) for t, n in rows.items()]
    slices = [TaskSlice(t, cfg.path_of(t), n) for t, n in rows.items()]
    seen = []
    model.head_drop.register_forward_hook(lambda _, __, out: seen.append(out.shape[0]))
    outs = model(x, slices)
    assert seen == [9]  # the heads read every row at once, in slice order, after the sub-batches
    for xi, s, out in zip(x, slices, outs):
        alone = model.forward_task(xi, s.task, s.path)
        torch.testing.assert_close(out, alone, atol=1e-5, rtol=1e-5)
    # the position embedding is resampled per size and learns from every task
    sum(o.sum() for o in outs).backward()
    assert model.pos_embed.grad.abs().sum() > 0
    # an empty slice still runs its sizes' modules on zero rows; a tensor per slice is required
    outs = model([x[0], x[1][:0], x[2]], [slices[0], slices[1]._replace(size=0), slices[2]])
    assert outs[1].shape == (0, model.heads["person"].embed.out_features)
    with pytest.raises(ValueError, match="2 image tensors for 3 slices"):
        model(x[:2], slices)
    with pytest.raises(ValueError, match="slice of task 'person' has 5 rows, its images 2"):
        model(x, [slices[0], slices[1]._replace(size=5), slices[2]])


def test_paths_change_the_output(supernet, tiny_cfg):
    x = images(2, tiny_cfg)
    with torch.no_grad():
        a = supernet.forward_task(x, "digits", "SSSS")
        b = supernet.forward_task(x, "digits", "SSST")
    assert (a - b).abs().max() > 1e-4


def calls_per_ffn(model):
    calls = {}
    for name, module in model.named_modules():
        if isinstance(module, Mlp):
            module.register_forward_hook(lambda m, i, o, name=name: calls.__setitem__(name, calls.get(name, 0) + 1))
    return calls


def test_each_used_ffn_runs_once_and_unused_ffns_never(supernet, tiny_cfg):
    # face SSTT, person STST, digits TSSS: in block 0 face and person share FFN-shared but are
    # not adjacent to digits' rows; every used FFN must be one call, every other FFN none.
    slices = [TaskSlice("face", "SSTT", 2), TaskSlice("digits", "TSSS", 3), TaskSlice("person", "STST", 2)]
    calls = calls_per_ffn(supernet)
    supernet.train()
    losses = supernet(images(7, tiny_cfg), slices, torch.tensor([0, 1, 2, 3, 4, 5, 6]))
    sum(losses).backward()
    expected = {}
    for i in range(tiny_cfg.model.depth):
        for s in slices:
            name = f"blocks.{i}.mlp.shared" if s.path[i] == "S" else f"blocks.{i}.mlp.task.{s.task}"
            expected[name] = 1
    assert calls == expected
    for name, param in supernet.named_parameters():
        ffn = name.rsplit(".", 2)[0]
        if ".mlp." in name:
            assert (param.grad is not None) == (ffn in expected), name


def test_slices_must_cover_the_batch(supernet, tiny_cfg):
    with pytest.raises(ValueError, match="cover 3 rows"):
        supernet(images(4, tiny_cfg), [TaskSlice("face", "SSTT", 3)])
    with pytest.raises(KeyError, match="unknown task"):
        supernet(images(2, tiny_cfg), [TaskSlice("cars", "SSTT", 2)])
    with pytest.raises(ValueError, match="not 4 letters"):
        supernet(images(2, tiny_cfg), [TaskSlice("face", "SST", 2)])


def test_heads_outputs(supernet, tiny_cfg):
    x = images(3, tiny_cfg)
    with torch.no_grad():
        logits = supernet.forward_task(x, "digits", "SSSS")
        face = supernet.forward_task(x, "face", "SSSS")
        person = supernet.forward_task(x, "person", "SSSS")
    assert logits.shape == (3, 10)
    assert face.shape == (3, 24) and person.shape == (3, tiny_cfg.model.embed_dim)
    torch.testing.assert_close(face.norm(dim=-1), torch.ones(3))


def test_classification_loss_is_cross_entropy(supernet, tiny_cfg):
    x, y = images(4, tiny_cfg), torch.tensor([1, 2, 3, 9])
    with torch.no_grad():
        logits = supernet.forward_task(x, "digits", "TSSS")
        (loss,) = supernet(x, [TaskSlice("digits", "TSSS", 4)], y)
    torch.testing.assert_close(loss, F.cross_entropy(logits, y))


@pytest.mark.parametrize("kind,margin", [("cosface", 0.35), ("arcface", 0.5)])
def test_margin_softmax_against_its_formula(kind, margin):
    torch.manual_seed(0)
    head = MarginSoftmax(dim=6, num_classes=5, kind=kind, scale=10.0, margin=margin)
    emb = F.normalize(torch.randn(4, 6), dim=-1)
    y = torch.tensor([0, 3, 4, 3])
    w = F.normalize(head.weight.detach(), dim=-1)
    expected = 0.0
    for e, label in zip(emb, y.tolist()):
        cos = [float(e @ w[c]) for c in range(5)]
        if kind == "cosface":
            target = cos[label] - margin
        else:
            theta = math.acos(cos[label])
            target = (math.cos(theta + margin) if theta + margin < math.pi
                      else cos[label] - math.sin(math.pi - margin) * margin)
        logits = [10.0 * (target if c == label else cos[c]) for c in range(5)]
        expected += -logits[label] + math.log(sum(math.exp(v) for v in logits))
    assert head(emb, y).item() == pytest.approx(expected / 4, rel=1e-5)


def test_param_counts_add_up(supernet, tiny_cfg):
    paths = {t: tiny_cfg.path_of(t) for t in tiny_cfg.tasks}
    counts = count_params(supernet, paths)
    assert counts.total == sum(p.numel() for p in supernet.parameters())
    assert counts.total == counts.shared + sum(t.own for t in counts.tasks)
    for t in counts.tasks:
        plain = VisionTransformer(**subnet_args(tiny_cfg, t.task))
        assert t.subnet == sum(p.numel() for p in plain.parameters())


def test_subnet_state_dict_keeps_the_path(supernet, tiny_cfg):
    state = supernet.state_dict()
    sub = subnet_state_dict(state, "face", "SSTT", "embed")
    assert torch.equal(sub["blocks.0.mlp.fc1.weight"], state["blocks.0.mlp.shared.fc1.weight"])
    assert torch.equal(sub["blocks.2.mlp.fc1.weight"], state["blocks.2.mlp.task.face.fc1.weight"])
    assert torch.equal(sub["head.weight"], state["heads.face.embed.weight"])
    plain = VisionTransformer(**subnet_args(tiny_cfg, "face"))
    assert set(sub) == set(plain.state_dict())


def test_empty_slices_touch_their_modules_and_add_nothing(supernet, tiny_cfg):
    # what a task-parallel rank runs: its own rows, and an empty slice of every other task
    calls = calls_per_ffn(supernet)
    x, y = images(3, tiny_cfg), torch.tensor([1, 2, 3])
    slices = [TaskSlice("face", "SSTT", 0), TaskSlice("person", "STST", 0), TaskSlice("digits", "TSSS", 3)]
    losses = supernet(x, slices, y, reduction="sum")
    assert [loss.item() for loss in losses[:2]] == [0.0, 0.0]
    torch.testing.assert_close(losses[2], supernet(x, [TaskSlice("digits", "TSSS", 3)], y, reduction="sum")[0])
    assert "blocks.2.mlp.task.face" in calls and "blocks.1.mlp.task.person" in calls  # called on zero rows
    sum(losses).backward()
    assert torch.count_nonzero(supernet.heads["face"].embed.weight.grad) == 0  # a zero gradient, not None


def test_elastic_slices_of_different_depths_and_widths_in_one_batch(tiny_cfg):
    """One micro-batch whose slices stop at different depths with different FFN widths gives each
    slice what it gets alone, and the narrow FFN is the timm Mlp of the first hidden units."""
    from timm.layers import Mlp

    from ufo.model import SupernetViT, TaskSlice
    from ufo.model.ffn import run_mlp

    torch.manual_seed(0)
    model = SupernetViT.from_config(tiny_cfg).eval()
    x = torch.randn(7, 3, 16, 16)
    slices = [TaskSlice("face", "SSTT", 2, 2, 16), TaskSlice("person", "STST", 3, None, 40),
              TaskSlice("digits", "TSSS", 2, 3, None)]
    with torch.no_grad():
        together = model(x, slices)
        start = 0
        for s, out in zip(slices, together):
            alone = model.forward_task(x[start:start + s.size], s.task, s.path, s.depth, s.hidden)
            assert torch.allclose(out, alone, atol=1e-6), s
            start += s.size
        full = model.forward_task(x[:2], "face", "SSTT")
        assert not torch.allclose(together[0], full, atol=1e-3)  # depth 2 and width 16 really differ
        mlp = model.blocks[0].mlp.shared
        narrow = Mlp(32, 16)
        narrow.fc1.weight.copy_(mlp.fc1.weight[:16])
        narrow.fc1.bias.copy_(mlp.fc1.bias[:16])
        narrow.fc2.weight.copy_(mlp.fc2.weight[:, :16])
        narrow.fc2.bias.copy_(mlp.fc2.bias)
        tokens = torch.randn(3, 5, 32)
        assert torch.allclose(run_mlp(mlp, tokens, 16), narrow(tokens), atol=1e-6)


def test_on_path_builds_only_the_ffns_on_the_paths_with_the_values_of_the_whole(tiny_cfg):
    # face SSTT, person STST, digits TSSS
    on_path = tiny_cfg.model_copy(update={"model": tiny_cfg.model.model_copy(update={"ffns": "on_path"})})
    torch.manual_seed(0)
    whole = SupernetViT.from_config(tiny_cfg).eval()
    names = {}
    for held in (None, ["person"]):
        torch.manual_seed(0)
        model = SupernetViT.from_config(on_path, held=held).eval()
        ffns = [(block.mlp.shared is not None, sorted(block.mlp.task)) for block in model.blocks]
        names[str(held)] = ffns
        for name, tensor in model.state_dict().items():  # the same start as the whole supernet
            assert torch.equal(tensor, whole.state_dict()[name]), name
    assert names["None"] == [(True, ["digits"]), (True, ["person"]), (True, ["face"]), (True, ["face", "person"])]
    assert names["['person']"] == [(True, []), (True, ["person"]), (True, []), (True, ["person"])]
    x = images(3, tiny_cfg)
    with torch.no_grad():
        assert torch.equal(model.forward_task(x, "person", "STST"), whole.forward_task(x, "person", "STST"))
        assert model.forward_task(x, "person", "SSST").shape == (3, 32)  # another path over built FFNs
        with pytest.raises(KeyError, match="block 0 has no FFN-task of person"):
            model.forward_task(x, "person", "TTST")
    sizes = {n: p.numel() for n, p in whole.named_parameters()}
    ffn = sum(v for n, v in sizes.items() if n.startswith("blocks.0.mlp.shared."))
    assert sum(p.numel() for p in model.parameters()) == \
        sum(v for n, v in sizes.items() if ".mlp." not in n and not n.startswith("heads.")) + \
        sum(v for n, v in sizes.items() if n.startswith("heads.person.")) + 6 * ffn  # 4 shared + 2 own
    all_s = tiny_cfg.model_copy(update={"tasks": {t: c.model_copy(update={"path": "SSSS"})
                                                  for t, c in tiny_cfg.tasks.items()}})
    all_s = all_s.model_copy(update={"model": on_path.model})
    assert all(not b.mlp.task for b in SupernetViT.from_config(all_s).blocks)  # no FFN-task at all


def test_sampled_paths_are_seeded_per_step_and_task():
    policy = PathPolicy("sample", {"a": "SSSSSSSS", "b": "TTTTTTTT"}, seed=3, p_task=0.5)
    assert policy.paths_at(7) == PathPolicy("sample", {"a": "SSSSSSSS", "b": "TTTTTTTT"}, seed=3).paths_at(7)
    draws = {policy.paths_at(s)["a"] for s in range(20)}
    assert len(draws) > 10 and all(len(p) == 8 and set(p) <= {"S", "T"} for p in draws)
    assert policy.paths_at(1)["a"] != policy.paths_at(1)["b"] or policy.paths_at(2)["a"] != policy.paths_at(2)["b"]
    assert PathPolicy("fixed", {"a": "SSTT"}).paths_at(5) == {"a": "SSTT"}


def learned(tiny_cfg) -> SupernetViT:
    torch.manual_seed(0)
    cfg = tiny_cfg.model_copy(update={"train": tiny_cfg.train.model_copy(update={"path_policy": "learned"}),
                                      "model": tiny_cfg.model.model_copy(update={"ffns": "all"})})
    model = SupernetViT.from_config(cfg)
    with torch.no_grad():
        for logits in model.path_logits.values():
            logits.logits.normal_()
    return model


def test_an_open_block_runs_both_ffns_and_takes_the_sampled_one(tiny_cfg):
    model = learned(tiny_cfg)
    policy = PathPolicy("learned", {t: tiny_cfg.path_of(t) for t in tiny_cfg.tasks}, seed=1, steps=10)
    gates = policy.gates_at(3)
    noise, tau = gates["face"]
    sampled = "".join("ST"[int(i)] for i in (model.path_logits["face"].logits + noise).argmax(dim=1))
    x, y = images(5, tiny_cfg), torch.arange(5)
    calls = calls_per_ffn(model)
    (loss,) = model(x, [TaskSlice("face", "????", 5, gate=gates["face"])], y)
    # both FFNs of every open block ran, once each, on the task's rows
    assert calls == {f"blocks.{i}.mlp.{ffn}": 1 for i in range(4) for ffn in ("shared", "task.face")}
    # forward: exactly the sampled path's output
    with torch.no_grad():
        (fixed,) = model(x, [TaskSlice("face", sampled, 5)], y)
    assert torch.allclose(loss, fixed, atol=1e-6), (loss, fixed)
    loss.backward()
    grad = model.path_logits["face"].logits.grad
    assert grad is not None and (grad.abs().sum(dim=1) > 0).all()  # every open block learns
    for i in range(4):  # the sampled FFN learns; the other's output only serves the gate's gradient
        chosen, other = ("shared", "task") if sampled[i] == "S" else ("task", "shared")
        ffn = {"shared": model.blocks[i].mlp.shared, "task": model.blocks[i].mlp.task["face"]}
        assert ffn[chosen].fc1.weight.grad.abs().sum() > 0 and ffn[other].fc1.weight.grad.abs().sum() == 0
    assert model.path_logits["person"].logits.grad is None  # another task's logits: untouched


def test_a_decided_block_runs_only_its_choice(tiny_cfg):
    model = learned(tiny_cfg)
    policy = PathPolicy("learned", {t: tiny_cfg.path_of(t) for t in tiny_cfg.tasks}, seed=1, steps=10,
                        decide_after=2, confidence=0.9)
    decided = policy.observe(2, {"face": [0.95, 0.5, 0.02, 0.5], "person": [0.5] * 4, "digits": [0.5] * 4})
    assert decided == [("face", 0, "T", 0.95), ("face", 2, "S", 0.98)]
    assert policy.paths_at(3)["face"] == "T?S?" and policy.best_paths()["face"][::2] == "TS"
    calls = calls_per_ffn(model)
    gates = policy.gates_at(3)
    (loss,) = model(images(3, tiny_cfg), [TaskSlice("face", "T?S?", 3, gate=gates["face"])], torch.arange(3))
    assert calls["blocks.0.mlp.task.face"] == 1 and "blocks.0.mlp.shared" not in calls
    assert calls["blocks.2.mlp.shared"] == 1 and "blocks.2.mlp.task.face" not in calls
    assert calls["blocks.1.mlp.shared"] == calls["blocks.1.mlp.task.face"] == 1  # open: both, one call each
    loss.backward()
    grad = model.path_logits["face"].logits.grad
    assert grad[[0, 2]].abs().sum() == 0 and grad[[1, 3]].abs().sum() > 0
    # fully decided: no gate is drawn and the task's forward is a fixed path's
    policy.observe(3, {"face": [0.95, 0.97, 0.02, 0.01], "person": [0.5] * 4, "digits": [0.5] * 4})
    assert policy.paths_at(4)["face"] == "TTSS" and "face" not in policy.gates_at(4)
    state = policy.state_dict()
    again = PathPolicy("learned", {t: tiny_cfg.path_of(t) for t in tiny_cfg.tasks}, seed=1, steps=10)
    again.load_state_dict(state)
    assert again.paths_at(9) == policy.paths_at(9) and again.best_paths() == policy.best_paths()
    assert torch.equal(again.gates_at(5)["person"][0], policy.gates_at(5)["person"][0])


def test_the_bnneck_is_torchs_batchnorm_with_a_frozen_bias_and_leaves_its_statistics_on_an_empty_slice():
    from ufo.model.heads import BNNeck

    neck, bn = BNNeck(5), torch.nn.BatchNorm1d(5)
    bn.load_state_dict(neck.state_dict())
    x = torch.randn(7, 5) * 3 + 2
    assert torch.allclose(neck(x), bn(x), atol=1e-6)
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        assert torch.allclose(getattr(neck, name).float(), getattr(bn, name).float(), atol=1e-6), name
    before = neck.running_mean.clone()
    assert neck(torch.zeros(0, 5)).shape == (0, 5) and torch.equal(neck.running_mean, before)
    assert not neck.bias.requires_grad
    neck.eval(), bn.eval()
    assert torch.allclose(neck(x), bn(x), atol=1e-6)
    assert neck(x.bfloat16()).dtype == torch.bfloat16


def test_compiled_blocks_match_eager_keep_their_names_and_do_not_recompile_for_new_slice_sizes(tiny_cfg):
    import copy

    from torch._dynamo.utils import counters  # dynamo's own count of the graphs it made (test only)

    torch._dynamo.reset()
    torch.manual_seed(0)
    eager = SupernetViT.from_config(tiny_cfg).train()
    compiled = copy.deepcopy(eager)
    compiled.compile_blocks()
    assert list(compiled.state_dict()) == list(eager.state_dict())  # checkpoints read the same names
    graphs = []
    for n in (6, 7, 5):  # every step its own slice sizes
        slices = [TaskSlice("face", "SSTT", n), TaskSlice("person", "STST", n + 1), TaskSlice("digits", "TSSS", n)]
        x = images(3 * n + 1, tiny_cfg, seed=n)
        for model in (eager, compiled):
            model.zero_grad()
            sum(o.sum() for o in model(x, slices)).backward()
        for a, b in zip(eager.parameters(), compiled.parameters()):
            torch.testing.assert_close(a.grad, b.grad, atol=1e-5, rtol=1e-4)
        graphs.append(counters["stats"]["unique_graphs"])
    assert graphs[0] > 0 and graphs[2] == graphs[1] == graphs[0]  # dynamic shapes: compiled once
