from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from ucseg_fast.config import Config, ConfigError, config_from_dict, diff_configs, load_config
from ucseg_fast.config import parse_override

REPO = Path(__file__).resolve().parents[1]


def test_acdc_preset_is_the_reference_recipe():
    cfg = load_config("acdc_2d")
    assert cfg == Config()  # the preset spells out the defaults; they must not drift apart
    d, t, lo = cfg.data, cfg.train, cfg.loss
    assert (t.base_lr, t.momentum, t.weight_decay, t.max_iterations) == (0.01, 0.9, 1e-5, 50000)
    assert (d.labeled_bs, d.unlabeled_bs, d.img_size, d.labeled_patients) == (12, 12, (256, 256), 7)
    assert (lo.embed_c_factor, lo.embed_p_factor, lo.unsup_factor, lo.phase2_start) == (0.2, 0.1, 150.0, 12000)
    assert (lo.queue_size, lo.contrast_temperature, lo.consistency, lo.consistency_rampup) == (1440, 0.3, 0.1, 200.0)


def test_demo_preset_loads():
    cfg = load_config("demo")
    assert cfg.train.max_iterations < 1000 and cfg.data.img_size[0] <= 256


def test_overrides_parse_toml_literals():
    cfg = load_config(None, ["--train.max_iterations=300", "--data.img_size=[128,128]",
                             "--loss.nms=false", "--train.out_dir=runs/x", "--name=exp"])
    assert cfg.train.max_iterations == 300 and cfg.data.img_size == (128, 128)
    assert cfg.loss.nms is False and cfg.train.out_dir == "runs/x" and cfg.name == "exp"
    assert parse_override("train.base_lr=1e-3") == (["train", "base_lr"], 1e-3)


def test_int_accepted_for_float_but_not_the_reverse():
    assert load_config(None, ["--train.base_lr=1"]).train.base_lr == 1.0
    with pytest.raises(ConfigError, match="train.max_iterations"):
        load_config(None, ["--train.max_iterations=1.5"])


def test_unknown_key_names_file_and_key(tmp_path):
    p = tmp_path / "bad.toml"
    p.write_text("[train]\nmax_iteratons = 10\n")
    with pytest.raises(ConfigError, match=r"bad.toml.*train.max_iteratons"):
        load_config(p)
    p.write_text("[trian]\n")
    with pytest.raises(ConfigError, match="unknown key 'trian'"):
        load_config(p)
    with pytest.raises(ConfigError, match="loss.nmss"):
        load_config(None, ["--loss.nmss=true"])


def test_bad_values_are_errors(tmp_path):
    with pytest.raises(ConfigError, match="pseudo_mode"):
        load_config(None, ["--loss.pseudo_mode=softmax"])
    with pytest.raises(ConfigError, match="labeled_patients"):
        load_config(None, ["--data.labeled_patients=5"])
    with pytest.raises(ConfigError, match="img_size"):
        load_config(None, ["--data.img_size=[250,250]"])
    with pytest.raises(ConfigError, match="expected true/false"):
        load_config(None, ["--loss.nms=1"])
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.toml")
    p = tmp_path / "broken.toml"
    p.write_text("[train\n")
    with pytest.raises(ConfigError, match="invalid TOML"):
        load_config(p)


def test_config_is_frozen_and_roundtrips():
    cfg = load_config(None, ["--train.max_iterations=7"])
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.train.max_iterations = 8  # type: ignore[misc]
    back = config_from_dict(cfg.to_dict())
    assert back == cfg
    other = load_config(None, ["--loss.nms=false"])
    assert diff_configs(cfg, other) == ["loss.nms: True != False"]


def test_la_preset_is_the_reference_3d_recipe():
    cfg = load_config("la_3d")
    d, lo, m = cfg.data, cfg.loss, cfg.model
    assert (d.img_size, d.labeled_bs, d.unlabeled_bs, d.labeled_patients) == ((96, 96, 96), 2, 2, 8)
    # validation on the last 8 of the 80 train.list cases, never on test.list
    assert (d.num_classes, m.in_channels, m.patch_size, d.val_split) == (2, 1, 16, "val")
    assert d.val_holdout == 8
    assert (d.eval_stride_xy, d.eval_stride_z) == (18, 4)
    assert (cfg.recipe, cfg.spec.supervision) == ("binary_3d", "sigmoid")
    assert (lo.nms, lo.queue_size, lo.phase2_start) == (True, 144, 6000)
    assert (lo.gate_base, lo.gate_span, lo.unsup_factor) == (0.2, 0.56, 150.0)
    assert cfg.train.max_iterations == 50000


