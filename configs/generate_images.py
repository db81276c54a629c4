"""Class-conditional Fashion-MNIST generation (python -m decoding.generate_images).

    python -m decoding.generate_images --config=configs/generate_images.py
    python -m decoding.generate_images --config=configs/generate_images.py \
        --config.strategy=sjd --config.lantern_delta=0.1 --config.out_dir=/tmp/sjd
    python -m decoding.generate_images --config=configs/generate_images.py \
        --config.strategy=eagle --config.window=5 --config.out_dir=/tmp/eagle

The strategy fields are unset (None): the strategies' settings types own their defaults
(`ImageAR`, `ImageSJD`, `ImageEagle` in decoding/image_strategies.py: sampling at
temperature 1 under guidance scale 2, window 16, LANTERN off). Setting a field the chosen
strategy does not read is an error.
"""
import ml_collections
from ml_collections import config_dict

unset = config_dict.placeholder  # None: the strategy's default


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.model = "image-ar-fmnist"  # a registered name or a decodax image-model folder
  c.numerics = "fp32"  # fp32 | bf16 | layercast (models/numerics.py)
  c.classes = ""  # comma-separated class ids; "" = all ten
  c.per_class = 8  # images per class (one PNG grid per class)
  c.strategy = "ar"  # ar | sjd | eagle
  c.do_sample = unset(bool)
  c.cfg_scale = unset(float)
  c.temperature = unset(float)
  c.top_k = unset(int)
  c.top_p = unset(float)
  c.min_p = unset(float)
  c.window = unset(int)  # SJD window; EAGLE: drafts per chain
  c.init_mode = unset(str)  # SJD: "random" | "spatial"
  c.lantern_delta = unset(float)  # LANTERN relaxed acceptance (SJD or EAGLE chains) when > 0
  c.lantern_k = unset(int)
  c.eagle_head = unset(str)  # EAGLE: a registered head name or a folder
  c.eagle_tree = unset(bool)  # EAGLE-2 dynamic tree of tree_budget nodes (LANTERN applies too)
  c.tree_budget = unset(int)
  c.guided_drafts = unset(bool)  # eagle: draft from the guided distribution (default True)
  c.seed = 0
  c.batch_size = 40
  c.out_dir = "image_samples"
  return c
