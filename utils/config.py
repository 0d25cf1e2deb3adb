"""Recipes: a YAML/JSON file in configs/ sets argument defaults; a flag the user passed always wins."""
import argparse
import json
import platform
import subprocess
import sys
from pathlib import Path

from .atomic_io import atomic_write_json
from .errors import fail


def add_config_argument(parser: argparse.ArgumentParser) -> None:
    """Add the standard `--config` option (a recipe file whose keys are argument names)."""
    parser.add_argument("--config", type=str, default=None,
                        help="Recipe file (YAML or JSON) whose keys set defaults; command-line flags win.")


def load_recipe(path) -> dict:
    """Load a recipe file (YAML or JSON) into a flat dict; one-line error when unreadable."""
    path = Path(path)
    if not path.is_file():
        raise fail(f"config file not found: {path}")
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix.lower() == ".json":
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except Exception as e:  # noqa: BLE001 - report any parse error as one line
        raise fail(f"could not parse config file {path}: {e}")
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise fail(f"config file {path} must hold a mapping of argument names to values")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def parse_args_with_recipe(parser: argparse.ArgumentParser, argv=None) -> argparse.Namespace:
    """Parse `argv`, using the recipe named by `--config` (if any) as defaults.

    Unknown recipe keys are an error naming the file and key, so typos do not pass silently.
    """
    if not any(a.dest == "config" for a in parser._actions):
        add_config_argument(parser)
    pre, _ = parser.parse_known_args(argv)
    if pre.config:
        recipe = load_recipe(pre.config)
        known = {a.dest for a in parser._actions}
        unknown = sorted(set(recipe) - known)
        if unknown:
            raise fail(f"config file {pre.config}: unknown option(s) {', '.join(unknown)}")
        parser.set_defaults(**recipe)
    return parser.parse_args(argv)


def code_version() -> str:
    """The git commit of the code (with '+dirty' when the tree has changes), or 'unknown'."""
    root = Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                             timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return (sha or "unknown") + ("+dirty" if dirty and sha else "")
    except Exception:  # noqa: BLE001
        return "unknown"


def run_info() -> dict:
    """Environment facts recorded beside every output."""
    import torch

    return {
        "code_version": code_version(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "argv": sys.argv,
    }


def args_to_dict(args) -> dict:
    """A JSON-serialisable dict of parsed arguments."""
    out = {}
    for k, v in vars(args).items():
        if isinstance(v, Path):
            v = str(v)
        out[k] = v
    return out


def save_run_config(args, output_dir, name: str = "run_config.json") -> Path:
    """Write the effective configuration (all arguments + code version) beside the outputs."""
    path = Path(output_dir) / name
    atomic_write_json(path, {"args": args_to_dict(args), **run_info()})
    return path
