"""The official MCIS pseudo-GT rules (gen_gt.py) on hand-built cases."""

import numpy as np
import pytest

from pipeline.config import ConfigError, load_config
from pipeline.crf_params import resolve_params
from pipeline.oaa_rules import oaa_pseudo_mask
from stages.refine_crf import refine_maps


def test_hand_computed_pseudo_mask():
    # 2 x 4 image, classes 3 and 7
    sal = np.array([[0, 0, 255, 255], [0, 20, 255, 100]], np.float32) / 255
    m3 = np.array([[0.0, 0.1, 1.0, 0.2], [0.0, 0.0, 0.5, 0.0]], np.float32)
    m7 = np.array([[0.0, 0.0, 1.0, 0.9], [0.0, 0.0, 0.1, 0.0]], np.float32)
    label = oaa_pseudo_mask([3, 7], np.stack([m3, m7]), sal)
    # (0,0): bg channel 1.0 wins -> 0; (0,1): bg 1.0 -> 0; (0,2): both maps 1.0 > 0.99 -> 255;
    # (0,3): bg 0, m3 0.2 < 0.3 -> 0, m7 0.9 -> 7; (1,0): bg 1.0 -> 0;
    # (1,1): bg 1 - 20/255 = 0.92 -> 0, saliency 20/255 < 32/255 stays 0;
    # (1,2): bg 0, m3 0.5, m7 0.1 -> 3; (1,3): bg 1 - 100/255 = 0.61 -> 0 but salient -> 255
    assert label.tolist() == [[0, 0, 255, 7], [0, 0, 3, 255]]


def test_attended_background_and_tiny_foreground_are_ignored():
    sal = np.zeros((10, 10), np.float32)
    sal[:5, :5] = 1.0                    # salient object: background channel 0 there
    m = np.zeros((1, 10, 10), np.float32)
    m[0, :5, :5] = 1.0
    m[0, 5, 5] = 0.96                    # background (1.0) wins, but the map is > 0.95 -> 255
    label = oaa_pseudo_mask([1], m, sal)
    assert (label[:5, :5] == 1).all() and label[5, 5] == 255 and (label[6:, 6:] == 0).all()
    small = np.zeros((1, 100, 100), np.float32)
    small[0, 0, 0] = 1.0                 # 1 of 10,000 pixels foreground < 1 % -> all ignored
    assert (oaa_pseudo_mask([2], small, np.zeros((100, 100), np.float32)) == 255).all()


def test_preset_needs_saliency_and_skips_the_crf(tmp_path):
    with pytest.raises(ConfigError, match="saliency_dir"):
        load_config("voc", ["crf.preset=oaa"])
    config = load_config("voc", ["crf.preset=oaa", f"crf.saliency_dir={tmp_path}"])
    params = resolve_params(config.crf)
    assert params.method == "oaa"
    image = np.zeros((2, 4, 3), np.uint8)
    sal = np.array([[0, 0, 255, 255], [0, 20, 255, 100]], np.float32) / 255
    maps = np.stack([np.array([[0.0, 0.1, 1.0, 0.2], [0.0, 0.0, 0.5, 0.0]], np.float32),
                     np.array([[0.0, 0.0, 1.0, 0.9], [0.0, 0.0, 0.1, 0.0]], np.float32)])
    assert refine_maps(image, [3, 7], maps, params, sal).tolist() == [[0, 0, 255, 7], [0, 0, 3, 255]]