def test_3d_config_errors_name_the_key():
    base = ["--recipe=binary_3d", "--data.img_size=[32,32,32]", "--data.num_classes=2"]
    cfg = load_config(None, base + ["--data.labeled_patients=1"])  # any volume count in 3D
    assert cfg.data.img_size == (32, 32, 32) and cfg.data.labeled_patients == 1
    with pytest.raises(ConfigError, match="img_size"):
        load_config(None, ["--data.img_size=[32,32,32,32]"])
    with pytest.raises(ConfigError, match="reads data.format 'ssl4mis' / 'nifti', got 'folder'"):
        load_config(None, base + ["--data.format=folder"])
    nii = load_config(None, base + ["--data.format=nifti"])  # NIfTI volumes (MSD / nnU-Net)
    assert nii.data.format == "nifti" and nii.data.intensity == "auto"
    with pytest.raises(ConfigError, match="data.val_split = 'test'"):
        load_config(None, base + ["--data.format=nifti", "--data.val_split=test"])
    assert load_config(None, base + ["--data.format=nifti", "--data.intensity=none"]).data.intensity == "none"
    with pytest.raises(ConfigError, match="data.intensity = 'std'; choose one of"):
        load_config(None, base + ["--data.format=nifti", "--data.intensity=std"])
    with pytest.raises(ConfigError, match="data.intensity = 'zscore' scales NIfTI volumes only"):
        load_config(None, base + ["--data.intensity=zscore"])
    # both data backends build the 3D stream (VolumeStream / DaliVolumeStream)
    assert load_config(None, base + ["--data.backend=dali"]).data.backend == "dali"
    with pytest.raises(ConfigError, match="data.backend = 'opencv'; choose one of"):
        load_config(None, base + ["--data.backend=opencv"])
    with pytest.raises(ConfigError, match="unlabeled_manifest"):
        load_config(None, base + ["--data.unlabeled_manifest=list.txt"])
    with pytest.raises(ConfigError, match="recipe 'multiclass_2d' trains 2D data"):
        load_config(None, ["--data.img_size=[32,32,32]", "--data.num_classes=2"])
    with pytest.raises(ConfigError, match="eval_stride"):
        load_config(None, base + ["--data.eval_stride_z=0"])
    with pytest.raises(ConfigError, match="val_split"):
        load_config(None, ["--data.val_split=a/b"])
    with pytest.raises(ConfigError, match="labeled_patients must be >= 1"):
        load_config(None, base + ["--data.labeled_patients=0"])


def test_apply_overrides_to_a_loaded_config():
    from ucseg_fast.config import apply_overrides
    base = load_config("acdc_2d")
    assert apply_overrides(base, []) is base
    cfg = apply_overrides(base, ["model.upg_head='fused'", "--data.img_size=[64,64]",
                                 "train.amp=none"])
    assert (cfg.model.upg_head, cfg.data.img_size, cfg.train.amp) == ("fused", (64, 64), "none")
    assert cfg.loss == base.loss and cfg.data.root == base.data.root  # the rest kept
    assert cfg == load_config("acdc_2d", ["model.upg_head='fused'",
                                                         "data.img_size=[64,64]", "train.amp=none"]
                              ) and base.model.upg_head == "auto"
    with pytest.raises(ConfigError, match="upg_head"):
        apply_overrides(base, ["model.upg_head='nope'"])
    with pytest.raises(ConfigError, match="expected section.key=value"):
        apply_overrides(base, ["upg_head=fused"])


def test_every_preset_and_the_defaults_validate():
    from ucseg_fast.config import preset_names
    assert set(preset_names()) >= {"acdc_2d", "binary_2d", "la_3d", "demo"}
    for preset in preset_names():
        load_config(preset)
    load_config(None)


