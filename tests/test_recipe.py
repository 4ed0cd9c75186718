"""The recipe: one explicit key decides 2D / 3D and softmax / sigmoid, the whole configuration is
checked before any data is read, and every configuration error reaches the user as one line.

Each error below used to surface late (inside the trainer, the objective, the data factory or
the graph check, some as tracebacks); now `load_config` or `Recipe.check` raises `ConfigError`
first, and the CLI prints it as `error: <one line>` with exit status 2.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from ucseg_fast.config import RECIPES, ConfigError, config_from_dict, load_config
from ucseg_fast.train.recipe import Recipe


def _err(*overrides: str, preset: str | None = None) -> str:
    with pytest.raises(ConfigError) as e:
        load_config(preset, list(overrides))
    return str(e.value)


@pytest.mark.parametrize("overrides, needle", [
    # refused by the trainer before: a GradScaler-less fp16 step
    (["--train.amp=fp16"], "train.amp = 'fp16'"),
    # refused by the objective before: the entropy modes are softmax rules
    (["--recipe=binary_2d", "--data.num_classes=2", "--loss.pseudo_mode=entropy"],
     "loss.pseudo_mode = 'entropy'"),
    (["--recipe=binary_2d", "--data.num_classes=4"], "data.num_classes must be 2"),
    # a 3-value img_size used to switch to 3D silently
    (["--data.img_size=[32,32,32]"], "recipe 'multiclass_2d' trains 2D data"),
    (["--recipe=binary_3d", "--data.num_classes=2"], "recipe 'binary_3d' trains 3D data"),
    (["--recipe=binary_3d", "--data.num_classes=2", "--data.img_size=[32,32,32]",
      "--data.format=folder"], "recipe 'binary_3d' reads data.format"),
    (["--recipe=binary_3d", "--data.num_classes=2", "--data.img_size=[32,32,32]",
      "--data.unlabeled_manifest=m.txt"], "data.unlabeled_manifest is a 2D"),
    (["--recipe=volume"], "recipe = 'volume'; choose one of"),
    # keys that moved say where to
    (["--loss.supervision=sigmoid"], "moved to recipe"),
    (["--loss.queue_gate=soft"], "moved to reference.queue_gate"),
    (["--train.compile_backend=eager"], "'train.compile_backend' is no longer a key"),
])
def test_configuration_errors_are_caught_at_load(overrides, needle):
    msg = _err(*overrides)
    assert needle in msg, msg
    assert "\n" not in msg


def test_every_packaged_preset_names_its_recipe():
    for name, recipe in (("acdc_2d", "multiclass_2d"), ("binary_2d", "binary_2d"),
                         ("la_3d", "binary_3d"), ("demo", "multiclass_2d")):
        cfg = load_config(name)
        assert cfg.recipe == recipe
        assert len(cfg.data.img_size) == cfg.spec.dims == RECIPES[recipe].dims


def test_a_checkpoint_config_from_before_the_recipe_key_is_upgraded():
    old = load_config("la_3d").to_dict()
    del old["recipe"], old["reference"]
    old["loss"].update(supervision="sigmoid", queue_gate="soft")
    old["train"]["compile_backend"] = "inductor"
    cfg = config_from_dict(old)
    assert cfg.recipe == "binary_3d" and cfg.reference.queue_gate == "soft"
    two_d = load_config("binary_2d").to_dict()
    del two_d["recipe"], two_d["reference"]
    two_d["loss"]["supervision"] = "sigmoid"
    assert config_from_dict(two_d).recipe == "binary_2d"


# ----------------------------------------------------------- checks that need device or data
def _check_err(cfg, device="cpu", world_size=1) -> str:
    with pytest.raises(ConfigError) as e:
        Recipe(cfg).check(torch.device(device), world_size)
    assert "\n" not in str(e.value)
    return str(e.value)


@pytest.mark.parametrize("overrides, world_size, needle", [
    (["--train.step_mode=graph"], 2, "not supported with DDP"),
    (["--train.step_mode=graph", "--train.optimizer=apex"], 1, "cannot capture"),
])
def test_graph_capture_errors_come_before_the_step_is_built(overrides, world_size, needle):
    # a CUDA device object is enough: the rule is decided from the configuration alone
    assert needle in _check_err(load_config(None, overrides), "cuda", world_size)


def test_fused_ops_without_triton_are_a_config_error(monkeypatch):
    import ucseg_fast.ops._triton_utils as tu
    monkeypatch.setattr(tu, "HAS_TRITON", False)
    msg = _check_err(load_config(None, ["--model.upg_head=fused"]))
    assert "model.upg_head" in msg and "Triton" in msg


def _colour_folder(root):
    from PIL import Image
    rng = np.random.default_rng(0)
    for split in ("labeled", "unlabeled", "val"):
        (root / split / "image").mkdir(parents=True)
        (root / split / "mask").mkdir(parents=True)
        for i in range(2):
            Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(
                root / split / "image" / f"{i}.png")
            Image.fromarray((rng.random((32, 32)) > 0.5).astype(np.uint8) * 255).save(
                root / split / "mask" / f"{i}.png")
    return root


def test_a_colour_folder_with_one_input_channel_fails_before_any_data_is_read(tmp_path,
                                                                              monkeypatch):
    root = _colour_folder(tmp_path / "data")
    cfg = load_config("binary_2d", [f"--data.root={root}", "--model.in_channels=1",
                                    f"--train.out_dir={tmp_path / 'run'}"])
    import ucseg_fast.data.factory as factory

    def no_stream(*a, **k):
        raise AssertionError("the training stream was built before the configuration check")
    monkeypatch.setattr(factory, "build_train_stream", no_stream)
    from ucseg_fast.train.trainer import Trainer
    with pytest.raises(ConfigError, match="set model.in_channels = 3"):
        Trainer(cfg)


def test_the_cli_prints_configuration_errors_as_one_line(capsys, tmp_path):
    from ucseg_fast.cli import main
    cases = [["train", "--config", "acdc_2d", "--train.amp=fp16"],
             ["train", "--config", "no_such_preset"],
             ["train", "--loss.supervision=sigmoid"]]
    for argv in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: "), (argv, err)
    root = _colour_folder(tmp_path / "data")
    assert main(["train", "--config", "binary_2d", f"--data.root={root}",
                 "--model.in_channels=1", f"--train.out_dir={tmp_path / 'run'}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "model.in_channels = 3" in err[0], err


def test_memory_format_follows_the_recipes_dimensions():
    assert Recipe(load_config("binary_2d")).memory_format() == torch.channels_last
    assert Recipe(load_config("la_3d")).memory_format() == torch.channels_last_3d
    assert Recipe(load_config(None, ["--train.channels_last=false"])).memory_format() == \
        torch.contiguous_format
