import json

import pytest

from modules.config import PRESETS, Config, apply_overrides, config_to_json, parse_config
from modules.utils import UsageError


def test_defaults_are_the_kaggle_recipe():
    cfg, printed = parse_config([])
    assert not printed
    assert cfg.arch == "biggan" and cfg.loss == "rals" and cfg.aux_weight == 0.1
    assert (cfg.lr_g, cfg.lr_d, cfg.beta1, cfg.batch_size) == (2e-4, 8e-4, 0.0, 64)
    assert cfg.truncation == 2.0 and cfg.ema and cfg.z_dim == 120


def test_jupyter_argv_is_ignored():
    cfg, _ = parse_config(["-f", "/root/.local/share/jupyter/runtime/kernel-1.json", "--seed", "3"])
    assert cfg.seed == 3


def test_presets_compose_left_to_right():
    cfg, _ = parse_config(["--preset", "pggan,smoke"])
    assert cfg.arch == "pggan" and cfg.g_ch == PRESETS["smoke"]["g_ch"] and cfg.loss == "wgan"


@pytest.mark.parametrize("name", list(PRESETS))
def test_every_preset_resolves(name):
    cfg, _ = parse_config(["--preset", name])
    json.loads(config_to_json(cfg))


def test_set_overrides_with_types():
    cfg, _ = parse_config(["--set", "lr_g=1e-3", "--set", "ema=false", "--set", "crop_styles=box,top", "--set", "d_steps=2"])
    assert cfg.lr_g == 1e-3 and cfg.ema is False and cfg.crop_styles == "box,top" and cfg.d_steps == 2


@pytest.mark.parametrize("argv", [["--set", "nope=1"], ["--set", "lr_g=fast"], ["--set", "ema"], ["--preset", "x"],
                                  ["--time-budget", "soon"]])
def test_bad_arguments_are_usage_errors(argv):
    with pytest.raises(UsageError):
        parse_config(argv)


def test_print_config_flag():
    _, printed = parse_config(["--print-config"])
    assert printed


def test_apply_overrides_unknown_field():
    with pytest.raises(UsageError):
        apply_overrides(Config(), {"widht": 3}, "test")
