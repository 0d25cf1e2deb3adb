"""The built-in procedural image-caption data set: coloured shapes on light backgrounds.

Each image holds 1..max_shapes shapes, each with a kind (circle, square, ...), a colour, a size
(small/large) and a coarse position (left/right/top/bottom/center); every image gets several
differently worded captions that name exactly what is drawn. Everything is a pure function of
(spec, seed): the same seed writes the same bytes in every PNG and JSON file.

Layout written under the output folder:
    images/{train,val,test}/NNNNNN.png
    annotations/procedural_train.json       Karpathy train format (one entry per caption)
    annotations/procedural_{val,test}.json  Karpathy eval format (captions_per_image each)
    annotations/procedural_attributes.json  {rel_path: {"background", "objects": [{shape, colour, size, position}]}}
    annotations/procedural_noisy_captions.json  with --caption_noise only: {rel_path: {caption index: caption}}
    spec.json                                the spec and seed (written last: marks a complete set)

Usage:
    python -m dataset.procedural --output_dir data/procedural --seed 0
    python -m dataset.procedural --output_dir data/procedural32 --resolution 32 --n_train 2000
"""
import argparse
import dataclasses
import io
import json
import math
import random
import re
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from PIL import Image
from tqdm import tqdm

from utils.common.atomic_io import atomic_write_json, read_json
from utils.common.config import parse_args_with_recipe
from utils.common.errors import InputError, fail, run_cli
from utils.common.seeding import derive_seed

from dataset.procedural_captions import (CAPTION_STYLES, caption_attributes, make_captions,  # noqa: F401 (re-exported)
                                         name_pattern)
from dataset.procedural_drawing import render_scene

FORMAT_VERSION = 3  # bump whenever drawing or caption code changes the output
SPLITS = ("train", "val", "test")
NOISY_CAPTIONS_FILE = "annotations/procedural_noisy_captions.json"  # written with --caption_noise only

# Saturated, well separated colours (names are the words used in captions).
COLOUR_PALETTE = {
    "red": (220, 30, 35),
    "green": (30, 160, 60),
    "blue": (30, 80, 220),
    "yellow": (245, 205, 20),
    "purple": (135, 45, 175),
    "orange": (245, 120, 15),
    "pink": (240, 105, 180),
    "brown": (125, 75, 35),
    "black": (25, 25, 25),
    "cyan": (20, 190, 205),
}
# Backgrounds: (top colour, bottom colour); equal colours give a plain background.
# Their names must not contain a colour or shape word, so captions parse unambiguously.
BACKGROUND_PALETTE = {
    "white": ((250, 250, 250), (250, 250, 250)),
    "light grey": ((212, 212, 212), (212, 212, 212)),
    "beige": ((238, 226, 198), (238, 226, 198)),
    "grey gradient": ((196, 196, 196), (248, 248, 248)),
    "cream gradient": ((232, 220, 190), (252, 250, 242)),
}
SHAPE_KINDS = ("circle", "square", "triangle", "star", "cross", "diamond", "hexagon")
SIZES = ("small", "large")
POSITIONS = ("left", "right", "top", "bottom", "center")

# Centres and radii as fractions of the image side.
_CENTRES = {"left": (0.27, 0.5), "right": (0.73, 0.5), "top": (0.5, 0.27), "bottom": (0.5, 0.73),
            "center": (0.5, 0.5)}
_RADII = {"small": 0.12, "large": 0.2}


