"""Caption cleaning and de-duplication shared by every captioning backend."""
import re
import string

_QUOTES = "\"'`“”‘’«»"
_LABEL = re.compile(r"^\s*(?:caption|description|rewritten caption|new caption|answer)\s*[:\-]\s*", re.IGNORECASE)
_LIST_MARK = re.compile(r"^\s*(?:[-*•]|\d+[.)])\s+")
# "The image shows ...", "This picture depicts ...", "In this image, ..." add nothing to a caption.
_BOILERPLATE = re.compile(
    r"^(?:(?:the|this)\s+(?:image|picture|photo|photograph|scene)\s+"
    r"(?:shows|depicts|features|displays|captures|portrays|illustrates|presents|contains)"
    r"|in\s+(?:the|this)\s+(?:image|picture|photo|photograph)\s*,?"
    r"|(?:this|it)\s+is\s+an?\s+(?:image|picture|photo|photograph)\s+(?:of|showing|depicting))\s*[:,]?\s+",
    re.IGNORECASE)
_PUNCT = str.maketrans({c: " " for c in string.punctuation + "“”‘’«»"})


def _strip_quotes(text: str) -> str:
    while len(text) >= 2 and text[0] in _QUOTES and text[-1] in _QUOTES + ".":
        inner = text[1:-1] if text[-1] in _QUOTES else text[1:-2] + "."
        text = inner.strip()
    if len(text) >= 1 and text[0] in _QUOTES and text.count(text[0]) == 1:
        text = text[1:].strip()  # an opening quote the model never closed
    return text


def clean_caption(text, strip_boilerplate: bool = True) -> str:
    """One tidy line: the first non-empty line, no label/list mark/quotes, optionally no "The image shows".

    Returns "" when nothing usable is left (callers drop empty captions).
    """
    if not isinstance(text, str):
        return ""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    if not lines:
        return ""
    line = " ".join(lines[0].split())
    line = _LIST_MARK.sub("", _LABEL.sub("", line)).strip()
    line = _strip_quotes(line)
    if strip_boilerplate:
        stripped = _BOILERPLATE.sub("", line, count=1).strip()
        if stripped and stripped != line:
            line = stripped[0].upper() + stripped[1:]
    return line.strip()


def caption_key(text: str) -> str:
    """Comparison key: lower case, punctuation dropped, runs of spaces collapsed."""
    return " ".join(text.lower().translate(_PUNCT).split())


def merge_distinct(prompt: str, kept: list, candidates, limit: int) -> list:
    """`kept` extended by `candidates` that differ (by `caption_key`) from the prompt and each other.

    Stops at `limit` captions; candidates are assumed already cleaned; empty ones are skipped.
    """
    out = list(kept)
    seen = {caption_key(prompt)} | {caption_key(c) for c in out}
    for cand in candidates:
        if len(out) >= limit:
            break
        key = caption_key(cand)
        if key and key not in seen:
            seen.add(key)
            out.append(cand)
    return out
