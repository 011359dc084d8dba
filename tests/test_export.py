import json

import numpy as np
import onnxruntime
import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from timm.models.vision_transformer import VisionTransformer

import ufo.export
from ufo.checkpoint import load_supernet, read_checkpoint
from ufo.errors import ExportError
from ufo.export import export_all_tasks, export_subnet
from ufo.model import TaskSlice


def rebuild_with_timm_alone(directory):
    """What a user does with no ufo installed: timm + safetensors + config.json."""
    config = json.loads((directory / "config.json").read_text())
    vit = VisionTransformer(**config["model_args"])
    vit.load_state_dict(load_file(directory / "model.safetensors"), strict=True)
    return vit.eval(), config


def supernet_output(checkpoint, task, path, x):
    model = load_supernet(read_checkpoint(checkpoint)).eval()
    with torch.no_grad():
        return model.forward_task(x, task, path)


@pytest.mark.parametrize("task,path", [("face", None), ("person", None), ("digits", None),
                                       ("face", "TSTS"), ("digits", "TTTT"), ("person", "SSSS")])
def test_subnet_equals_supernet(tmp_path, tiny_checkpoint, task, path):
    result = export_subnet(tiny_checkpoint, task, tmp_path / "out", path=path, log=lambda _: None)
    vit, config = rebuild_with_timm_alone(tmp_path / "out")
    x = torch.randn(5, 3, 16, 16)
    with torch.no_grad():
        got = vit(x)
    if config["ufo"]["kind"] == "retrieval":
        got = F.normalize(got, dim=-1)
    expected = supernet_output(tiny_checkpoint, task, result.path, x)
    assert (got - expected).abs().max().item() <= 1e-5
    assert config["ufo"]["path"] == result.path == (path or read_checkpoint(tiny_checkpoint).config.path_of(task))
    assert result.max_abs_diff["safetensors"] <= 1e-5


def test_exported_directory_is_complete_and_counts_its_tensors(tmp_path, tiny_checkpoint):
    export_subnet(tiny_checkpoint, "face", tmp_path / "face", log=lambda _: None)
    directory = tmp_path / "face"
    assert sorted(p.name for p in directory.iterdir()) == ["config.json", "model.safetensors"]
    config = json.loads((directory / "config.json").read_text())
    tensors = load_file(directory / "model.safetensors")
    assert "head.weight" in tensors and not any(".mlp.task." in k or k.startswith("heads.") for k in tensors)
    assert config["ufo"]["param_count"] == sum(t.numel() for t in tensors.values())
    assert config["ufo"]["task"] == "face" and config["ufo"]["kind"] == "retrieval"
    assert config["ufo"]["preprocessing"] == {"input_size": [3, 16, 16], "mean": [0.5] * 3, "std": [0.5] * 3,
                                              "interpolation": "bicubic", "crop_pct": 1.0}
    assert config["num_classes"] == 24 and config["pretrained_cfg"]["tag"] == "ufo_face"
    # timm's own loader rebuilds it offline too
    vit = timm.create_model(f"local-dir:{directory}", pretrained=True).eval()
    rebuilt, _ = rebuild_with_timm_alone(directory)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(vit(x), rebuilt(x))
    assert timm.data.resolve_data_config({}, model=vit)["input_size"] == (3, 16, 16)


def test_onnx_and_torchscript_match_the_supernet(tmp_path, tiny_checkpoint):
    result = export_subnet(tiny_checkpoint, "face", tmp_path / "out", formats=["safetensors", "onnx", "torchscript"],
                           log=lambda _: None)
    assert set(result.max_abs_diff) == {"safetensors", "onnx", "torchscript"}
    x = torch.randn(3, 3, 16, 16)  # a batch size the export never saw
    expected = supernet_output(tiny_checkpoint, "face", result.path, x)
    session = onnxruntime.InferenceSession(str(tmp_path / "out" / "model.onnx"))
    onnx_out = session.run(None, {"images": x.numpy()})[0]
    np.testing.assert_allclose(onnx_out, expected.numpy(), atol=1e-5)
    scripted = torch.jit.load(str(tmp_path / "out" / "model.torchscript.pt"))
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), expected, atol=1e-5, rtol=0)


