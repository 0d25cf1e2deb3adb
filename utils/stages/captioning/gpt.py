"""OpenAI-compatible vision chat API backend (GPT-4o-mini by default).

Retries with exponential backoff on rate limits, timeouts and server errors are the openai
client's own (`max_retries`, `timeout`); an image whose request still fails is reported, not
cached, so a rerun asks again. The API key is read from OPENAI_API_KEY only.
"""
import base64
import mimetypes
import os
import threading
from concurrent.futures import ThreadPoolExecutor, as_completed

from utils.common.errors import fail, redact_secrets

from .backend import CaptionBackend

DEFAULT_MODEL = "gpt-4o-mini"
DEFAULT_INSTRUCTION = "Describe this image in one brief sentence."
KEY_ENV = "OPENAI_API_KEY"


class MalformedReply(RuntimeError):
    """The server answered 2xx but without usable captions."""


def image_data_url(path) -> str:
    """The image file's bytes as a base64 data URL (sent as they are, no re-encoding)."""
    mime = mimetypes.guess_type(str(path))[0] or "image/png"
    return f"data:{mime};base64,{base64.b64encode(open(path, 'rb').read()).decode('ascii')}"


class GPTBackend(CaptionBackend):
    """Captions from a chat-completions endpoint, `max_concurrency` requests in flight."""

    name = "gpt"

    def __init__(self, model=DEFAULT_MODEL, instruction=DEFAULT_INSTRUCTION, base_url=None, max_concurrency=4,
                 max_retries=5, timeout=60.0, temperature=1.0, max_tokens=60, detail="low",
                 one_per_request=False, http_client=None):
        if max_concurrency < 1:
            raise fail(f"--max_concurrency must be at least 1, got {max_concurrency}")
        if max_retries < 0:
            raise fail(f"--max_retries must be 0 or more, got {max_retries}")
        self.model, self.instruction, self.base_url = model, instruction, base_url
        self.max_concurrency, self.max_retries, self.timeout = max_concurrency, max_retries, timeout
        self.temperature, self.max_tokens, self.detail = temperature, max_tokens, detail
        self.one_per_request = one_per_request
        self.http_client = http_client
        self.client = None

    def describe(self) -> dict:
        return {"backend": self.name, "model": self.model, "instruction": self.instruction,
                "settings": {"base_url": redact_secrets(self.base_url), "temperature": self.temperature,
                             "max_tokens": self.max_tokens, "detail": self.detail,
                             "one_per_request": self.one_per_request, "max_retries": self.max_retries,
                             "timeout": self.timeout, "max_concurrency": self.max_concurrency}}

    def check(self) -> None:
        if not os.environ.get(KEY_ENV, "").strip():
            raise fail(f"{KEY_ENV} is not set: export your API key in this variable "
                       f"(any non-empty value for a local server given with --base_url)")

    def setup(self) -> None:
        import openai

        self.check()
        self.client = openai.OpenAI(api_key=os.environ[KEY_ENV].strip(), base_url=self.base_url,
                                    max_retries=self.max_retries, timeout=self.timeout,
                                    http_client=self.http_client)

    def _redact(self, text: str) -> str:
        """`text` without the API key or credentials of --base_url (before it is printed or written)."""
        key = os.environ.get(KEY_ENV, "").strip()
        text = text.replace(key, "***") if key else text
        if self.base_url:  # the URL as given, and as the client normalised it
            text = text.replace(str(self.base_url), redact_secrets(str(self.base_url)))
        return redact_secrets(text)

    def _ask(self, data_url: str, n: int) -> list:
        resp = self.client.chat.completions.create(
            model=self.model,
            messages=[{"role": "user", "content": [
                {"type": "text", "text": self.instruction},
                {"type": "image_url", "image_url": {"url": data_url, "detail": self.detail}}]}],
            n=n, temperature=self.temperature, max_tokens=self.max_tokens)
        choices = getattr(resp, "choices", None)
        if not isinstance(choices, list) or not choices:
            raise MalformedReply(f"reply without choices: {str(resp)[:120]!r}")
        texts = []
        for c in choices:
            content = getattr(getattr(c, "message", None), "content", None)
            if not isinstance(content, str):
                raise MalformedReply(f"reply choice without text content: {str(c)[:120]!r}")
            texts.append(content)
        return texts

    def caption_one(self, request) -> list:
        """Up to `request.n` answers: one request with n=..., then single ones if the server ignored n."""
        data_url = image_data_url(request.image_path)
        if self.one_per_request:
            return [t for _ in range(request.n) for t in self._ask(data_url, 1)]
        texts = self._ask(data_url, request.n)
        for _ in range(request.n - len(texts)):
            texts += self._ask(data_url, 1)
        return texts

    def _safe_caption(self, request):
        import openai

        if self._refused.is_set():  # an earlier request was refused: send no more
            return RuntimeError("not sent: the API refused an earlier request")
        try:
            return self.caption_one(request)
        except (openai.AuthenticationError, openai.PermissionDeniedError, openai.NotFoundError) as e:
            # every other image would fail the same way: stop the run
            self._refused.set()
            raise fail(f"the API at {self._redact(str(self.client.base_url))} refused the request for model "
                       f"{self.model!r}: "
                       f"{self._redact(' '.join(str(e).split()))[:300]}")
        except Exception as e:  # noqa: BLE001 - any other error after retries is this image's failure
            return RuntimeError(self._redact(f"{type(e).__name__}: {e}"))

    def generate(self, requests):
        self._refused = threading.Event()
        pool = ThreadPoolExecutor(max_workers=self.max_concurrency)
        try:
            futures = {pool.submit(self._safe_caption, r): r for r in requests}
            for fut in as_completed(futures):
                yield futures[fut], fut.result()
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
