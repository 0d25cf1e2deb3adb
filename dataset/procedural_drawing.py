"""Drawing of a procedural scene: shapes as polygons on a plain or gradient background, anti-aliased."""
import math

import numpy as np
from PIL import Image, ImageDraw


def _polygon(kind, cx, cy, r, angle_deg):
    """Vertices of a shape of radius ~r around (cx, cy), rotated by angle_deg."""
    if kind == "square":
        pts = [(math.radians(45 + 90 * k), 1.15 * r) for k in range(4)]
    elif kind == "diamond":
        pts = [(math.radians(90 * k), 1.2 * r) for k in range(4)]
    elif kind == "triangle":
        pts = [(math.radians(-90 + 120 * k), 1.2 * r) for k in range(3)]
    elif kind == "hexagon":
        pts = [(math.radians(60 * k), 1.05 * r) for k in range(6)]
    elif kind == "star":
        pts = [(math.radians(-90 + 36 * k), (1.25 if k % 2 == 0 else 0.5) * r) for k in range(10)]
    elif kind == "cross":
        a, b = 0.36 * r, 1.1 * r  # half arm width, arm length
        xy = [(a, b), (a, a), (b, a), (b, -a), (a, -a), (a, -b), (-a, -b), (-a, -a), (-b, -a), (-b, a),
              (-a, a), (-a, b)]
        pts = [(math.atan2(y, x), math.hypot(x, y)) for x, y in xy]
    else:
        raise ValueError(kind)
    rot = math.radians(angle_deg)
    return [(cx + rad * math.cos(t + rot), cy + rad * math.sin(t + rot)) for t, rad in pts]


def render_scene(scene: dict, resolution: int, supersample: int = 4) -> Image.Image:
    """Draw a scene (from `sample_scene`) as an RGB image of side `resolution`."""
    from dataset.procedural import BACKGROUND_PALETTE, COLOUR_PALETTE  # the palettes live there

    side = resolution * supersample
    top, bottom = (np.array(c, dtype=np.float32) for c in BACKGROUND_PALETTE[scene["background"]])
    ramp = np.linspace(0.0, 1.0, side, dtype=np.float32)[:, None, None]
    pixels = np.broadcast_to(top + (bottom - top) * ramp, (side, side, 3))
    image = Image.fromarray(np.rint(pixels).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(image)
    for o in scene["objects"]:
        cx, cy, r, angle = (v * side if k < 3 else v for k, v in enumerate(o["geometry"]))
        colour = COLOUR_PALETTE[o["colour"]]
        if o["shape"] == "circle":
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour)
        else:
            draw.polygon(_polygon(o["shape"], cx, cy, r, angle), fill=colour)
    return image.reduce(supersample) if supersample > 1 else image
