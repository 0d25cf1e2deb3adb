"""Recipes: a YAML/JSON file in configs/ sets argument defaults; a flag the user passed always wins."""
import argparse
import json
import platform
import subprocess
import sys
from pathlib import Path

from utils.common.atomic_io import atomic_write_json
from utils.common.errors import fail, redact_secrets


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
    _print_paper_notes(parser)
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


# ----------------------------------------------------------------------------- the paper code's flag names
#
# Users arrive with the commands of the public EDGE README (github.com/ichbill/EDGE). Each entry below
# maps one of its flags onto ours: `alias` (same meaning: another name of our option), `convert` (same
# meaning, value translated), `const` (sets our option to a fixed value), `save_tag` (the public output
# layout sampling_results/<dataset>/<tag>), `ignore` (accepted, one note line: not needed here) or
# `refuse` (one error line saying what to use instead). README.md "Coming from the paper's code" lists them.

def _set_folder_of(path) -> str:
    """The distilled-set folder an annotation file belongs to (public --label_file_path -> our --input_dir)."""
    p = Path(str(path))
    if p.is_dir() or not p.suffix:
        return str(p)
    return str(p.parent.parent if p.parent.name == "annotations" else p.parent)


def _checkpoints_path(value) -> str:
    """Public --sd_model names a folder under checkpoints/; a path or hub id is taken as it is."""
    p = Path(str(value))
    if not p.exists() and (Path("checkpoints") / p).is_dir():
        return str(Path("checkpoints") / p)
    return str(value)


_SAVE_TAG = ("save_tag", None, "sampling_results/<dataset>/<tag> (the public layout), as --output_dir")
_CAPTION_IN = ("convert", "input_dir", _set_folder_of,
               "the distilled set whose annotation file this is (our --input_dir)")
_CAPTION_DATASET = ("paper_dataset", None, "only names sampling_results/<dataset>/<tag> for --save_tag")
_ANALYSIS_ONLY = "it configures the retrieval model of evaluation; stage 1 scores with --scorer"
_LLAMA_REAL_ROOTS = ("refuse", "this script paraphrases the prompts of a distilled set: pass the sampling output "
                               "folder as --input_dir instead of the real data set's roots")


def _aliases(**names) -> dict:
    """{"--<public flag>": ("alias", <our option>)} for public flags that are only other names of ours."""
    return {f"--{flag}": ("alias", dest) for flag, dest in names.items()}


PAPER_FLAGS = {
    "train": {
        **_aliases(lr="learning_rate", contrastive_lambda="lambda_contrastive", diversity_lambda="lambda_diversity",
                   num_epochs="num_train_epochs", checkpoint_path="output_dir", batch_size_train="train_batch_size",
                   image_size="resolution"),
        "--fraction": ("refuse", "use --max_train_samples N (the first N training images) instead"),
        "--batch_size_test": ("ignore", "stage 1 has no test pass"),
        "--image_encoder": ("ignore", _ANALYSIS_ONLY),
        "--text_encoder": ("ignore", _ANALYSIS_ONLY),
        "--no_aug": ("ignore", "stage 1 uses no augmentation unless --random_flip/--random_crop"),
    },
    "sampling": {
        "--sd_model": ("convert", "pretrained_model_name_or_path", _checkpoints_path,
                       "our --pretrained_model_name_or_path (a name under checkpoints/ also works)"),
        "--label_file_path": ("alias", "ann_root"),
        "--save_tag": _SAVE_TAG,
        "--ipc": ("refuse", "one image per prompt here: ask for N*ipc images with --num_queries", "1"),
        "--prompt_engineering": ("refuse", "put the prefixed prompts ('A picture of a ...') in --prompts_file "
                                           "instead"),
    },
    "caption_gpt": {
        "--label_file_path": _CAPTION_IN,
        "--save_tag": _SAVE_TAG,
        "--dataset": _CAPTION_DATASET,
        "--load_4bit": ("ignore", "the GPT backend loads no model (the public script ignores it too)"),
    },
    "caption_llava": {
        "--label_file_path": _CAPTION_IN,
        "--save_tag": _SAVE_TAG,
        "--dataset": _CAPTION_DATASET,
        "--load_4bit": ("refuse", "4-bit loading is not offered: use --dtype float16 or bfloat16 instead"),
    },
    "caption_llama": {
        **_aliases(ckpt_dir="model", max_batch_size="batch_size", max_gen_len="max_new_tokens"),
        "--dataset": _CAPTION_DATASET,
        "--tokenizer_path": ("ignore", "the tokenizer is read from the --model folder (transformers format)"),
        "--max_seq_len": ("ignore", "prompts are short; generation length is --max_new_tokens"),
        "--image_size": ("ignore", "the Llama backend reads no images"),
        "--no_aug": ("ignore", "the Llama backend reads no images"),
        "--distill_image": ("ignore", "pass the distilled set as --input_dir"),
        "--distill_ann": ("ignore", "pass the distilled set as --input_dir"),
        "--image_root": _LLAMA_REAL_ROOTS,
        "--ann_root": _LLAMA_REAL_ROOTS,
        "--output_file": ("refuse", "this script writes a distilled-set folder: use --output_dir <folder> "
                                    "(captions land in <folder>/annotations/train.json) or --inplace"),
    },
    "evaluation": {
        **_aliases(distill_ann="distill_dir", lr_teacher_img="lr_img", lr_teacher_txt="lr_txt", train_epochs="epochs",
                   eval_freq="eval_every", mom="momentum", l2="weight_decay", name="run_name"),
        "--decay": ("const", "lr_schedule", "step"),
        "--distill_image": ("ignore", "images are read from <--distill_dir>/images as listed in "
                                      "annotations/train.json (the public script also replaces it by "
                                      "<distill_ann>/images)"),
        "--num_experts": ("ignore", "use --seeds N for N trainings"),
        "--dsa": ("ignore", "no differentiable augmentation here"),
        "--loss_type": ("ignore", "the loss is InfoNCE"),
    },
}
# Values of the public scripts that our options name differently.
PAPER_VALUES = {
    "evaluation": {"dataset": {"flickr": "flickr30k"}, "text_encoder": {"bert": "bert-base-uncased"},
                   "image_encoder": {"nfnet": "nfnet_l0"}},
}


