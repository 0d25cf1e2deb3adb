"""Cost of one retrieval-training epoch (stage 4) with cached frozen-text features vs recomputing them every step.

Cached: the frozen text encoder runs once over every caption before training
(`evaluation.train_retrieval.cached_text_features`) and each step indexes the table, as
`train_retrieval` does. Uncached: each step runs the frozen text encoder over the batch's captions.
Both epochs otherwise repeat `train_retrieval`'s step (normalize pixels, symmetric InfoNCE through
`RetrievalModel`, SGD with momentum and weight decay). Images are random uint8 tensors and
captions synthetic sentences of procedural-set length (cost does not depend on content).

Rounds alternate the two epochs (order swapped every round); the best (lowest) epoch time per
variant is reported with the median of rounds beside it. The one-off caching time (all captions of
all images once) is reported too, with the ratio it gives amortized over --protocol_epochs epochs.

Usage:
  python -m benchmarks.evaluation                                   # demo setting: 32 px, EfficientNet-Lite0 + MiniLM
  python -m benchmarks.evaluation --image_size 224 --n_images 256 --rounds 3
  python -m benchmarks.evaluation --image_encoder nfnet_l0 --text_encoder bert-base-uncased --image_size 224 \\
      --device cuda
"""
import argparse
import random
import statistics
import sys
import time

from utils.common.config import parse_args_with_recipe

COLOURS = ("red", "green", "blue", "yellow", "purple", "orange", "white", "black")
SHAPES = ("circle", "square", "triangle", "star", "cross", "ring")
PLACES = ("top left", "top right", "bottom left", "bottom right", "centre")


def parse_args(argv=None):
    """Flags of the benchmark."""
    p = argparse.ArgumentParser(description="Retrieval-training epoch: cached vs per-step text features.")
    p.add_argument("--image_encoder", default="efficientnet_lite0")
    p.add_argument("--text_encoder", default="minilm")
    p.add_argument("--image_size", type=int, default=32, help="32: the offline demo's procedural images")
    p.add_argument("--n_images", type=int, default=512)
    p.add_argument("--captions_per_image", type=int, default=5)
    p.add_argument("--batch_size", type=int, default=128, help="the protocol's batch_size_train")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--protocol_epochs", type=int, default=100, help="epochs the one-off caching is amortized over")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    args = parse_args_with_recipe(p, argv)
    if min(args.n_images, args.batch_size, args.rounds, args.captions_per_image, args.protocol_epochs) < 1 \
            or args.batch_size < 2:
        from utils.common.errors import fail

        raise fail("--n_images, --rounds, --captions_per_image, --protocol_epochs must be >= 1, --batch_size >= 2")
    return args


def synthetic_captions(n_images: int, per_image: int, seed: int = 0) -> list:
    """per_image procedural-style captions for each of n_images images -> flat list, image-major."""
    rng = random.Random(seed)
    return [f"a {rng.choice(COLOURS)} {rng.choice(SHAPES)} in the {rng.choice(PLACES)} on a "
            f"{rng.choice(COLOURS)} background" for _ in range(n_images * per_image)]


def run_epoch(model, optimizer, images, caption_ids, preprocess, batch_size, device, gen,
              text_table=None, text_encoder=None, captions=None) -> float:
    """One epoch of train_retrieval's step; text from `text_table` rows or, per step, from `text_encoder`."""
    import torch

    from utils.models.retrieval_model import normalize_pixels

    model.train()
    n = images.shape[0]
    order = torch.randperm(n, generator=gen)
    pick = (torch.rand(n, generator=gen) * len(caption_ids[0])).long()
    t0 = time.perf_counter()
    for start in range(0, n, batch_size):
        idx = order[start:start + batch_size]
        if idx.numel() < 2:
            continue
        text_ids = [caption_ids[i][pick[i]] for i in idx.tolist()]
        pixels = normalize_pixels(images[idx].to(device).float().div_(255.0), preprocess)
        if text_table is not None:
            text = text_table[torch.tensor(text_ids)].to(device)
        else:
            with torch.no_grad():
                text = text_encoder.encode([captions[t] for t in text_ids], batch_size=batch_size).float().to(device)
        loss = model(pixels, text)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def main(args):
    """Time cached and uncached epochs in alternating rounds and print the ratio."""
    import torch

    from evaluation.train_retrieval import _MEMORY_CACHE, cached_text_features
    from utils.common.seeding import set_cpu_threads
    from utils.models.encoders import build_text_encoder
    from utils.models.retrieval_model import build_retrieval_model

    set_cpu_threads(args.threads)
    device = torch.device(args.device)
    text_encoder = build_text_encoder(args.text_encoder, device)
    captions = synthetic_captions(args.n_images, args.captions_per_image, args.seed)
    caption_ids = [list(range(i * args.captions_per_image, (i + 1) * args.captions_per_image))
                   for i in range(args.n_images)]
    g = torch.Generator().manual_seed(args.seed)
    images = torch.randint(0, 256, (args.n_images, 3, args.image_size, args.image_size), dtype=torch.uint8,
                           generator=g)
    _MEMORY_CACHE.clear()
    t0 = time.perf_counter()
    table = cached_text_features(text_encoder, captions)  # memory cache only: no disk I/O in the timing
    caching_s = time.perf_counter() - t0
    model, preprocess = build_retrieval_model(args.image_encoder, table.shape[1])
    model.to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    variants = {"cached": dict(text_table=table), "uncached": dict(text_encoder=text_encoder, captions=captions)}
    # warm-up (one short epoch each)
    for kw in variants.values():
        run_epoch(model, optimizer, images[: 2 * args.batch_size], caption_ids, preprocess, args.batch_size, device,
                  torch.Generator().manual_seed(0), **kw)
    times = {k: [] for k in variants}
    for r in range(args.rounds):
        for name in (list(variants) if r % 2 == 0 else list(variants)[::-1]):
            times[name].append(run_epoch(model, optimizer, images, caption_ids, preprocess, args.batch_size, device,
                                         torch.Generator().manual_seed(r + 1), **variants[name]))
            print(f"round {r + 1}/{args.rounds} {name}: {times[name][-1]:.2f} s", file=sys.stderr)
    best = {k: min(v) for k, v in times.items()}
    med = {k: statistics.median(v) for k, v in times.items()}
    ratio = best["cached"] / best["uncached"]
    amortized = (best["cached"] + caching_s / args.protocol_epochs) / best["uncached"]
    print(f"image_encoder={args.image_encoder} text_encoder={args.text_encoder} image_size={args.image_size} "
          f"n_images={args.n_images} captions/image={args.captions_per_image} batch={args.batch_size} "
          f"device={args.device} threads={torch.get_num_threads()} rounds={args.rounds}")
    print(f"epoch, cached text features: {best['cached']:.2f} s (median {med['cached']:.2f}); "
          f"recomputed every step: {best['uncached']:.2f} s (median {med['uncached']:.2f})")
    print(f"cached / uncached epoch: x{ratio:.2f} (medians: x{med['cached'] / med['uncached']:.2f}); one-off caching "
          f"of {len(captions)} captions {caching_s:.2f} s; amortized over {args.protocol_epochs} epochs: "
          f"x{amortized:.2f}")
    return {"cached_s": best["cached"], "uncached_s": best["uncached"], "ratio": ratio, "caching_s": caching_s,
            "amortized_ratio": amortized, "times": times}


if __name__ == "__main__":
    main(parse_args())
