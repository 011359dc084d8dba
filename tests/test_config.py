from pathlib import Path

import pytest

from ufo.config import default_path, load_config
from ufo.errors import ConfigError

from tiny import TINY, write_yaml

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", ["demo", "ufo_vit_s", "ufo_vit_b", "ufo_vit_l"])
def test_shipped_configs_load(name):
    cfg = load_config(REPO / "configs" / f"{name}.yaml")
    assert all(len(cfg.path_of(t)) == cfg.model.depth for t in cfg.tasks)
    if name == "demo":
        assert list(cfg.tasks) == ["digits", "shapes", "persons", "shoppers"]
        assert {t.kind for t in cfg.tasks.values()} == {"classification", "retrieval"}
        # the related pair: two re-identification tasks on the same recipe
        assert cfg.tasks["persons"].model_dump(exclude={"shards", "eval_shards"}) == \
            cfg.tasks["shoppers"].model_dump(exclude={"shards", "eval_shards"})


def test_the_vit_h_projection_loads():
    from ufo.bench.scale import vit_h_config

    cfg = vit_h_config(26)
    assert (cfg.model.pretrained, cfg.model.embed_dim, cfg.model.depth, len(cfg.tasks)) == \
        ("vit_huge_patch14_224.mae", 1280, 32, 26)


def test_paper_configs_have_the_four_ufo_tasks():
    for name, depth, width in [("ufo_vit_b", 12, 768), ("ufo_vit_l", 24, 1024)]:
        cfg = load_config(REPO / "configs" / f"{name}.yaml")
        assert set(cfg.tasks) == {"face", "person", "vehicle", "product"}
        assert (cfg.model.depth, cfg.model.embed_dim, cfg.model.patch_size) == (depth, width, 16)


def test_dotted_overrides_reach_nested_keys(tiny_config_file):
    cfg = load_config(tiny_config_file, ["model.depth=6", "tasks.face.weight=2",
                                         "tasks.face.path=SSSTTT", "tasks.person.path=SSSSSS",
                                         "tasks.digits.path=tttttt", "export.formats=[onnx]"])
    assert cfg.model.depth == 6
    assert cfg.tasks["face"].weight == 2.0
    assert cfg.path_of("digits") == "TTTTTT"
    assert cfg.export.formats == ("onnx",)


def test_default_path_is_filled_in(tmp_path):
    data = {"model": {"depth": 5}, "tasks": {"a": {"kind": "classification", "num_classes": 3}}}
    cfg = load_config(write_yaml(tmp_path / "c.yaml", data))
    assert cfg.path_of("a") == default_path(5) == "SSSTT"


def test_config_is_frozen(tiny_cfg):
    with pytest.raises(Exception):
        tiny_cfg.model.depth = 3


def error_of(path, overrides=()):
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_unknown_key_names_file_and_key_and_suggests(tmp_path):
    data = {**TINY, "model": {**TINY["model"], "dpeth": 3}}
    message = error_of(write_yaml(tmp_path / "bad.yaml", data))
    assert message.startswith(f"{tmp_path / 'bad.yaml'}: model.dpeth: unknown key")
    assert "model.depth" in message


def test_unknown_task_key(tmp_path):
    data = {**TINY, "tasks": {**TINY["tasks"], "digits": {**TINY["tasks"]["digits"], "num_clases": 3}}}
    message = error_of(write_yaml(tmp_path / "bad.yaml", data))
    assert "tasks.digits.num_clases: unknown key" in message and "num_classes" in message


def test_unknown_key_from_override_says_so(tiny_config_file):
    message = error_of(tiny_config_file, ["train.sead=1"])
    assert "train.sead: unknown key" in message and "--set train.sead=1" in message


def test_wrong_type(tiny_config_file):
    message = error_of(tiny_config_file, ["model.depth=deep"])
    assert f"{tiny_config_file}: model.depth:" in message and "'deep'" in message