class _PaperFlag(argparse.Action):
    """A public-code flag that is not one of our own option strings (see PAPER_FLAGS)."""

    def __init__(self, option_strings, dest, kind=None, target=None, convert=None, message="", allowed=None,
                 **kw):
        super().__init__(option_strings, dest, **kw)
        self.kind, self.target, self.convert, self.message, self.allowed = kind, target, convert, message, allowed
        self.paper_flag = True  # recipes may not set it (utils.common.config._recipe_actions)

    def __call__(self, parser, namespace, values, option_string=None):
        flag = option_string or self.option_strings[0]
        if self.kind == "refuse":
            if self.allowed is not None and values == self.allowed:
                return
            raise fail(f"{flag} (the paper code's flag) has no equivalent here: {self.message}")
        if self.kind == "ignore":
            parser._edge_paper_notes[flag] = f"note: {flag} (the paper code's flag) is ignored: {self.message}"
        elif self.kind == "convert":
            setattr(namespace, self.target, self.convert(values))
        elif self.kind == "const":
            setattr(namespace, self.target, self.convert)
        else:  # save_tag, paper_dataset: kept for the post-parse hook
            setattr(namespace, self.dest, values)


def _value_alias_type(mapping: dict, inner):
    def convert(s):
        s = mapping.get(s, s)
        return inner(s) if inner else s
    return convert


def add_paper_flags(parser: argparse.ArgumentParser, script: str) -> argparse.ArgumentParser:
    """Accept the public EDGE code's flag names for `script` (a key of PAPER_FLAGS) on `parser`."""
    by_dest = {a.dest: a for a in parser._actions}
    parser._edge_paper_notes = {}
    group = parser.add_argument_group("the paper code's flag names (see README: Coming from the paper's code)")
    for flag, spec in PAPER_FLAGS[script].items():
        kind = spec[0]
        if flag in parser._option_string_actions:
            continue  # the script has an option of that name itself: it wins
        if kind == "alias":  # another option string of the same action: it shows in --help beside ours
            action = by_dest[spec[1]]
            action.option_strings.append(flag)
            parser._option_string_actions[flag] = action
            continue
        if kind == "convert":
            target, convert, text = spec[1], spec[2], spec[3]
            if by_dest[target].required:  # the alias satisfies it; checked after parsing instead
                by_dest[target].required = False
                parser.__dict__.setdefault("_edge_post_parse", []).append(_require(target))
            group.add_argument(flag, action=_PaperFlag, kind=kind, target=target, convert=convert,
                               dest=f"paper_{flag.lstrip('-')}", default=argparse.SUPPRESS, help=f"= {text}")
        elif kind == "const":
            group.add_argument(flag, action=_PaperFlag, nargs=0, kind=kind, target=spec[1], convert=spec[2],
                               dest=f"paper_{flag.lstrip('-')}", default=argparse.SUPPRESS,
                               help=f"= --{spec[1]} {spec[2]}")
        elif kind in ("save_tag", "paper_dataset"):
            group.add_argument(flag, action=_PaperFlag, kind=kind, dest=kind, default=argparse.SUPPRESS,
                               help=spec[2])
        else:  # ignore / refuse: a switch or a flag with a value, as the public script had it
            group.add_argument(flag, action=_PaperFlag, nargs="?", kind=kind, message=spec[1],
                               allowed=spec[2] if len(spec) > 2 else None, dest=f"paper_{flag.lstrip('-')}",
                               default=argparse.SUPPRESS, help=f"{kind}d: {spec[1]}")
    for dest, mapping in PAPER_VALUES.get(script, {}).items():
        action = by_dest[dest]
        action.type = _value_alias_type(mapping, action.type)
    parser.__dict__.setdefault("_edge_post_parse", []).append(_finish_paper_flags)
    return parser


def _require(dest):
    def check(args):
        if getattr(args, dest, None) is None:
            raise fail(f"--{dest} is required")
    return check


def _finish_paper_flags(args) -> None:
    """After the final parse: the public output layout for --save_tag, then drop the helper attributes."""
    tag = vars(args).pop("save_tag", None)
    paper_dataset = vars(args).pop("paper_dataset", None)
    for k in [k for k in vars(args) if k.startswith("paper_")]:
        delattr(args, k)
    if tag is not None:
        if getattr(args, "output_dir", None):
            raise fail("give --output_dir or --save_tag (the paper code's sampling_results/<dataset>/<tag>), not both")
        dataset = getattr(args, "dataset", None) or paper_dataset or "coco"  # the public caption scripts' default
        args.output_dir = str(Path("sampling_results") / str(dataset) / str(tag))


def _print_paper_notes(parser) -> None:
    for line in getattr(parser, "_edge_paper_notes", {}).values():
        print(line, file=sys.stderr)
    parser._edge_paper_notes = {}
