"""Recipes: a YAML/JSON file in configs/ sets argument defaults; a flag the user passed always wins."""
import argparse
import json
import platform
import subprocess
import sys
from pathlib import Path

from .atomic_io import atomic_write_json
from .errors import fail, redact_secrets


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

    Recipe values go through the parser's own actions (type conversion, choices, nargs) exactly as
    command-line values do; unknown keys are refused with the closest valid name. Every problem is a
    one-line InputError naming the recipe file and key. Flags the user passed still win.
    """
    if not any(a.dest == "config" for a in parser._actions):
        add_config_argument(parser)
    pre, _ = parser.parse_known_args(argv)
    if pre.config:
        parser.set_defaults(**validate_recipe(parser, load_recipe(pre.config), pre.config))
    args = parser.parse_args(argv)
    for hook in getattr(parser, "_edge_post_parse", ()):
        hook(args)
    return args


def _recipe_actions(parser: argparse.ArgumentParser) -> dict:
    """dest -> action for every option a recipe may set (not help/version/--config, not hidden paper flags)."""
    return {a.dest: a for a in parser._actions
            if a.dest not in ("help", "config", argparse.SUPPRESS) and not getattr(a, "paper_flag", False)
            and not isinstance(a, (argparse._HelpAction, argparse._VersionAction))}


def _closest(key: str, parser: argparse.ArgumentParser, actions: dict) -> str:
    """' (did you mean X?)' for an unknown recipe key, '' when nothing is close."""
    import difflib

    by_flag = {}  # a flag name (also aliases such as sd_model) -> the recipe key to use
    for dest, action in actions.items():
        for opt in action.option_strings:
            by_flag[opt.lstrip("-").replace("-", "_")] = dest
    if key in by_flag:
        return f" (use {by_flag[key]})"
    match = difflib.get_close_matches(key, list(actions), n=1, cutoff=0.6)
    return f" (did you mean {match[0]}?)" if match else ""


def validate_recipe(parser: argparse.ArgumentParser, recipe: dict, path) -> dict:
    """The recipe's values converted and checked by `parser`'s actions, as if given on the command line."""
    actions = _recipe_actions(parser)
    out = {}
    for key, value in recipe.items():
        action = actions.get(key)
        if action is None:
            raise fail(f"config file {path}: unknown option {key!r}{_closest(key, parser, actions)}")
        out[key] = _recipe_value(parser, action, key, value, path)
    return out


def _recipe_value(parser, action, key, value, path):
    where = f"config file {path}: {key}:"
    if value is None:
        return None
    if action.nargs == 0:  # store_true / store_false / store_const
        if not isinstance(value, bool):
            raise fail(f"{where} expected true or false, got {value!r}")
        if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
            return value  # the key is the destination: `center_crop: false` sets center_crop to False
        return action.const if value else action.default
    many = action.nargs in ("+", "*") or isinstance(action.nargs, int) and action.nargs > 1 \
        or isinstance(action, argparse._AppendAction)
    if isinstance(value, (list, tuple)) and not many:
        raise fail(f"{where} expected one value, got a list {value!r}")
    if isinstance(value, dict):
        raise fail(f"{where} expected a value, got a mapping")
    items = list(value) if isinstance(value, (list, tuple)) else [value]
    if any(isinstance(v, bool) for v in items):
        # YAML reads no/yes/off/on/true/false as booleans: never let them become the strings "False"/"True"
        raise fail(f"{where} got the YAML boolean {str(items[0]).lower()}; quote the value (e.g. \"no\") "
                   f"if a word was meant")
    if any(isinstance(v, (list, tuple, dict)) for v in items):
        raise fail(f"{where} expected plain values, got {value!r}")
    strings = [_as_cli_string(v) for v in items]
    try:
        if isinstance(action, argparse._AppendAction):
            return [parser._get_values(action, [s]) for s in strings]
        converted = parser._get_values(action, strings)
    except argparse.ArgumentError as e:
        raise fail(f"{where} {e.message}")
    except (TypeError, ValueError) as e:  # a type function that raises something else
        raise fail(f"{where} invalid value {value!r}: {e}")
    return converted


def _as_cli_string(v) -> str:
    """The string a user would type for a YAML scalar (floats keep full precision)."""
    return repr(v) if isinstance(v, float) else str(v)


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
        "argv": [redact_secrets(a) for a in sys.argv],
    }


def args_to_dict(args) -> dict:
    """A JSON-serialisable dict of parsed arguments (URL credentials and API keys masked)."""
    out = {}
    for k, v in vars(args).items():
        if isinstance(v, Path):
            v = str(v)
        if isinstance(v, (list, tuple)):
            v = [redact_secrets(x) for x in v]
        out[k] = redact_secrets(v)
    return out


def save_run_config(args, output_dir, name: str = "run_config.json") -> Path:
    """Write the effective configuration (all arguments + code version) beside the outputs."""
    path = Path(output_dir) / name
    atomic_write_json(path, {"args": args_to_dict(args), **run_info()})
    return path