def test_path_of_wrong_length(tmp_path):
    data = {**TINY, "tasks": {**TINY["tasks"], "face": {**TINY["tasks"]["face"], "path": "SST"}}}
    message = error_of(write_yaml(tmp_path / "bad.yaml", data))
    assert message == (f"{tmp_path / 'bad.yaml'}: tasks.face.path: path 'SST' has 3 blocks "
                       "but model.depth is 4")


def test_depth_override_against_configured_paths(tiny_config_file):
    message = error_of(tiny_config_file, ["model.depth=6"])
    assert "tasks.face.path" in message and "model.depth is 6" in message


def test_path_with_bad_letters(tiny_config_file):
    assert "tasks.face.path" in error_of(tiny_config_file, ["tasks.face.path=SXTT"])


def test_head_dim_must_divide(tiny_config_file):
    message = error_of(tiny_config_file, ["model.num_heads=3"])
    assert "model.num_heads" in message and "embed_dim 32" in message


def test_patch_must_divide_image(tiny_config_file):
    assert "model.patch_size" in error_of(tiny_config_file, ["model.patch_size=5"])


def test_embedding_dim_only_for_retrieval(tiny_config_file):
    assert "tasks.digits.embedding_dim" in error_of(tiny_config_file, ["tasks.digits.embedding_dim=8"])


def test_task_without_kind(tiny_config_file):
    message = error_of(tiny_config_file, ["tasks.extra={num_classes: 3}"])
    assert "tasks.extra.kind: required key is missing" in message


def test_a_task_can_be_added_whole(tiny_config_file):
    cfg = load_config(tiny_config_file, ["tasks.extra={kind: classification, num_classes: 3}", "tasks.extra.weight=2"])
    assert cfg.tasks["extra"].weight == 2 and cfg.path_of("extra") == "SSTT"


def test_override_naming_an_undefined_task(tiny_config_file):
    message = error_of(tiny_config_file, ["tasks.faec.path=SSTT"])
    assert message.startswith(f"{tiny_config_file}: tasks.faec: no such task (defined: digits, face, person;")
    assert "(from --set tasks.faec.path=SSTT)" in message


def test_bad_task_name(tiny_config_file):
    message = error_of(tiny_config_file, ["tasks.Bad-Name={kind: classification, num_classes: 2, path: SSSS}"])
    assert "tasks.Bad-Name" in message


def test_bad_yaml_names_line(tmp_path):
    bad = tmp_path / "broken.yaml"
    bad.write_text("model:\n  depth: 4\n tasks: [\n")
    message = error_of(bad)
    assert message.startswith(f"{bad}: not valid YAML at line")


def test_missing_file(tmp_path):
    assert error_of(tmp_path / "nope.yaml") == f"{tmp_path / 'nope.yaml'}: no such config file"


def test_override_without_equals(tiny_config_file):
    assert "expected KEY=VALUE" in error_of(tiny_config_file, ["model.depth"])


def test_override_into_a_value(tiny_config_file):
    assert "model.depth is a value" in error_of(tiny_config_file, ["model.depth.x=1"])


def test_ffns_on_path_follows_the_path_policy(tiny_config_file):
    from ufo.config import ffns_on_path

    assert ffns_on_path(load_config(tiny_config_file))  # auto under the fixed policy
    assert not ffns_on_path(load_config(tiny_config_file, ["train.path_policy=sample"]))
    assert not ffns_on_path(load_config(tiny_config_file, ["model.ffns=all"]))
    message = error_of(tiny_config_file, ["model.ffns=on_path", "train.path_policy=sample"])
    assert message.startswith(f"{tiny_config_file}: model.ffns: on_path builds only the FFNs on the configured")
    assert message.endswith("(from --set model.ffns=on_path)")


