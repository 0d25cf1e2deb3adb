"""LLaVA-1.5 through transformers: batched sampling of K-1 captions per image."""
import torch

from dataset.images import load_image
from utils.common.seeding import derive_seed
from utils.models.loading import from_pretrained

from .backend import SampledModelBackend, generate_in_batches
from .hf_models import caption_device, resolve_dtype

DEFAULT_MODEL = "llava-hf/llava-1.5-7b-hf"
DEFAULT_INSTRUCTION = "Describe this image in one brief sentence."


class LlavaBackend(SampledModelBackend):
    """Captions sampled from LlavaForConditionalGeneration, `batch_size` images per forward."""

    name = "llava"

    def __init__(self, model=DEFAULT_MODEL, instruction=DEFAULT_INSTRUCTION, batch_size=8, max_new_tokens=40,
                 temperature=1.0, top_p=0.9, dtype="auto", seed=0):
        super().__init__(model, instruction, batch_size, max_new_tokens, temperature, top_p, dtype, seed)
        self.processor = None

    def setup(self) -> None:
        from transformers import AutoProcessor, LlavaForConditionalGeneration

        self.device = caption_device()
        self.processor = from_pretrained(AutoProcessor, self.model_name, "LLaVA processor")
        self.model = from_pretrained(LlavaForConditionalGeneration, self.model_name, "LLaVA model",
                                     dtype=resolve_dtype(self.dtype, self.device))
        self.model.to(self.device).eval()
        self.processor.tokenizer.padding_side = "left"  # generation continues from the right end
        self.prompt = self._prompt()

    def _prompt(self) -> str:
        conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": self.instruction}]}]
        if getattr(self.processor, "chat_template", None):
            return self.processor.apply_chat_template(conversation, add_generation_prompt=True)
        return f"USER: <image>\n{self.instruction} ASSISTANT:"  # the LLaVA-1.5 conversation format

    @torch.no_grad()
    def _sample(self, batch) -> list:
        n = batch[0].n
        images = [load_image(r.image_path) for r in batch]
        inputs = self.processor(images=images, text=[self.prompt] * len(batch), return_tensors="pt", padding=True)
        inputs = inputs.to(self.device)
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
        torch.manual_seed(derive_seed(derive_seed(self.seed, batch[0].attempt), batch[0].index))
        out = self.model.generate(**inputs, do_sample=True, temperature=self.temperature, top_p=self.top_p,
                                  num_return_sequences=n, max_new_tokens=self.max_new_tokens)
        texts = self.processor.tokenizer.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
        return [texts[i * n:(i + 1) * n] for i in range(len(batch))]

    def generate(self, requests):
        yield from generate_in_batches(requests, self.batch_size, self._sample)