def test_all_tasks(tmp_path, tiny_checkpoint, tiny_cfg):
    results = export_all_tasks(tiny_checkpoint, tmp_path / "all", log=lambda _: None)
    assert [r.task for r in results] == list(tiny_cfg.tasks)
    assert sorted(p.name for p in (tmp_path / "all").iterdir()) == sorted(tiny_cfg.tasks)
    for task in tiny_cfg.tasks:
        _, config = rebuild_with_timm_alone(tmp_path / "all" / task)
        assert config["ufo"]["path"] == tiny_cfg.path_of(task)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_unknown_task(tmp_path, tiny_checkpoint):
    with pytest.raises(ExportError, match="unknown task 'cars'; this checkpoint has: face, person, digits"):
        export_subnet(tiny_checkpoint, "cars", tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("path,message", [("SST", "has 3 blocks but the supernet has depth 4"),
                                          ("SSXT", "one letter per block")])
def test_bad_path(tmp_path, tiny_checkpoint, path, message):
    with pytest.raises(ExportError, match=message):
        export_subnet(tiny_checkpoint, "face", tmp_path / "out", path=path)


def test_a_path_off_the_built_ffns_is_refused(tmp_path, tiny_cfg):
    from ufo.checkpoint import init_supernet, save_supernet

    ckpt = save_supernet(init_supernet(tiny_cfg), tiny_cfg, tmp_path / "on_path.safetensors")  # FFNs on paths only
    with pytest.raises(ExportError, match=f"{ckpt}: --path TTTT: block 0 has no FFN-task of face"):
        export_subnet(ckpt, "face", tmp_path / "out", path="TTTT")
    assert not (tmp_path / "out").exists()
    assert export_subnet(ckpt, "face", tmp_path / "out", path="SSST", log=lambda _: None).path == "SSST"


def test_existing_output_is_refused_then_replaced(tmp_path, tiny_checkpoint):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ExportError, match="exists; pass --overwrite"):
        export_subnet(tiny_checkpoint, "face", out)
    assert (out / "keep.txt").read_text() == "mine"
    export_subnet(tiny_checkpoint, "face", out, overwrite=True, log=lambda _: None)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]


