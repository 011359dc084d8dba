import pytest
import torch
from safetensors.torch import save_file
from timm.models.vision_transformer import VisionTransformer

from ufo.checkpoint import init_supernet, load_supernet, read_checkpoint, save_supernet
from ufo.errors import CheckpointError
from ufo.model import TaskSlice, vit_args


def test_round_trip(tiny_cfg, tiny_checkpoint):
    from tiny import with_every_ffn

    ckpt = read_checkpoint(tiny_checkpoint)
    assert ckpt.config == with_every_ffn(tiny_cfg) and ckpt.step == 0
    model = load_supernet(ckpt)
    fresh = init_supernet(ckpt.config)  # same seed: same weights
    assert list(model.state_dict()) == list(fresh.state_dict())
    for (name, a), b in zip(model.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), name


def test_init_is_seeded(tiny_cfg):
    a = init_supernet(tiny_cfg).state_dict()["blocks.0.attn.qkv.weight"]
    b = init_supernet(tiny_cfg).state_dict()["blocks.0.attn.qkv.weight"]
    assert torch.equal(a, b)


def test_refuses_to_overwrite(tiny_cfg, tiny_checkpoint):
    before = tiny_checkpoint.read_bytes()
    with pytest.raises(CheckpointError, match="exists; pass --overwrite"):
        save_supernet(init_supernet(tiny_cfg), tiny_cfg, tiny_checkpoint)
    assert tiny_checkpoint.read_bytes() == before


def test_missing_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        read_checkpoint(tmp_path / "nope.safetensors")


def test_truncated_checkpoint(tmp_path, tiny_checkpoint):
    cut = tmp_path / "cut.safetensors"
    data = tiny_checkpoint.read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=f"{cut}: unreadable or truncated"):
        read_checkpoint(cut)


def test_foreign_safetensors_is_not_a_checkpoint(tmp_path):
    other = tmp_path / "other.safetensors"
    save_file({"w": torch.zeros(2)}, other)
    with pytest.raises(CheckpointError, match="not a ufo supernet checkpoint"):
        read_checkpoint(other)


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_init_from_a_plain_timm_vit(tmp_path, tiny_cfg, suffix):
    torch.manual_seed(7)
    vit = VisionTransformer(**vit_args(tiny_cfg.model), num_classes=5).eval()
    file = tmp_path / f"vit{suffix}"
    if suffix == ".safetensors":
        save_file(vit.state_dict(), file)
    else:
        torch.save({"model": vit.state_dict()}, file)
    model = init_supernet(tiny_cfg, from_timm=file).eval()  # builds only the FFNs on the paths
    assert [len(block.mlp.task) for block in model.blocks] == [1, 1, 1, 2]
    for block, vit_block in zip(model.blocks, vit.blocks):
        for ffn in [block.mlp.shared, *block.mlp.task.values()]:
            for a, b in zip(ffn.parameters(), vit_block.mlp.parameters()):
                assert torch.equal(a, b)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        expected = vit.forward_head(vit.forward_features(x), pre_logits=True)
        got = model.forward_features(x, [TaskSlice("digits", "TSSS", 2)])
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-6)


