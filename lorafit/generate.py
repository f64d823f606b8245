"""``lorafit generate``: chat-template-aware generation with an optional adapter, streamed as it comes."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from lorafit.adapter_io import load_adapter
from lorafit.config import ModelConfig
from lorafit.device import compute_device
from lorafit.model import adapter_tokenizer, load_base_model, load_tokenizer


class Generator:
    """A loaded model + tokenizer that answers a conversation, streaming tokens to ``on_text``."""

    def __init__(self, model_cfg: ModelConfig, adapter: Path | None = None, device: str | None = None):
        """``device``: ``--device`` (None or auto: lorafit.device's rule)."""
        device = compute_device(device)  # an unusable --device is refused before anything loads
        self.tokenizer = load_tokenizer(model_cfg, adapter_tokenizer([adapter] if adapter is not None else []))
        self.model = load_base_model(model_cfg, device=device).eval()
        if adapter is not None:
            load_adapter(self.model, adapter)

    @torch.no_grad()
    def reply(self, messages: list[dict[str, str]], on_text: Callable[[str], None], max_new_tokens: int = 256,
              temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None) -> str:
        from transformers import TextStreamer

        tokenizer = self.tokenizer
        if tokenizer.chat_template:
            prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        else:  # a base model without a template continues the raw text
            prompt = "\n".join(m["content"] for m in messages)
        input_ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=not tokenizer.chat_template).input_ids
        if seed is not None:
            torch.manual_seed(seed)

        class _Streamer(TextStreamer):
            def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
                on_text(text)

        sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p} if temperature > 0 else \
            {"do_sample": False}
        input_ids = input_ids.to(next(self.model.parameters()).device)  # inputs follow the model
        output = self.model.generate(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=max_new_tokens,
            pad_token_id=tokenizer.pad_token_id,
            streamer=_Streamer(tokenizer, skip_prompt=True, skip_special_tokens=True),
            **sampling,
        )
        return tokenizer.decode(output[0, input_ids.shape[1]:], skip_special_tokens=True).strip()