def test_failed_verification_leaves_nothing_and_keeps_the_old_directory(tmp_path, tiny_checkpoint, monkeypatch):
    out = tmp_path / "out"
    export_subnet(tiny_checkpoint, "digits", out, log=lambda _: None)
    before = (out / "model.safetensors").read_bytes()

    real = ufo.export.subnet_state_dict

    def wrong_ffn(state, task, path, head, *elastic):  # a pruning bug: the path's letters swapped
        return real(state, task, path.translate(str.maketrans("ST", "TS")), head, *elastic)

    monkeypatch.setattr(ufo.export, "subnet_state_dict", wrong_ffn)
    with pytest.raises(ExportError, match="differs from the supernet by .* nothing was written"):
        export_subnet(tiny_checkpoint, "digits", out, overwrite=True)
    assert (out / "model.safetensors").read_bytes() == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_corrupt_checkpoint_is_refused(tmp_path, tiny_checkpoint):
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(tiny_checkpoint.read_bytes()[:1000])
    with pytest.raises(Exception, match="unreadable or truncated"):
        export_subnet(cut, "face", tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("task,depth,ratio", [("digits", 2, None), ("face", None, 1.0), ("person", 3, 0.5),
                                              ("digits", 1, 0.25)])
def test_elastic_subnet_equals_the_supernets_elastic_forward(tmp_path, tiny_checkpoint, task, depth, ratio):
    ckpt = read_checkpoint(tiny_checkpoint)
    path = ckpt.config.path_of(task)
    result = export_subnet(ckpt, task, tmp_path / "out", depth=depth, mlp_ratio=ratio,
                           formats=["safetensors", "onnx"], log=lambda _: None)
    vit, config = rebuild_with_timm_alone(tmp_path / "out")  # a plain, smaller timm ViT
    hidden = None if ratio is None else int(32 * ratio)
    assert len(vit.blocks) == (depth or 4) and vit.blocks[0].mlp.fc1.out_features == (hidden or 64)
    x = torch.randn(5, 3, 16, 16)
    with torch.no_grad():
        got = vit(x)
        expected = load_supernet(ckpt).eval().forward_task(x, task, path, depth, hidden)
    if config["ufo"]["kind"] == "retrieval":
        got = F.normalize(got, dim=-1)
    assert (got - expected).abs().max().item() <= 1e-5
    assert result.max_abs_diff["safetensors"] <= 1e-5 and result.max_abs_diff["onnx"] <= 1e-5
    full = export_subnet(ckpt, task, tmp_path / "full", formats=["safetensors"], verify=False, log=lambda _: None)
    assert result.param_count < full.param_count
    assert config["ufo"]["elastic"] == {"depth": depth, "mlp_ratio": ratio, "num_heads": None, "supernet_path": path}
    assert config["ufo"]["path"] == path[:depth]


@pytest.mark.parametrize("depth,ratio,message", [(5, None, "the supernet has 4 blocks"),
                                                 (0, None, "give 1..4"), (None, 3.0, "in \\(0, 2\\]")])
def test_elastic_sizes_out_of_range_are_refused(tmp_path, tiny_checkpoint, depth, ratio, message):
    with pytest.raises(ExportError, match=message):
        export_subnet(tiny_checkpoint, "digits", tmp_path / "out", depth=depth, mlp_ratio=ratio)
    assert not (tmp_path / "out").exists()


def test_the_streamed_safetensors_file_reads_back_with_safetensors(tmp_path):
    from safetensors import safe_open

    from ufo.export import write_safetensors

    state = {"a.weight": torch.randn(3, 5), "b": torch.arange(7, dtype=torch.int64), "empty": torch.zeros(0, 4),
             "half": torch.randn(2, 2).bfloat16(), "view": torch.randn(4, 6)[:, 1:3]}  # a non-contiguous view
    write_safetensors(state, tmp_path / "m.safetensors")
    back = load_file(tmp_path / "m.safetensors")
    assert list(back) == list(state) or set(back) == set(state)
    for name, tensor in state.items():
        assert back[name].dtype == tensor.dtype and torch.equal(back[name], tensor), name
    with safe_open(tmp_path / "m.safetensors", framework="pt") as f:
        assert f.metadata() == {"format": "pt"}


def test_a_bnneck_is_folded_into_the_subnets_head_and_matches_the_supernet(tmp_path):
    import copy

    from tiny import TINY
    from ufo.checkpoint import init_supernet, save_supernet
    from ufo.config import config_from_dict
    from ufo.subnet import load_subnet

    raw = copy.deepcopy(TINY)
    raw["tasks"]["person"].update(neck="bnneck", triplet={"weight": 1.0, "margin": 0.0})
    cfg = config_from_dict(raw, "test")
    model = init_supernet(cfg).train()
    neck = model.heads["person"].neck
    assert neck is not None and not neck.bias.requires_grad  # fast-reid's BNNeck: bias frozen at 0
    with torch.no_grad():  # training batches move the running statistics; a trained scale
        for _ in range(3):
            model(torch.randn(8, 3, 16, 16) * 2 + 1, [TaskSlice("person", "STST", 8)])
        neck.weight.uniform_(0.5, 2.0)
    assert neck.running_mean.abs().max() > 0.01
    ckpt = save_supernet(model, cfg, tmp_path / "supernet.safetensors")
    result = export_subnet(ckpt, "person", tmp_path / "subnet", log=lambda _: None)
    assert result.max_abs_diff["safetensors"] <= 1e-5  # export's own verification, eval mode
    vit, config = rebuild_with_timm_alone(tmp_path / "subnet")  # a plain timm ViT: no BatchNorm in it
    assert not any(isinstance(m, torch.nn.BatchNorm1d) for m in vit.modules())
    x = torch.randn(6, 3, 16, 16)
    deployed, _ = load_subnet(tmp_path / "subnet")
    with torch.no_grad():
        want = load_supernet(read_checkpoint(ckpt)).eval().forward_task(x, "person", "STST")
        assert (F.normalize(vit(x), dim=-1) - want).abs().max() < 1e-5
        assert (deployed(x) - want).abs().max() < 1e-5
        unfolded = model.eval().heads["person"].embed  # without the fold the outputs differ
        assert (F.normalize(unfolded(model.forward_features(x, [TaskSlice("person", "STST", 6)])), dim=-1)
                - want).abs().max() > 1e-3


def test_a_task_of_its_own_input_size_exports_a_plain_vit_of_that_size(tmp_path):
    import copy

    from tiny import TINY
    from ufo.checkpoint import init_supernet, save_supernet
    from ufo.config import config_from_dict
    from ufo.subnet import load_subnet

    raw = copy.deepcopy(TINY)
    raw["tasks"]["person"]["img_size"] = [16, 8]  # people: taller than wide (256 x 128 at full size)
    raw["tasks"]["digits"]["img_size"] = 12
    raw["export"]["formats"] = ["safetensors", "onnx", "torchscript"]
    cfg = config_from_dict(raw, "test")
    model = init_supernet(cfg)
    assert model.pos_embed.shape == (1, 1 + 4 * 4, 32)  # the supernet keeps model.img_size's grid
    ckpt = save_supernet(model, cfg, tmp_path / "supernet.safetensors")
    for task, (h, w) in (("person", (16, 8)), ("digits", (12, 12))):
        result = export_subnet(ckpt, task, tmp_path / task, log=lambda _: None)
        assert max(result.max_abs_diff.values()) <= 1e-5, result.max_abs_diff  # every format verified
        vit, config = rebuild_with_timm_alone(tmp_path / task)
        assert vit.pos_embed.shape == (1, 1 + h // 4 * (w // 4), 32)  # resampled once, at export
        hub = timm.create_model(f"local-dir:{tmp_path / task}", pretrained=True).eval()  # timm's own loader
        assert timm.data.resolve_data_config({}, model=hub)["input_size"] == (3, h, w)  # what users preprocess to
        x = torch.randn(5, 3, h, w)
        deployed, _ = load_subnet(tmp_path / task)
        with torch.no_grad():
            want = load_supernet(read_checkpoint(ckpt)).eval().forward_task(x, task, cfg.path_of(task))
            assert (deployed(x) - want).abs().max() <= 1e-5
            assert torch.equal(hub(x), vit(x))
        session = onnxruntime.InferenceSession(str(tmp_path / task / "model.onnx"))
        got = session.run(None, {"images": x.numpy()})[0]
        assert np.abs(got - want.numpy()).max() <= 1e-4


def test_a_subnet_with_fewer_heads_equals_the_supernet_on_those_heads(tmp_path, tiny_cfg):
    """Elastic attention: the supernet's first heads (the others' outputs zeroed before the projection)
    are the heads' own attention (a supernet whose other heads' values are zero gives the same output),
    and the exported subnet, built by timm alone (its blocks' attention timm's `Attention` with the
    supernet's head width), gives it too."""
    from timm.layers import Attention

    from ufo.checkpoint import init_supernet, save_supernet
    from tiny import with_every_ffn

    cfg = with_every_ffn(tiny_cfg.model_copy(update={"model": tiny_cfg.model.model_copy(update={"num_heads": 4})}))
    ckpt = save_supernet(init_supernet(cfg), cfg, tmp_path / "s.safetensors")
    supernet = load_supernet(read_checkpoint(ckpt)).eval()
    x = torch.randn(5, 3, 16, 16)
    with torch.no_grad():
        two = supernet.forward_task(x, "face", "SSTT", heads=2)
        assert (two - supernet.forward_task(x, "face", "SSTT")).abs().max() > 1e-3  # the other heads mattered
        for block in supernet.blocks:  # v of heads 2 and 3 zero: their outputs are zero, whatever they attend
            dim = block.attn.head_dim
            block.attn.qkv.weight[2 * 32 + 2 * dim:] = 0
            block.attn.qkv.bias[2 * 32 + 2 * dim:] = 0
        assert (supernet.forward_task(x, "face", "SSTT") - two).abs().max() <= 1e-5

    result = export_subnet(ckpt, "face", tmp_path / "out", num_heads=2, formats=["safetensors", "onnx"],
                           log=lambda _: None)
    assert result.max_abs_diff["safetensors"] <= 1e-5 and result.max_abs_diff["onnx"] <= 1e-5
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["model_args"]["num_heads"] == 2 and config["ufo"]["attention"] == {"num_heads": 2, "head_dim": 8}
    assert config["ufo"]["elastic"]["num_heads"] == 2
    vit = VisionTransformer(**config["model_args"])  # what a user does with timm alone
    for block in vit.blocks:
        block.attn = Attention(32, num_heads=2, attn_head_dim=8, qkv_bias=True)
    vit.load_state_dict(load_file(tmp_path / "out" / "model.safetensors"), strict=True)
    with torch.no_grad():
        assert (F.normalize(vit.eval()(x), dim=-1) - two).abs().max() <= 1e-5
    assert config["ufo"]["param_count"] < export_subnet(ckpt, "face", tmp_path / "all", log=lambda _: None).param_count
    with pytest.raises(ExportError, match=r"^--num-heads 3: the supernet's attention has 4 heads; give 1\.\.4 "
                                          r"dividing embed_dim 32$"):
        export_subnet(ckpt, "face", tmp_path / "bad", num_heads=3, log=lambda _: None)
