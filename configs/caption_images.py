"""Captions of images with classifier-free guidance (python -m decoding.caption_images).

    python -m decoding.caption_images --config=configs/caption_images.py \
        --config.images=scenes.npy --config.cfg_scale=2 --config.output=captions.jsonl

`images`: a .npy file of uint8 images [N, H, W] or [N, H, W, 1], or a folder of grey PNG
files (taken in name order), at the captioner's canvas size (40 x 40 for captioner-fmnist).
The strategy fields are unset (None): `GuidedCaption` in decoding/captioning.py owns the
defaults (scale 1: conditional greedy; the paper's headline is 2).
"""
import ml_collections
from ml_collections import config_dict

unset = config_dict.placeholder  # None: the strategy's default


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.model = "captioner-fmnist"  # a registered name or a captioner folder
  c.numerics = "fp32"
  c.images = ""  # .npy file or folder of PNGs (required)
  c.output = "captions.jsonl"  # one {"image", "caption"} per line
  c.strategy = "guided_caption"
  c.cfg_scale = unset(float)
  c.max_new_tokens = unset(int)
  c.batch_size = 100
  return c
