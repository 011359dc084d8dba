import pytest

from ufo.config import load_config
from ufo.errors import ConfigError
from ufo.layout import make_layout


def test_auto_is_task_parallel_with_enough_ranks(tiny_config_file):
    cfg = load_config(tiny_config_file)
    layout = make_layout(cfg, 3)
    assert layout.kind == "task_parallel"
    assert layout.groups == {"face": (0,), "person": (1,), "digits": (2,)}
    assert layout.tasks_of(1) == ["person"] and layout.rank_in_group("digits", 2) == 0


def test_auto_is_mixed_below_one_rank_per_task(tiny_config_file):
    layout = make_layout(load_config(tiny_config_file), 2)
    assert layout.kind == "mixed" and layout.tasks_of(1) == ["face", "person", "digits"]
    assert layout.group_size("face") == 2 and layout.rank_in_group("face", 1) == 1


def test_ranks_follow_weights(tiny_config_file):
    cfg = load_config(tiny_config_file, ["tasks.digits.weight=2"])
    layout = make_layout(cfg, 8)
    sizes = {t: layout.group_size(t) for t in cfg.tasks}
    assert sizes == {"face": 2, "person": 2, "digits": 4}
    assert sorted(r for g in layout.groups.values() for r in g) == list(range(8))


def test_fixed_ranks_and_the_rest_by_weight(tiny_config_file):
    cfg = load_config(tiny_config_file, ["tasks.face.ranks=3"])
    layout = make_layout(cfg, 5)
    assert layout.groups == {"face": (0, 1, 2), "person": (3,), "digits": (4,)}
    assert "face           ranks 0-2" in layout.describe()


def test_too_few_ranks_for_task_parallel(tiny_config_file):
    cfg = load_config(tiny_config_file, ["train.layout=task_parallel"])
    with pytest.raises(ConfigError, match="task_parallel needs at least one rank per task: 3 tasks"):
        make_layout(cfg, 2)


def test_fixed_ranks_that_do_not_fit(tiny_config_file):
    cfg = load_config(tiny_config_file, ["tasks.face.ranks=4", "tasks.person.ranks=1", "tasks.digits.ranks=1"])
    with pytest.raises(ConfigError, match="ask for 6 ranks"):
        make_layout(cfg, 4)
    with pytest.raises(ConfigError, match="ranks remain"):
        make_layout(load_config(tiny_config_file, ["tasks.face.ranks=3"]), 4)