@pytest.mark.parametrize("overrides,message", [
    (["tasks.digits.neck=bnneck"], "tasks.digits.neck: the triplet loss and the BNNeck are for retrieval tasks"),
    (["tasks.digits.triplet.margin=0.3"], "tasks.digits.triplet: the triplet loss and the BNNeck are for retrieval"),
    (["tasks.person.id_loss_weight=0"], "tasks.person.id_loss_weight: with the ID loss off (0) the task needs a "
                                        "triplet loss"),
    (["tasks.person.augment.cutmix=1.0"], "tasks.person.augment.cutmix: mixes classes into soft targets: for "
                                          "classification tasks only"),
    (["tasks.person.img_size=[16, 6]"], "tasks.person.img_size: 6 is not a positive multiple of model.patch_size 4 "
                                        "(from --set tasks.person.img_size=[16, 6])"),
    (["tasks.person.img_size=[16, 8, 4]"], "tasks.person.img_size"),
    (["train.compile=true", "deepspeed.zero_stage=3"], "train.compile: not under ZeRO-3"),
    (["tasks.digits.partial_fc.sample_rate=0.5"], "tasks.digits.partial_fc: shards a margin softmax's class centres: "
                                                  "for retrieval tasks"),
    (["tasks.face.partial_fc.sample_rate=0.5", "train.placement=replicated"],
     "tasks.face.partial_fc: shards the centres over the task's own ranks: needs train.layout task_parallel and "
     "train.placement task_sharded (or auto), not replicated"),
    (["tasks.face.partial_fc.sample_rate=0.5", "deepspeed.zero_stage=3"],
     "tasks.face.partial_fc: needs train.placement task_sharded, not possible here: DeepSpeed refuses expert"),
    (["tasks.face.partial_fc.sample_rate=1.5"], "tasks.face.partial_fc.sample_rate"),
])
def test_the_reid_recipe_keys_are_checked_at_load(tiny_config_file, overrides, message):
    import re

    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(tiny_config_file, overrides)


def test_a_tasks_input_size_is_its_own_or_the_models(tiny_config_file):
    cfg = load_config(tiny_config_file, ["tasks.person.img_size=[16, 8]", "tasks.digits.img_size=12"])
    assert (cfg.size_of("person"), cfg.size_of("digits"), cfg.size_of("face")) == ((16, 8), (12, 12), (16, 16))
    assert cfg.dynamic_size() and not load_config(tiny_config_file, ["tasks.person.img_size=16"]).dynamic_size()
    for name, sizes in (("ufo_vit_b", {"person": (256, 128), "vehicle": (256, 256), "face": (112, 112),
                                       "product": (224, 224)}),):
        shipped = load_config(REPO / "configs" / f"{name}.yaml")
        assert {t: shipped.size_of(t) for t in shipped.tasks} == sizes


def test_the_reid_recipe_keys_load(tiny_config_file):
    cfg = load_config(tiny_config_file, ["tasks.person.neck=bnneck", "tasks.person.triplet.margin=0",
                                         "tasks.person.id_loss_weight=0.5"])
    person = cfg.tasks["person"]
    assert (person.neck, person.triplet.margin, person.triplet.weight, person.id_loss_weight) == ("bnneck", 0, 1, 0.5)


def test_partial_fc_needs_a_rank_per_task(tiny_config_file):
    from ufo.layout import centres_of, make_layout

    cfg = load_config(tiny_config_file, ["tasks.face.partial_fc.sample_rate=0.5"])
    with pytest.raises(ConfigError, match="tasks.face.partial_fc: shards the class centres over the task's own ranks, "
                                          "but this run is mixed"):
        make_layout(cfg, 1)
    layout = make_layout(cfg, 5)  # face gets ranks by weight; each holds its rows
    face = layout.groups["face"]
    rows = [centres_of(cfg, layout, r)["face"] for r in face]
    assert rows[0][0] == 0 and sum(n for _, n in rows) == cfg.tasks["face"].num_classes
    assert all(a + n == b for (a, n), (b, _) in zip(rows, rows[1:]))
    assert centres_of(cfg, layout, layout.groups["digits"][0]) == {}
