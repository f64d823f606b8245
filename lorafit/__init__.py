"""lorafit: fine-tune Hugging Face causal LMs with LoRA from one YAML recipe."""

__version__ = "0.1.0"

from lorafit.config import Recipe, load_recipe  # noqa: E402
from lorafit.inject import inject_lora  # noqa: E402
from lorafit.lora import LoRALinear  # noqa: E402

__all__ = ["LoRALinear", "Recipe", "__version__", "inject_lora", "load_recipe"]
