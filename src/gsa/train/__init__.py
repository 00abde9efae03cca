"""Training: `train(config)` runs the loop (one CPU, one GPU, or N processes under torchrun with FSDP2 / DDP);
`build_config` makes a `TrainConfig` from a recipe, a TOML file and overrides; checkpoints resume exactly.

    from gsa.train import build_config, train

    result = train(build_config("shakespeare-tiny", overrides={"steps": 100}))
    print(result.val_perplexity, result.model_dir)
"""

from .config import RECIPES, TrainConfig, build_config, read_toml
from .trainer import TrainResult, train

__all__ = ["RECIPES", "TrainConfig", "TrainResult", "build_config", "read_toml", "train"]
