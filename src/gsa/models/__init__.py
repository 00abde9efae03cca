"""GSA language models with Hugging Face conventions; importing this registers them with the Auto classes."""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .cache import GSACache
from .configuration_gsa import GSAConfig
from .modeling_gsa import GSAForCausalLM, GSAModel, GSAPreTrainedModel
from .presets import PRESETS, preset_config


def register_auto_classes() -> None:
    """Map model_type "gsa" to these classes in transformers' Auto classes (done on import). flash-linear-attention
    registers its own GSA classes under the same name when imported: call this after `import fla` to map the name
    back (or load with `GSAForCausalLM.from_pretrained`, which never asks the Auto classes)."""
    AutoConfig.register(GSAConfig.model_type, GSAConfig, exist_ok=True)
    AutoModel.register(GSAConfig, GSAModel, exist_ok=True)
    AutoModelForCausalLM.register(GSAConfig, GSAForCausalLM, exist_ok=True)


register_auto_classes()

__all__ = [
    "GSACache", "GSAConfig", "GSAForCausalLM", "GSAModel", "GSAPreTrainedModel", "PRESETS", "preset_config",
    "register_auto_classes",
]