def test_init_from_timm_resamples_position_embedding(tmp_path, tiny_cfg):
    args = dict(vit_args(tiny_cfg.model), img_size=32)
    save_file(VisionTransformer(**args).state_dict(), tmp_path / "vit32.safetensors")
    model = init_supernet(tiny_cfg, from_timm=tmp_path / "vit32.safetensors")
    assert model.pos_embed.shape[1] == 1 + (16 // 4) ** 2


def test_init_from_a_vit_of_another_width(tmp_path, tiny_cfg):
    args = dict(vit_args(tiny_cfg.model), embed_dim=64)
    file = tmp_path / "wide.safetensors"
    save_file(VisionTransformer(**args).state_dict(), file)
    with pytest.raises(CheckpointError, match=f"{file}: .*shape"):
        init_supernet(tiny_cfg, from_timm=file)


def test_init_from_a_missing_file(tmp_path, tiny_cfg):
    with pytest.raises(CheckpointError, match="no such weights file"):
        init_supernet(tiny_cfg, from_timm=tmp_path / "none.pth")


def test_only_marked_training_checkpoints_count(tmp_path):
    import json

    from ufo.checkpoint import complete_checkpoints, find_training_checkpoint

    ckpts = tmp_path / "run" / "checkpoints"
    for step, marked in [(10, True), (20, True), (30, False)]:  # step 30 was torn while being written
        d = ckpts / f"step{step:08d}"
        d.mkdir(parents=True)
        (d / "mp_rank_00_model_states.pt").write_bytes(b"partial")
        if marked:
            (d / "ufo.json").write_text(json.dumps({"step": step, "files": {"mp_rank_00_model_states.pt":
                                                                             {"bytes": 7}}}))
    assert [p.name for p in complete_checkpoints(ckpts)] == ["step00000010", "step00000020"]
    assert find_training_checkpoint(tmp_path / "run").name == "step00000020"
    assert find_training_checkpoint(ckpts / "step00000010").name == "step00000010"
    with pytest.raises(CheckpointError, match="holds no complete training checkpoint"):
        read_checkpoint(ckpts / "step00000030")


def test_a_run_takes_what_its_config_builds_from_a_supernet_with_every_ffn(tiny_checkpoint, tiny_cfg):
    # a supernet file with every FFN, started from by a run that builds only the FFNs on its paths
    ckpt = read_checkpoint(tiny_checkpoint)
    model = load_supernet(ckpt, held=["face"], config=tiny_cfg)
    assert sorted(model.state_dict()) == sorted(k for k in ckpt.state_dict
                                                if (".mlp.task." not in k or k.startswith(("blocks.2.mlp.task.face.",
                                                                                           "blocks.3.mlp.task.face.")))
                                                and (not k.startswith("heads.") or k.startswith("heads.face.")))
    assert all(torch.equal(t, ckpt.state_dict[k]) for k, t in model.state_dict().items())
    narrow = read_checkpoint(save_supernet(model, tiny_cfg, tiny_checkpoint.parent / "face.safetensors"))
    with pytest.raises(CheckpointError, match="does not match the config: it lacks blocks.0.mlp.task.face"):
        load_supernet(narrow, config=tiny_cfg.model_copy(update={"model": tiny_cfg.model.model_copy(
            update={"ffns": "all"})}))


@pytest.mark.parametrize("stage", [0, 1])
def test_a_bf16_checkpoint_with_a_bnneck_is_read_with_its_statistics_and_exported(tmp_path, stage):
    """Buffers and frozen parameters have no fp32 masters: they are read as the module saved them."""
    from test_train import tiny_run
    from ufo.config import config_from_dict
    from ufo.export import export_subnet
    from ufo.train import train

    raw = tiny_run(tmp_path, ("person", "digits"), steps=2, eval_every=0, layout="mixed")
    raw["tasks"]["person"].update(neck="bnneck", triplet={"margin": 0.0})
    raw["deepspeed"] = {"zero_stage": stage, "precision": "bf16"}
    result = train(config_from_dict(raw, "test"), log=lambda _: None)
    module = result.engine.module
    ckpt = read_checkpoint(tmp_path / "run")
    stats = {k: v for k, v in ckpt.state_dict.items() if ".neck." in k}
    assert set(stats) == {f"heads.person.neck.{n}" for n in ("weight", "bias", "running_mean", "running_var",
                                                               "num_batches_tracked")}
    assert torch.equal(stats["heads.person.neck.running_mean"], module.heads["person"].neck.running_mean.cpu())
    assert stats["heads.person.neck.weight"].dtype == torch.float32  # the master, not the bf16 copy
    done = export_subnet(ckpt, "person", tmp_path / "subnet", log=lambda _: None)
    assert done.max_abs_diff["safetensors"] <= 1e-4
