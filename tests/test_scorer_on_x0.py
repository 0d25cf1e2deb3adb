"""The x0-estimate diagnostic: estimates closer to the VAE round trip at low noise than at high noise."""
from types import SimpleNamespace

import numpy as np

from demo.scorer_on_x0 import markdown, x0_estimates


def test_x0_estimate_is_nearer_the_round_trip_at_t0_than_at_t999(tiny_train_assets):
    from dataset.images import load_image
    from dataset.registry import read_split
    from demo.measure_prompt_following import vae_round_trip
    from utils.models.sd_models import load_sd_components

    assets = tiny_train_assets("x0diag")
    comps = load_sd_components(assets["sd"])
    entries, _, root = read_split("procedural", "train", assets["data"], None, check_images=False)
    images = [load_image(f"{root}/{e['image']}") for e in entries[:4]]
    prompts = [e["caption"] for e in entries[:4]]
    ref = np.stack([np.asarray(im, dtype=np.float32) for im in vae_round_trip(comps.vae, images, 32)])
    gap = {}
    for t in (0, 999):
        est = x0_estimates(comps, images, prompts, t, 32, seed=0, clamp=3.0)
        assert len(est) == 4 and est[0].size == (32, 32)
        gap[t] = np.abs(np.stack([np.asarray(im, dtype=np.float32) for im in est]) - ref).mean()
    # a random-init UNet still predicts noise badly, so only the ordering is certain
    assert gap[0] < 0.75 * gap[999]


def test_markdown_has_one_row_per_image_kind_and_one_column_per_model():
    cell = lambda s: {"share": s, "lo": s - 5, "hi": s + 5, "n": 300}  # noqa: E731
    result = {"real test images": {"EDGE scorer": cell(75.0), "independent model": cell(74.0)},
              "x0 estimate at t = 900": {"EDGE scorer": cell(3.0), "independent model": cell(2.0)}}
    args = SimpleNamespace(model="m", data="d", seed=0, x0_clamp=3.0, scorer="retrieval:a", judge="retrieval:b")
    md = markdown(args, result)
    assert "| images | EDGE scorer | independent model |" in md
    assert "| x0 estimate at t = 900 | 3.0 [-2.0, 8.0] | 2.0 [-3.0, 7.0] |" in md
    assert "300 real test pairs" in md