@dataclass
class ProceduralSpec:
    """Options of the procedural data set; the defaults are the project's offline data set."""
    resolution: int = 64
    shapes: tuple = ("circle", "square", "triangle", "star", "cross")
    colours: tuple = ("red", "green", "blue", "yellow", "purple", "orange")
    backgrounds: tuple = ("white", "light grey", "beige", "grey gradient")
    min_shapes: int = 1
    max_shapes: int = 3
    captions_per_image: int = 5
    n_train: int = 4000
    n_val: int = 500
    n_test: int = 1000
    supersample: int = 4  # draw at this multiple of the resolution, then box-downsample (anti-aliasing)
    shape_scale: float = 1.0  # multiplies the small/large radii (bigger shapes stay legible at 32 px)
    caption_style: str = "standard"  # template set of dataset.procedural_captions.CAPTION_STYLES
    caption_noise: float = 0.0  # share of training captions that name one wrong colour or shape

    def __post_init__(self):
        for name in ("shapes", "colours", "backgrounds"):
            setattr(self, name, tuple(getattr(self, name)))
        self.validate()

    def validate(self) -> None:
        """Raise InputError naming the first bad option."""
        if self.resolution < 16:
            raise fail(f"procedural spec: resolution must be at least 16, got {self.resolution}")
        for name, known in (("shapes", SHAPE_KINDS), ("colours", COLOUR_PALETTE), ("backgrounds", BACKGROUND_PALETTE)):
            values = getattr(self, name)
            if not values:
                raise fail(f"procedural spec: {name} must not be empty")
            unknown = [v for v in values if v not in known]
            if unknown:
                raise fail(f"procedural spec: unknown {name} {', '.join(unknown)}; known: {', '.join(known)}")
            if len(set(values)) != len(values):
                raise fail(f"procedural spec: {name} has repeats")
        if not 1 <= self.min_shapes <= self.max_shapes <= 4:
            raise fail(f"procedural spec: need 1 <= min_shapes <= max_shapes <= 4, got "
                       f"{self.min_shapes}..{self.max_shapes}")
        if self.max_shapes > len(self.shapes) * len(self.colours):
            raise fail("procedural spec: max_shapes exceeds the number of distinct (colour, shape) pairs")
        if self.caption_style not in CAPTION_STYLES:
            raise fail(f"procedural spec: unknown caption_style {self.caption_style}; "
                       f"known: {', '.join(CAPTION_STYLES)}")
        n_templates = len(CAPTION_STYLES[self.caption_style])
        if self.captions_per_image < 1 or self.captions_per_image > n_templates:
            raise fail(f"procedural spec: captions_per_image must be in 1..{n_templates} "
                       f"(the {self.caption_style} caption style's templates)")
        for name in ("n_train", "n_val", "n_test"):
            if getattr(self, name) < 1:
                raise fail(f"procedural spec: {name} must be at least 1")
        if self.supersample < 1:
            raise fail("procedural spec: supersample must be at least 1")
        if not 0.0 <= self.caption_noise <= 1.0:
            raise fail(f"procedural spec: caption_noise must be in [0, 1], got {self.caption_noise}")
        if self.caption_noise and len(self.colours) < 2 and len(self.shapes) < 2:
            raise fail("procedural spec: caption_noise needs at least two colours or two shapes to swap")
        if not 0.5 <= self.shape_scale <= 1.5:
            raise fail(f"procedural spec: shape_scale must be in [0.5, 1.5], got {self.shape_scale}")

    def split_size(self, split: str) -> int:
        return {"train": self.n_train, "val": self.n_val, "test": self.n_test}[split]

    def to_dict(self) -> dict:
        data = json.loads(json.dumps(dataclasses.asdict(self)))
        # Sets made before these options existed recorded neither; leaving the defaults out keeps
        # their spec.json equal to today's record, so they are still resumed rather than remade.
        if data["caption_style"] == "standard":
            del data["caption_style"]
        if data["caption_noise"] == 0.0:
            del data["caption_noise"]
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "ProceduralSpec":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise fail(f"procedural spec: unknown option(s) {', '.join(unknown)}")
        return cls(**data)


# ---------------------------------------------------------------- scene sampling

def sample_scene(spec: ProceduralSpec, rng: random.Random) -> dict:
    """Draw one scene: a background and non-overlapping objects with distinct (colour, shape) pairs."""
    background = rng.choice(spec.backgrounds)
    n = rng.randint(spec.min_shapes, spec.max_shapes)
    while True:  # rejection sampling; a layout of small shapes always exists for n <= 4
        positions = rng.sample(POSITIONS, n)
        pairs = set()
        objects = []
        while len(objects) < n:
            shape, colour = rng.choice(spec.shapes), rng.choice(spec.colours)
            if (shape, colour) in pairs:
                continue
            pairs.add((shape, colour))
            objects.append({"shape": shape, "colour": colour, "size": rng.choice(SIZES),
                            "position": positions[len(objects)]})
        placed = [_place(o, rng, spec.shape_scale) for o in objects]
        if _no_overlap(placed):
            break
    for o, (cx, cy, r, angle) in zip(objects, placed):
        o["geometry"] = (cx, cy, r, angle)
    return {"background": background, "objects": objects}


