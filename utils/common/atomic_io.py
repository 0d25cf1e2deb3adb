"""Atomic file writes: a crash never leaves a half-written file behind."""
import json
import os
import tempfile
from pathlib import Path


def atomic_write_bytes(path, data: bytes) -> None:
    """Write `data` to `path` through a temp file in the same folder and an atomic rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; give the usual permissions
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path, text: str) -> None:
    """Write a UTF-8 text file atomically."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path, obj, indent: int = 2) -> None:
    """Write `obj` as JSON atomically."""
    atomic_write_text(path, json.dumps(obj, indent=indent, ensure_ascii=False) + "\n")


def atomic_save_image(path, image, format: str = None) -> None:
    """Save a PIL image atomically; the format comes from the suffix unless given."""
    import io

    path = Path(path)
    buf = io.BytesIO()
    image.save(buf, format=format or _format_from_suffix(path))
    atomic_write_bytes(path, buf.getvalue())


def atomic_torch_save(path, obj) -> None:
    """torch.save `obj` atomically."""
    import io

    import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(path, buf.getvalue())


def cached_tensor(path, compute, valid):
    """The tensor saved at `path` when it loads and `valid(tensor)`; else `compute()`, saved there atomically.

    path None: no disk cache (always computed). A corrupt or stale file is recomputed and replaced.
    """
    import torch

    if path is not None and Path(path).is_file():
        try:
            cached = torch.load(path, map_location="cpu", weights_only=True)
        except Exception:  # noqa: BLE001 - a corrupt cache entry is recomputed
            cached = None
        if isinstance(cached, torch.Tensor) and valid(cached):
            return cached
    tensor = compute()
    if path is not None:
        atomic_torch_save(path, tensor)
    return tensor


def append_jsonl(path, record: dict) -> None:
    """Append one JSON record as a single line and fsync it.

    A single small write of one line is not torn by a crash in practice; readers
    (`read_jsonl`) skip a truncated last line, so a killed run loses at most that record.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    line = json.dumps(record, ensure_ascii=False) + "\n"
    with open(path, "a", encoding="utf-8") as f:
        f.write(line)
        f.flush()
        os.fsync(f.fileno())


def read_json(path):
    """The parsed JSON of a UTF-8 file; a file that is not JSON is one InputError line naming it."""
    from utils.common.errors import fail

    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise fail(f"{path} is not valid JSON: {e}")


def read_jsonl(path) -> list:
    """Read a JSON-lines file, skipping a truncated (unparsable) final line."""
    path = Path(path)
    if not path.exists():
        return []
    records = []
    lines = path.read_text(encoding="utf-8").splitlines()
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                break  # interrupted write of the last record
            raise
    return records


def check_output_dir(path, flag: str = "--output_dir") -> None:
    """Fail early (before any model loads) when `path` cannot become a writable output folder.

    One-line InputError when `path` is a file, sits below a file, or its nearest existing folder is not
    writable. Nothing is created. The one such check: every stage script calls it.
    """
    from utils.common.errors import fail

    path = Path(path)
    if path.exists() and not path.is_dir():
        raise fail(f"{flag} {path} is a file, not a folder; choose a folder path")
    probe = path
    while not probe.exists():  # nearest existing ancestor: where the first mkdir will happen
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        raise fail(f"{flag} {path} cannot be created: {probe} is a file")
    if not _writable(probe):
        what = "is not writable" if probe == path else f"cannot be created: {probe} is not writable"
        raise fail(f"{flag} {path} {what}")


def _writable(folder: Path) -> bool:
    """True when a file can be created in `folder` (permission bits, then a real probe: read-only mounts, root)."""
    if not os.access(folder, os.W_OK | os.X_OK):
        return False
    try:
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".edge-write-check.", suffix=".tmp")
    except OSError:
        return False
    os.close(fd)
    os.unlink(tmp)
    return True


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _format_from_suffix(path: Path) -> str:
    suffix = path.suffix.lower()
    return {".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG", ".webp": "WEBP"}.get(suffix, "PNG")
