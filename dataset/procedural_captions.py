"""Captions of the procedural data set: the templates that describe a scene, and the reading of a caption back.

Every template names each object's colour, shape, size and coarse position (some also the background);
`caption_attributes` reads those back (the prompt-following measure of the demo uses it). Two caption styles:
"standard" (the demo data) and "alternate" (other sentence forms and other size/position words, for a
held-out variant whose captions no recipe was tuned on).
"""
import random
import re


_SIZE_WORDS = {"small": ("small", "little"), "large": ("large", "big")}
_POS_PHRASES = {
    "left": ("on the left", "at the left", "on the left side"),
    "right": ("on the right", "at the right", "on the right side"),
    "top": ("at the top", "near the top", "in the upper part"),
    "bottom": ("at the bottom", "near the bottom", "in the lower part"),
    "center": ("in the center", "in the middle", "at the center"),
}
_POS_SHORT = {"left": "left side", "right": "right side", "top": "top", "bottom": "bottom", "center": "center"}
_COUNT_WORDS = ("zero", "one", "two", "three", "four")


def _join(parts):
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def _a(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _size(o, rng):
    return rng.choice(_SIZE_WORDS[o["size"]])


def _pos(o, rng):
    return rng.choice(_POS_PHRASES[o["position"]])


def _listing(objs, rng):
    return _join([_a(f"{_size(o, rng)} {o['colour']} {o['shape']} {_pos(o, rng)}") for o in objs])


def _t_plain(objs, bg, rng):
    return _listing(objs, rng)


def _t_on_background(objs, bg, rng):
    return _listing(objs, rng) + f" on {_a(bg)} background"


def _t_there_is(objs, bg, rng):
    if len(objs) == 1:
        o = objs[0]
        return f"there is one {_size(o, rng)} {o['shape']} in {o['colour']} {_pos(o, rng)} of {_a(bg)} background"
    return f"there are {_COUNT_WORDS[len(objs)]} shapes on {_a(bg)} background: {_listing(objs, rng)}"


def _t_terse(objs, bg, rng):
    return "; ".join(f"{o['colour']} {o['shape']}, {'big' if o['size'] == 'large' else 'small'}, "
                     f"{_POS_SHORT[o['position']]}" for o in objs)


def _t_picture(objs, bg, rng):
    return rng.choice(("a picture of ", "an image of ", "a drawing of ")) + _listing(objs, rng)


def _t_background_with(objs, bg, rng):
    return f"{bg} background with " + _listing(objs, rng)


def _t_position_first(objs, bg, rng):
    return "; ".join(f"{_pos(o, rng)}, {_a(_size(o, rng))} {o['colour']} {o['shape']}" for o in objs)


def _t_shape_first(objs, bg, rng):
    return _join([f"one {_size(o, rng)} {o['shape']} coloured {o['colour']} {_pos(o, rng)}" for o in objs])


def _t_count(objs, bg, rng):
    noun = "shape" if len(objs) == 1 else "shapes"
    items = _join([_a(f"{o['colour']} {o['shape']} ({o['size']}, {_POS_SHORT[o['position']]})") for o in objs])
    return f"{_COUNT_WORDS[len(objs)]} {noun}: {items}"


_TEMPLATES = (_t_plain, _t_on_background, _t_there_is, _t_terse, _t_picture, _t_background_with,
              _t_position_first, _t_shape_first, _t_count)


# The alternate style: none of the standard templates' size or position words, other sentence forms.
_ALT_SIZE_WORDS = {"small": ("tiny", "miniature"), "large": ("huge", "giant")}
_ALT_POS_PHRASES = {
    "left": ("towards the left", "on the left-hand side"),
    "right": ("towards the right", "on the right-hand side"),
    "top": ("up high", "along the top edge"),
    "bottom": ("down low", "along the bottom edge"),
    "center": ("in the centre", "centred"),
}


def _alt_size(o, rng):
    return rng.choice(_ALT_SIZE_WORDS[o["size"]])


def _alt_pos(o, rng):
    return rng.choice(_ALT_POS_PHRASES[o["position"]])


def _alt_listing(objs, rng, sep=" plus "):
    return sep.join(f"{_a(_alt_size(o, rng))} {o['shape']} in {o['colour']} {_alt_pos(o, rng)}" for o in objs)


def _t_alt_in_colour(objs, bg, rng):
    return _alt_listing(objs, rng)


def _t_alt_backdrop_showing(objs, bg, rng):
    return f"{_a(bg)} backdrop showing " + _alt_listing(objs, rng, sep=" as well as ")


def _t_alt_scene(objs, bg, rng):
    items = " | ".join(f"{o['colour']} {o['shape']} ({_alt_size(o, rng)}, {_alt_pos(o, rng)})" for o in objs)
    return f"scene: {items}; backdrop {bg}"


def _t_alt_colour_first(objs, bg, rng):
    return "look: " + " with ".join(f"{_a(o['colour'])} {_alt_size(o, rng)} {o['shape']} {_alt_pos(o, rng)}"
                                    for o in objs)


def _t_alt_where_first(objs, bg, rng):
    return " / ".join(f"{_alt_pos(o, rng)} sits {_a(_alt_size(o, rng))} {o['colour']} {o['shape']}" for o in objs)


def _t_alt_objects(objs, bg, rng):
    noun = "object" if len(objs) == 1 else "objects"
    return f"{_COUNT_WORDS[len(objs)]} {noun} drawn: " + _alt_listing(objs, rng, sep=", ")


_ALT_TEMPLATES = (_t_alt_in_colour, _t_alt_backdrop_showing, _t_alt_scene, _t_alt_colour_first,
                  _t_alt_where_first, _t_alt_objects)
CAPTION_STYLES = {"standard": _TEMPLATES, "alternate": _ALT_TEMPLATES}


def make_captions(scene: dict, n: int, rng: random.Random, style: str = "standard") -> list:
    """`n` captions from distinct templates of `style`, each naming every object's colour, shape, size and position."""
    captions = []
    for template in rng.sample(CAPTION_STYLES[style], n):
        objs = list(scene["objects"])
        rng.shuffle(objs)
        captions.append(template(objs, scene["background"], rng))
    return captions


# Words that name a size or a coarse position in any template of either style (see _SIZE_WORDS,
# _POS_PHRASES, _POS_SHORT and their _ALT_ counterparts).
_SIZE_READING = {"small": "small", "little": "small", "large": "large", "big": "large",
                 "tiny": "small", "miniature": "small", "huge": "large", "giant": "large"}
_POSITION_READING = {"left": "left", "right": "right", "top": "top", "upper": "top", "bottom": "bottom",
                     "lower": "bottom", "center": "center", "middle": "center",
                     "high": "top", "low": "bottom", "centre": "center", "centred": "center"}


def name_pattern(word: str, plural: bool = False) -> str:
    """Regex of `word` as a whole word in a caption; with `plural`, also its -s/-es form (shape names)."""
    return r"\b" + re.escape(word) + (r"(?:es|s)?" if plural else "") + r"\b"


def caption_attributes(caption: str, spec=None) -> dict:
    """The colours, shape kinds, sizes, positions and backgrounds a caption names, in order of first mention.

    Returns {"colours", "shapes", "sizes", "positions", "backgrounds"}, each a list of names. Words are
    matched against the spec's colours, shapes and backgrounds (all known ones when `spec` is None) as
    whole words, plurals of shapes included; sizes and positions are read from the templates' synonyms
    ("big" -> large, "in the middle" -> center).
    """
    from dataset.procedural import BACKGROUND_PALETTE, COLOUR_PALETTE, SHAPE_KINDS  # the palettes live there

    colours = spec.colours if spec is not None else tuple(COLOUR_PALETTE)
    shapes = spec.shapes if spec is not None else SHAPE_KINDS
    backgrounds = spec.backgrounds if spec is not None else tuple(BACKGROUND_PALETTE)
    text = caption.lower()

    def find(words, plural=False):
        """words: {word: name}; names in order of first mention, each once."""
        hits = {}
        for word, name in words.items():
            m = re.search(name_pattern(word, plural), text)
            if m and (name not in hits or m.start() < hits[name]):
                hits[name] = m.start()
        return [name for name, _ in sorted(hits.items(), key=lambda kv: kv[1])]

    # "light grey" and "grey gradient" share a word: match the longer names first and blank them out.
    found_backgrounds = []
    for name in sorted(backgrounds, key=len, reverse=True):
        m = re.search(name_pattern(name), text)
        if m:
            found_backgrounds.append((m.start(), name))
            text = text[:m.start()] + " " * len(name) + text[m.end():]
    return {"colours": find({c: c for c in colours}), "shapes": find({s: s for s in shapes}, plural=True),
            "sizes": find(_SIZE_READING), "positions": find(_POSITION_READING),
            "backgrounds": [name for _, name in sorted(found_backgrounds)]}