def _place(obj, rng, scale=1.0):
    cx, cy = _CENTRES[obj["position"]]
    jitter = 0.03
    cx += rng.uniform(-jitter, jitter)
    cy += rng.uniform(-jitter, jitter)
    r = scale * _RADII[obj["size"]] * rng.uniform(0.92, 1.08)
    angle = 0.0 if obj["shape"] == "circle" else rng.uniform(-15.0, 15.0)
    return cx, cy, r, angle


def _no_overlap(placed) -> bool:
    for i in range(len(placed)):
        for j in range(i + 1, len(placed)):
            (x1, y1, r1, _), (x2, y2, r2, _) = placed[i], placed[j]
            if math.hypot(x1 - x2, y1 - y2) < 1.2 * (r1 + r2):
                return False
    return True




# ---------------------------------------------------------------- data set files

def _split_offset(split: str) -> int:
    return SPLITS.index(split) * 1_000_000_000


def corrupt_caption(caption: str, scene: dict, spec: ProceduralSpec, rng: random.Random) -> str:
    """The caption with one mention of an object's colour or shape word swapped for another of the spec's values.

    Models a noisy caption source: the rest of the sentence still describes the drawn scene. When several
    objects share the word, one mention is drawn. (No palette colour or shape is part of a background's name.)
    """
    obj = rng.choice(scene["objects"])
    kinds = [k for k, values in (("colour", spec.colours), ("shape", spec.shapes)) if len(values) > 1]
    kind = rng.choice(kinds)
    values = spec.colours if kind == "colour" else spec.shapes
    wrong = rng.choice([v for v in values if v != obj[kind]])
    mentions = list(re.finditer(name_pattern(obj[kind], plural=kind == "shape"), caption))
    if not mentions:
        raise ValueError(f"caption {caption!r} does not name its object's {kind} {obj[kind]!r}")
    m = mentions[0] if len(mentions) == 1 else rng.choice(mentions)  # one mention: the rng stream is unchanged
    return caption[:m.start()] + wrong + caption[m.start() + len(obj[kind]):]  # a plural ending stays


def generate_split(spec: ProceduralSpec, seed: int, split: str):
    """Yield (rel_path, image, captions, attributes, noisy) for every image of a split, deterministically.

    `noisy` lists the indices of captions corrupted by `spec.caption_noise` (training split only: the
    validation and test captions always name the drawn scene).
    """
    for i in range(spec.split_size(split)):
        rng = random.Random(derive_seed(seed, _split_offset(split) + i))
        scene = sample_scene(spec, rng)
        image = render_scene(scene, spec.resolution, spec.supersample)
        captions = make_captions(scene, spec.captions_per_image, rng, spec.caption_style)
        noisy = []
        if spec.caption_noise and split == "train":
            # A stream of its own, so the scene and the exact captions are those of the noise-free set.
            noise_rng = random.Random(f"caption_noise:{seed}:{i}")
            for j, caption in enumerate(captions):
                if noise_rng.random() < spec.caption_noise:
                    captions[j] = corrupt_caption(caption, scene, spec, noise_rng)
                    noisy.append(j)
        attributes = {"background": scene["background"],
                      "objects": [{k: o[k] for k in ("shape", "colour", "size", "position")}
                                  for o in scene["objects"]]}
        yield f"images/{split}/{i:06d}.png", image, captions, attributes, noisy


def _spec_record(spec: ProceduralSpec, seed: int) -> dict:
    return {"format_version": FORMAT_VERSION, "seed": int(seed), "spec": spec.to_dict()}


def _is_complete(out_dir: Path, spec: ProceduralSpec) -> bool:
    if not all((out_dir / "annotations" / f"procedural_{s}.json").is_file() for s in SPLITS + ("attributes",)):
        return False
    return all((out_dir / "images" / s / f"{spec.split_size(s) - 1:06d}.png").is_file() for s in SPLITS)


def _png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG", optimize=False, compress_level=6)
    return buf.getvalue()


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")


