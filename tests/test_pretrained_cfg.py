"""PretrainedCfg: the typed, frozen metadata a model carries; checked on every construction, timm-compatible."""

from __future__ import annotations

import copy
import dataclasses
import json
import pickle

import pytest

from ecanfnet import WeightsError
from ecanfnet.metadata import MAX_IMAGE_SIDE, MAX_IN_CHANS, PretrainedCfg


def test_defaults_are_the_published_checkpoints_and_read_like_timms_dict(timm_l0):
    cfg = PretrainedCfg()
    timm_cfg = timm_l0.pretrained_cfg
    for key in ("input_size", "test_input_size", "crop_pct", "test_crop_pct", "crop_mode", "interpolation",
                "mean", "std", "num_classes", "first_conv", "classifier", "pool_size"):
        assert cfg[key] == list(timm_cfg[key]) if isinstance(timm_cfg[key], tuple) else cfg[key] == timm_cfg[key], key
    assert "label_names" not in cfg and cfg.get("label_names") is None


def test_it_is_frozen_and_replace_checks_the_new_values():
    cfg = PretrainedCfg()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.crop_pct = 0.5  # type: ignore[misc]
    with pytest.raises(TypeError):
        cfg["crop_pct"] = 0.5  # type: ignore[index]
    cfg["mean"].append(9)  # a copy: the stored value cannot be changed through the dict view
    assert cfg.mean == (0.485, 0.456, 0.406)
    for bad, words in [({"crop_pct": 0.1}, "crop_pct must be a number from 0.5 to 1"),
                       ({"input_size": (3, MAX_IMAGE_SIDE + 1, 8)}, "input_size must be [C, H, W]"),
                       ({"input_size": (MAX_IN_CHANS + 1, 64, 64)}, f"input_size must be [C, H, W] with C from 1 to "
                                                                    f"{MAX_IN_CHANS}"),
                       ({"interpolation": "sinc"}, "interpolation must be one of"),
                       ({"std": (0.2, 0.0, 0.2)}, "std must be positive finite numbers, one per input channel"),
                       ({"mean": (0.5, 0.5)}, "mean has 2 values but input_size has C=3"),
                       ({"input_size": (1, 64, 64)}, "input_size has C=1 but test_input_size has C=3"),
                       ({"label_names": ("a", "b")}, "label_names has 2 entries but the classifier has 1000")]:
        with pytest.raises(ValueError, match=words.replace("[", r"\[").replace("]", r"\]")):
            cfg.replace(**bad)


def test_eval_settings_prefer_the_test_values_and_give_height_and_width():
    cfg = PretrainedCfg(input_size=(3, 64, 80), test_input_size=(3, 96, 128), crop_pct=0.875, test_crop_pct=None,
                        crop_mode="squash")
    assert cfg.test_crop_pct == 0.875  # None: as in training
    assert cfg.eval_settings() == {"image_size": (96, 128), "crop_pct": 0.875, "crop_mode": "squash",
                                   "interpolation": "bicubic", "mean": (0.485, 0.456, 0.406),
                                   "std": (0.229, 0.224, 0.225)}


def test_from_dict_takes_timms_pretrained_cfg_and_tests_like_training_when_no_test_values(timm_l0):
    ours = PretrainedCfg.from_dict(timm_l0.pretrained_cfg)
    assert ours.replace(info=PretrainedCfg().info) == PretrainedCfg() and ours["tag"] == "ra2_in1k"
    cfg = PretrainedCfg.from_dict({"input_size": [3, 64, 64], "crop_pct": 0.95, "notes": ["dropped"]})
    assert cfg.test_input_size == (3, 64, 64) and cfg.test_crop_pct == 0.95 and "notes" not in cfg


def test_with_classes_drops_the_labels_of_the_old_classifier():
    cfg = PretrainedCfg(num_classes=2, label_names=("cat", "dog"), label_descriptions={"cat": "a cat"})
    assert cfg.readable_labels() == ["cat", "dog"]
    smaller = cfg.with_classes(3)
    assert smaller.num_classes == 3 and smaller.label_names is None and smaller.readable_labels() == ["0", "1", "2"]


def test_config_json_round_trips_and_wordnet_ids_read_as_words():
    cfg = PretrainedCfg(num_classes=2, label_names=("n02123045", "x\u202ey"), input_size=(3, 64, 80),
                        test_input_size=None, crop_mode="border")
    config = json.loads(json.dumps(cfg.to_config(architecture="eca_nfnet_l1", num_features=3072)))
    assert config["architecture"] == "eca_nfnet_l1" and config["num_features"] == 3072
    assert config["label_names"] == ["n02123045", "x\u202ey"] and "label_names" not in config["pretrained_cfg"]
    assert PretrainedCfg.from_config(config, "config.json", num_classes=2) == cfg
    assert cfg.readable_labels() == ["tabby, tabby cat", "x\u202ey"]


