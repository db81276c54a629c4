"""Class-conditional Fashion-MNIST generation (python -m decoding.generate_images).

    python -m decoding.generate_images --config=configs/generate_images.py
    python -m decoding.generate_images --config=configs/generate_images.py \
        --config.strategy=sjd --config.lantern_delta=0.1 --config.out_dir=/tmp/sjd
    python -m decoding.generate_images --config=configs/generate_images.py \
        --config.strategy=eagle --config.window=5 --config.out_dir=/tmp/eagle
"""
import ml_collections


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.model = "checkpoints/image-ar-fmnist"  # relative paths: from the repository root
  c.classes = ""  # comma-separated class ids; "" = all ten
  c.per_class = 8  # images per class (one PNG grid per class)
  c.strategy = "ar"  # "ar" | "sjd" | "eagle"
  c.do_sample = True
  c.cfg_scale = 2.0
  c.temperature = 1.0
  c.top_k = 0
  c.window = 16  # SJD window; EAGLE: drafts per chain
  c.init_mode = "random"  # SJD: "random" | "spatial"
  c.lantern_delta = 0.0  # LANTERN relaxed acceptance (SJD or EAGLE chains) when > 0 (lossy)
  c.lantern_k = 16
  c.eagle_head = "checkpoints/eagle-image-fmnist"
  c.eagle_tree = False  # EAGLE-2 dynamic tree of tree_budget nodes (lossless only)
  c.tree_budget = 16
  c.seed = 0
  c.batch_size = 40
  c.out_dir = "image_samples"
  return c