def generate_procedural_dataset(out_dir, spec: ProceduralSpec = None, seed: int = 0, overwrite: bool = False,
                                progress: bool = True) -> Path:
    """Write the procedural data set to `out_dir` and return it.

    A complete set made with the same spec and seed is kept as it is (resume); one made by an
    older version of this generator is remade. A different existing set raises InputError
    unless `overwrite`. Files are first written to a temporary
    folder inside `out_dir` and moved into place; `spec.json`, written last, marks completeness.
    """
    spec = spec or ProceduralSpec()
    out_dir = Path(out_dir)
    record = _spec_record(spec, seed)
    spec_file = out_dir / "spec.json"
    if spec_file.is_file():
        try:
            existing = json.loads(spec_file.read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            existing = None
        if existing == record and _is_complete(out_dir, spec):
            return out_dir
        outdated = (isinstance(existing, dict) and existing.get("format_version") != FORMAT_VERSION
                    and {k: v for k, v in existing.items() if k != "format_version"}
                    == {k: v for k, v in record.items() if k != "format_version"})
        if not overwrite and not outdated:
            raise fail(f"{out_dir} already holds a procedural data set made with a different spec or seed "
                       f"(see {spec_file}); pass --overwrite or choose another --output_dir")
    elif (out_dir / "images").exists() or (out_dir / "annotations").exists():
        if not overwrite:
            raise fail(f"{out_dir} already has images/ or annotations/ but no spec.json (an interrupted or "
                       f"foreign data set); pass --overwrite or choose another --output_dir")
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in ("images", "annotations"):
        if (out_dir / name).exists():
            shutil.rmtree(out_dir / name)
    spec_file.unlink(missing_ok=True)

    tmp = Path(tempfile.mkdtemp(dir=out_dir, prefix=".procedural-"))
    try:
        attributes, noisy_captions = {}, {}
        train, evals = [], {}
        total = spec.n_train + spec.n_val + spec.n_test
        bar = tqdm(total=total, desc="procedural images", disable=not progress)
        for split in SPLITS:
            (tmp / "images" / split).mkdir(parents=True)
            evals[split] = []
            for rel, image, captions, attrs, noisy in generate_split(spec, seed, split):
                (tmp / rel).write_bytes(_png_bytes(image))
                attributes[rel] = attrs
                if noisy:
                    noisy_captions[rel] = {str(j): captions[j] for j in noisy}
                if split == "train":
                    image_id = f"{split}_{Path(rel).stem}"
                    train.extend({"image": rel, "caption": c, "image_id": image_id} for c in captions)
                else:
                    evals[split].append({"image": rel, "caption": captions})
                bar.update(1)
        bar.close()
        (tmp / "annotations").mkdir()
        _write_json(tmp / "annotations" / "procedural_train.json", train)
        _write_json(tmp / "annotations" / "procedural_val.json", evals["val"])
        _write_json(tmp / "annotations" / "procedural_test.json", evals["test"])
        _write_json(tmp / "annotations" / "procedural_attributes.json", attributes)
        if spec.caption_noise:
            _write_json(tmp / NOISY_CAPTIONS_FILE, noisy_captions)
        (tmp / "images").rename(out_dir / "images")
        (tmp / "annotations").rename(out_dir / "annotations")
        atomic_write_json(spec_file, record)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def read_spec(out_dir) -> tuple:
    """(ProceduralSpec, seed) recorded in `out_dir/spec.json`."""
    path = Path(out_dir) / "spec.json"
    if not path.is_file():
        raise fail(f"not a procedural data set folder: {path} not found "
                   f"(make one with python -m dataset.procedural --output_dir {out_dir})")
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        return ProceduralSpec.from_dict(record["spec"]), int(record["seed"])
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise fail(f"{path} is not a valid procedural spec file: {e}")


_ATTRIBUTE_CACHE = {}


def read_noisy_captions(out_dir) -> dict:
    """The captions `--caption_noise` corrupted: {rel_path: {caption index: caption}} (one-line error when the set
    was made without noise)."""
    path = Path(out_dir) / NOISY_CAPTIONS_FILE
    if not path.is_file():
        raise fail(f"{path} not found: {out_dir} was not made with `dataset.procedural --caption_noise`")
    return read_json(path)


def read_attributes(out_dir) -> dict:
    """All image attributes of a procedural set: {rel_path: {"background", "objects": [...]}}."""
    path = Path(out_dir) / "annotations" / "procedural_attributes.json"
    if not path.is_file():
        raise fail(f"attributes file not found: {path} (make the set with python -m dataset.procedural)")
    key = (str(path.resolve()), path.stat().st_mtime_ns)
    if key not in _ATTRIBUTE_CACHE:
        try:
            _ATTRIBUTE_CACHE.clear()
            _ATTRIBUTE_CACHE[key] = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise fail(f"{path} is not valid JSON: {e}")
    return _ATTRIBUTE_CACHE[key]


def image_attributes(out_dir, rel_path) -> dict:
    """Attributes of one image of a procedural set, e.g. image_attributes(d, "images/test/000003.png")."""
    attributes = read_attributes(out_dir)
    if str(rel_path) not in attributes:
        raise fail(f"{Path(out_dir) / 'annotations' / 'procedural_attributes.json'}: no entry for {rel_path}")
    return attributes[str(rel_path)]


# ---------------------------------------------------------------- command line

def _name_list(value: str) -> tuple:
    return tuple(v.strip() for v in value.split(",") if v.strip())


def parse_args(argv=None):
    """Command-line options; a --config recipe sets defaults."""
    d = ProceduralSpec.__dataclass_fields__
    parser = argparse.ArgumentParser(description="Write the built-in procedural image-caption data set.")
    parser.add_argument("--output_dir", type=str, required=True, help="Folder to write the data set to.")
    parser.add_argument("--seed", type=int, default=0, help="Seed; the same seed writes the same bytes.")
    parser.add_argument("--resolution", type=int, default=d["resolution"].default, help="Image side in pixels.")
    parser.add_argument("--shapes", type=_name_list, default=d["shapes"].default,
                        help=f"Comma-separated shape kinds among {', '.join(SHAPE_KINDS)}.")
    parser.add_argument("--colours", type=_name_list, default=d["colours"].default,
                        help=f"Comma-separated colours among {', '.join(COLOUR_PALETTE)}.")
    parser.add_argument("--backgrounds", type=_name_list, default=d["backgrounds"].default,
                        help=f"Comma-separated backgrounds among {', '.join(BACKGROUND_PALETTE)}.")
    parser.add_argument("--min_shapes", type=int, default=d["min_shapes"].default)
    parser.add_argument("--max_shapes", type=int, default=d["max_shapes"].default)
    parser.add_argument("--captions_per_image", type=int, default=d["captions_per_image"].default)
    parser.add_argument("--n_train", type=int, default=d["n_train"].default)
    parser.add_argument("--n_val", type=int, default=d["n_val"].default)
    parser.add_argument("--n_test", type=int, default=d["n_test"].default)
    parser.add_argument("--shape_scale", type=float, default=d["shape_scale"].default,
                        help="Multiplies the shapes' radii (small 0.12, large 0.2 of the image side).")
    parser.add_argument("--caption_style", type=str, default=d["caption_style"].default,
                        choices=sorted(CAPTION_STYLES),
                        help="Caption templates: standard (the demo data) or alternate (other sentence forms "
                             "and size/position words).")
    parser.add_argument("--caption_noise", type=float, default=d["caption_noise"].default,
                        help="Share of training captions that name one wrong colour or shape (a noisy caption "
                             "source; validation and test captions stay exact). Default 0.")
    parser.add_argument("--overwrite", action="store_true", help="Replace an existing, different set.")
    args = parse_args_with_recipe(parser, argv)
    for name in ("shapes", "colours", "backgrounds"):
        value = getattr(args, name)
        setattr(args, name, _name_list(value) if isinstance(value, str) else tuple(value))
    return args


def spec_from_args(args) -> ProceduralSpec:
    """The ProceduralSpec described by parsed arguments."""
    return ProceduralSpec(resolution=args.resolution, shapes=args.shapes, colours=args.colours,
                          backgrounds=args.backgrounds, min_shapes=args.min_shapes, max_shapes=args.max_shapes,
                          captions_per_image=args.captions_per_image, n_train=args.n_train, n_val=args.n_val,
                          n_test=args.n_test, shape_scale=args.shape_scale, caption_style=args.caption_style,
                          caption_noise=args.caption_noise)


def main(args) -> Path:
    """Generate (or resume) the data set described by `args`."""
    out = generate_procedural_dataset(args.output_dir, spec_from_args(args), seed=args.seed,
                                      overwrite=args.overwrite)
    print(f"procedural data set ready in {out}")
    return out


if __name__ == "__main__":
    sys.exit(run_cli(main, parse_args))