def test_from_config_names_the_file_and_field():
    with pytest.raises(WeightsError, match=r"^somewhere/config.json: pretrained_cfg.crop_mode must be one of"):
        PretrainedCfg.from_config({"pretrained_cfg": {"crop_mode": "zoom"}}, "somewhere/config.json")
    with pytest.raises(WeightsError, match=r"^c.json: num_classes is 5 but the classifier in the weights has 2"):
        PretrainedCfg.from_config({"num_classes": 5}, "c.json", num_classes=2)
    # weights without a classifier: pretrained_cfg's class count is what the labels must match
    with pytest.raises(WeightsError, match=r"^c.json: label_descriptions has 2 entries but the classifier has 4"):
        PretrainedCfg.from_config({"pretrained_cfg": {"num_classes": 4}, "label_descriptions": ["x", "y"]}, "c.json")


def test_copies_are_the_object_and_a_pickle_round_trips():
    cfg = PretrainedCfg(num_classes=2, label_names=("cat", "dog"), label_descriptions={"cat": "a cat", "dog": "a dog"})
    assert copy.deepcopy(cfg) is cfg and copy.copy(cfg) is cfg
    back = pickle.loads(pickle.dumps(cfg))
    assert back == cfg and back is not cfg and back["label_descriptions"] == {"cat": "a cat", "dog": "a dog"}


def test_other_channel_counts_adapt_mean_and_std_as_timm_does():
    cfg = PretrainedCfg(num_classes=3, min_input_size=(3, 32, 32))
    gray = cfg.with_in_chans(1)
    assert gray.in_chans == 1 and gray["input_size"] == [1, 224, 224] and gray["test_input_size"] == [1, 288, 288]
    assert gray["min_input_size"] == [1, 32, 32]
    assert gray.mean == ((0.485 + 0.456 + 0.406) / 3,) and gray.std == ((0.229 + 0.224 + 0.225) / 3,)
    assert round(gray.mean[0], 6) == 0.449 and round(gray.std[0], 6) == 0.226  # what timm's save_for_hf writes
    five = cfg.with_in_chans(5)
    assert five["input_size"] == [5, 224, 224] and five.mean == gray.mean * 5  # not 5 values: their average, 5 times
    assert five.with_in_chans(1).mean == gray.mean and gray.with_in_chans(3).mean == gray.mean * 3
    assert cfg.with_in_chans(3) is cfg
    custom = PretrainedCfg(input_size=(2, 64, 64), test_input_size=None, mean=(0.1, 0.2), std=(0.3, 0.4))
    assert custom.with_in_chans(2) is custom and custom.with_in_chans(4).std == ((0.3 + 0.4) / 2,) * 4


def test_from_dict_gives_other_channel_counts_the_averaged_imagenet_defaults():
    cfg = PretrainedCfg.from_dict({"input_size": [1, 96, 96]})
    assert cfg.in_chans == 1 and cfg.test_input_size == (1, 96, 96) and len(cfg.mean) == len(cfg.std) == 1
    assert PretrainedCfg.from_dict({"test_input_size": [4, 96, 96], "input_size": [4, 64, 64]}).mean == cfg.mean * 4


def test_one_mean_value_stands_for_every_channel_and_eval_settings_are_rgb_only():
    one = PretrainedCfg(mean=(0.5,), std=(0.25,))
    assert one["mean"] == [0.5, 0.5, 0.5] and one.eval_settings()["mean"] == (0.5, 0.5, 0.5)
    assert one.eval_settings()["std"] == (0.25, 0.25, 0.25) and one == PretrainedCfg(mean=(0.5,) * 3, std=(0.25,) * 3)
    with pytest.raises(WeightsError, match=r"takes 1-channel input \(input_size \[1, 224, 224\]\); predict, "
                                           r"evaluate, embed, serve and export preprocess RGB images only"):
        PretrainedCfg().with_in_chans(1).eval_settings()


def test_config_json_of_a_grayscale_catavgmax_model_names_timms_model_args():
    config = PretrainedCfg(num_classes=4).with_in_chans(1).to_config(architecture="eca_nfnet_l0", num_features=2304,
                                                                     global_pool="catavgmax")
    assert config["global_pool"] == "catavgmax" and config["model_args"] == {"in_chans": 1, "global_pool": "catavgmax"}
    assert config["pretrained_cfg"]["input_size"] == [1, 224, 224] and len(config["pretrained_cfg"]["mean"]) == 1
    assert "model_args" not in PretrainedCfg().to_config(architecture="eca_nfnet_l0", num_features=2304)
    back = PretrainedCfg.from_config(json.loads(json.dumps(config)), "config.json", num_classes=4)
    assert back.in_chans == 1 and back == PretrainedCfg(num_classes=4).with_in_chans(1)
