"""Text-only paraphrase backend: an instruction model rewrites each prompt with other wording."""
import torch

from utils.common.errors import fail
from utils.common.seeding import derive_seed
from utils.models.loading import from_pretrained

from .backend import SampledModelBackend, generate_in_batches
from .hf_models import caption_device, resolve_dtype

DEFAULT_MODEL = "meta-llama/Llama-3.1-8B-Instruct"
DEFAULT_INSTRUCTION = ("Rewrite this image caption with different wording but the same meaning. "
                       "Reply with the new caption only, as one sentence.\nCaption: {caption}")


class LlamaBackend(SampledModelBackend):
    """Paraphrases sampled from an AutoModelForCausalLM through its tokenizer's chat template."""

    name = "llama"
    needs_images = False

    def __init__(self, model=DEFAULT_MODEL, instruction=DEFAULT_INSTRUCTION, batch_size=8, max_new_tokens=60,
                 temperature=1.0, top_p=0.9, dtype="auto", seed=0):
        if "{caption}" not in instruction:
            raise fail("--instruction must contain {caption}, where the prompt caption is inserted")
        super().__init__(model, instruction, batch_size, max_new_tokens, temperature, top_p, dtype, seed)
        self.tokenizer = None

    def setup(self) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.device = caption_device()
        self.tokenizer = from_pretrained(AutoTokenizer, self.model_name, "tokenizer")
        if not getattr(self.tokenizer, "chat_template", None):
            raise fail(f"the tokenizer of '{self.model_name}' has no chat template; use an instruction-tuned model")
        self.model = from_pretrained(AutoModelForCausalLM, self.model_name, "language model",
                                     dtype=resolve_dtype(self.dtype, self.device))
        self.model.to(self.device).eval()
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token

    def chat_text(self, caption: str) -> str:
        """The chat-formatted model input asking for a rewrite of `caption`."""
        messages = [{"role": "user", "content": self.instruction.format(caption=caption)}]
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    @torch.no_grad()
    def _sample(self, batch) -> list:
        n = batch[0].n
        texts = [self.chat_text(r.prompt) for r in batch]
        # the chat template already holds the special tokens (e.g. <|begin_of_text|>)
        enc = self.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        inputs = {k: enc[k].to(self.device) for k in ("input_ids", "attention_mask")}
        torch.manual_seed(derive_seed(derive_seed(self.seed, batch[0].attempt), batch[0].index))
        out = self.model.generate(**inputs, do_sample=True, temperature=self.temperature, top_p=self.top_p,
                                  num_return_sequences=n, max_new_tokens=self.max_new_tokens,
                                  pad_token_id=self.tokenizer.pad_token_id)
        decoded = self.tokenizer.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
        return [decoded[i * n:(i + 1) * n] for i in range(len(batch))]

    def generate(self, requests):
        yield from generate_in_batches(requests, self.batch_size, self._sample)