@pytest.mark.parametrize("override, message", [
    ("--train.base_lr=0", "train.base_lr = 0.0 must be > 0"),
    ("--train.base_lr=-1", "train.base_lr = -1.0 must be > 0"),
    ("--train.base_lr=inf", "train.base_lr = inf must be a finite number"),
    ("--train.momentum=1", r"train.momentum = 1.0 must be in \[0, 1\)"),
    ("--train.momentum=-0.5", "train.momentum = -0.5"),
    ("--train.weight_decay=-1e-5", "train.weight_decay = -1e-05 must be >= 0"),
    ("--train.weight_decay=nan", "train.weight_decay = nan must be a finite number"),
    ("--model.patch_size=0", "model.patch_size = 0 must be >= 1"),
    ("--model.patch_size=-16", "model.patch_size = -16 must be >= 1"),
    ("--loss.queue_size=0", "loss.queue_size = 0 must be >= data.labeled_bs"),
    ("--loss.queue_size=23", r"loss.queue_size = 23 must be >= data.labeled_bs \+ "
                             r"data.unlabeled_bs = 24"),
    ("--loss.contrast_temperature=0", "loss.contrast_temperature = 0.0 must be > 0"),
    ("--loss.contrast_temperature=-0.3", "loss.contrast_temperature = -0.3"),
    ("--loss.gate_span=nan", "loss.gate_span = nan must be a finite number"),
    ("--loss.gate_base=-inf", "loss.gate_base = -inf must be a finite number"),
    ("--loss.consistency=inf", "loss.consistency = inf"),
    ("--data.rotate_limit=nan", "data.rotate_limit = nan"),
    ("--model.unet_dropout=[0.05,0.1,nan,0.3,0.5]", r"model.unet_dropout\[2\] = nan"),
    ("--loss.rampup_epoch_len=0", "loss.rampup_epoch_len = 0 must be >= 1"),
    ("--loss.consistency_rampup=-1", "loss.consistency_rampup = -1.0 must be >= 0"),
    ("--train.max_val_volumes=-1", "train.max_val_volumes = -1 must be >= 0"),
    ("--train.val_batch_size=0", "train.val_batch_size = 0 must be >= 1"),
    ("--train.graph_warmup=0", "train.graph_warmup = 0 must be >= 1"),
    ("--data.max_image_pixels=0", "data.max_image_pixels = 0 must be >= 1"),
    ("--data.decode_workers=-1", "data.decode_workers = -1 must be >= 0"),
    ("--data.labeled_bs=0", "data.labeled_bs = 0 must be >= 1"),
    ("--train.max_iterations=0", "train.max_iterations = 0 must be >= 1"),
    ("--data.num_classes=1", "data.num_classes = 1 must be >= 2"),
])
def test_numbers_out_of_range_name_key_and_value(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_copy_paste_needs_equal_batch_sizes():
    with pytest.raises(ConfigError, match=r"data.labeled_bs = 12 != data.unlabeled_bs = 8: "
                                          r"phase-2 copy-paste .* pairs labeled image i with "
                                          r"unlabeled image i"):
        load_config(None, ["--data.unlabeled_bs=8"])
    # no copy-paste in the run: unequal batches are fine
    cfg = load_config(None, ["--data.unlabeled_bs=8", "--loss.phase2_start=50000"])
    assert (cfg.data.labeled_bs, cfg.data.unlabeled_bs) == (12, 8)
    with pytest.raises(ConfigError, match="from iteration 299 < train.max_iterations = 300"):
        load_config("demo", ["--data.unlabeled_bs=2",
                                                     "--loss.phase2_start=299",
                                                     "--loss.schedules=absolute"])
    # proportional schedules: the switch of the reference run, moved into this one
    with pytest.raises(ConfigError, match=r"from iteration 72 < .* >= loss.reference_iterations"):
        load_config("demo", ["--data.unlabeled_bs=2"])
    cfg = load_config("demo", ["--data.unlabeled_bs=2",
                                                        "--loss.phase2_start=50000"])
    assert cfg.data.unlabeled_bs == 2
    # the supervised baseline has no copy-paste
    load_config(None, ["--data.unlabeled_bs=8", "--loss.semi_supervised=false"])


def test_the_validation_split_each_format_has():
    with pytest.raises(ConfigError, match="data.val_split = 'test'; an image folder"):
        load_config(None, ["--data.format=folder", "--data.val_split=test"])
    with pytest.raises(ConfigError, match="data.val_split = 'test'; a NIfTI set"):
        load_config(None, ["--data.format=nifti", "--data.val_split=test"])
    with pytest.raises(ConfigError, match="data.val_split = 'train'; 2D SSL4MIS"):
        load_config(None, ["--data.val_split=train"])
    assert load_config(None, ["--data.val_split=test"]).data.val_split == "test"


def test_a_saved_config_is_validated_too():
    data = Config().to_dict()
    data["train"]["base_lr"] = -0.01
    with pytest.raises(ConfigError, match=r"ck.json \(saved config\): train.base_lr = -0.01"):
        config_from_dict(data, source="ck.json (saved config)")
