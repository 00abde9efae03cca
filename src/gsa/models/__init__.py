"""GSA language models with Hugging Face conventions; importing this registers them with the Auto classes."""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .cache import GSACache
from .configuration_gsa import GSAConfig
from .modeling_gsa import GSAForCausalLM, GSAModel, GSAPreTrainedModel
from .presets import PRESETS, preset_config

AutoConfig.register(GSAConfig.model_type, GSAConfig, exist_ok=True)
AutoModel.register(GSAConfig, GSAModel, exist_ok=True)
AutoModelForCausalLM.register(GSAConfig, GSAForCausalLM, exist_ok=True)

__all__ = ["GSACache", "GSAConfig", "GSAForCausalLM", "GSAModel", "GSAPreTrainedModel", "PRESETS", "preset_config"]
