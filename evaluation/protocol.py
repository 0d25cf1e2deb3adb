"""The two evaluation protocols (`--protocol lors|edge`): their settings, image normalisation and augmentation.

lors (default) follows LoRS's evaluation of a distilled set (silicx/LoRS_Distill): no augmentation, each epoch
every training image once with one of its captions, SGD momentum 0.9 and weight decay 5e-4, x0.1 after half
the epochs, batch 128.

edge follows the public EDGE evaluator (ichbill/EDGE, evaluation/evaluation.py with dataset/__init__.py and
dataset/flickr30k_dataset.py): one training pair per caption, random-resized-crop + flip + RandAugment(2, 5)
on training images only, SGD without momentum or weight decay and a constant learning rate, batch 32 with
the last partial batch dropped, 224-pixel images.

Both normalise images with CLIP's mean/std (LoRS data/__init__.py L57, EDGE dataset/__init__.py L69), for
the nfnet_l0 / timm image encoders they train; that is also the space LoRS `.pt` images are saved in.
Line numbers refer to the public code as stored at ichbill/EDGE bb18c46 and silicx/LoRS_Distill 0ad0743.
"""
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from utils.common.errors import fail
from utils.models.encoders import clip_mean_std

PROTOCOLS = ("lors", "edge")

# RandAugment as the EDGE evaluator calls it: RandomAugment(2, 5, isPIL=True, augs=[...]) (EDGE
# dataset/__init__.py L73-74); the op arguments are those of BLIP's randaugment.py, which EDGE imports as
# dataset.randaugment (not in the public EDGE repository; the same file is LoRS data/randaugment.py).
RANDAUG_OPS = ("Identity", "AutoContrast", "Brightness", "Sharpness", "Equalize",
               "ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate")
RANDAUG_N, RANDAUG_M, RANDAUG_MAX_LEVEL = 2, 5, 10
RANDAUG_TRANSLATE_CONST = 10  # pixels at MAX_LEVEL
RANDAUG_FILL = 128  # replace_value (128, 128, 128)


@dataclass(frozen=True)
class ProtocolSettings:
    """What a protocol fixes; `sources` says where each value comes from in the public code."""
    name: str
    epochs: int
    eval_every: int
    batch_size_train: int
    batch_size_test: int
    lr_img: float
    lr_txt: float
    momentum: float
    weight_decay: float
    lr_schedule: str  # "step" (x0.1 at epochs//2+1) | "constant"
    image_size: int  # 0: the encoder's / the data's own size
    pairs: str  # "one_caption_per_image" (a random caption per image per epoch) | "every_caption"
    augment: str  # "none" | "randaugment"
    drop_last: bool
    normalization: str  # "clip"
    sources: dict = field(default_factory=dict)


def protocol_settings(name: str) -> ProtocolSettings:
    """The settings of protocol `name` (lors | edge)."""
    if name == "lors":
        return ProtocolSettings(
            name="lors", epochs=100, eval_every=5, batch_size_train=128, batch_size_test=128, lr_img=0.1, lr_txt=0.1,
            momentum=0.9, weight_decay=5e-4, lr_schedule="step", image_size=0, pairs="one_caption_per_image",
            augment="none", drop_last=False, normalization="clip",
            sources={
                "epochs, batch_size_train, lr_img, lr_txt": (
                    "LoRS distill_tesla_lors.py argparse: --epoch_eval_train 100, --batch_train 128, "
                    "--lr_teacher_img/--lr_teacher_txt 0.1"),
                "momentum, weight_decay, lr_schedule": "LoRS src/epoch.py evaluate_synset_with_similarity: "
                                                       "SGD(mom=0.9, l2=0.0005), MultiStepLR([Epoch//2+1], 0.1)",
                "augment, pairs": "LoRS src/epoch.py epoch(): synthetic tensors as saved, one text per image",
                "normalization": "LoRS data/__init__.py L57 (CLIP mean/std), test images L66-70",
                "eval_every": "this project's §7 protocol (LoRS evaluates Epoch//10)",
            })
    if name == "edge":
        return ProtocolSettings(
            name="edge", epochs=100, eval_every=5, batch_size_train=32, batch_size_test=32, lr_img=0.1, lr_txt=0.1,
            momentum=0.0, weight_decay=0.0, lr_schedule="constant", image_size=224, pairs="every_caption",
            augment="randaugment", drop_last=True, normalization="clip",
            sources={
                "epochs": "EDGE evaluation/evaluation.py L167 (--train_epochs 100)",
                "eval_every": "EDGE evaluation/evaluation.py L203 (--eval_freq 5), L99-104 (test split, no selection)",
                "lr_img, lr_txt": "EDGE evaluation/evaluation.py L158-159 (0.1, 0.1), L76-79 (SGD)",
                "momentum, weight_decay": "EDGE evaluation/evaluation.py L170-171 (--mom 0, --l2 0), L79",
                "lr_schedule": "EDGE evaluation/evaluation.py L81-83 (x0.1 at epochs//2+1 only with --decay, L169)",
                "batch_size_train, batch_size_test": "EDGE evaluation/evaluation.py L179-180 (32, 32)",
                "drop_last": "EDGE dataset/__init__.py L132-134 (train loader drop_last=True, shuffled)",
                "image_size": "EDGE evaluation/evaluation.py L185 (224)",
                "pairs": "EDGE dataset/flickr30k_dataset.py L69-70 (one item per annotation entry, i.e. per "
                         "caption), dataset/__init__.py L96",
                "augment": "EDGE dataset/__init__.py L70-77: RandomResizedCrop(224, scale=(0.5, 1), bicubic), "
                           "RandomHorizontalFlip, RandomAugment(2, 5, augs=[...]); L85-89 test: bicubic resize only; "
                           "L91-92 --no_aug",
                "normalization": "EDGE dataset/__init__.py L69 (CLIP mean/std)",
            })
    raise fail(f"unknown --protocol {name!r}; use one of {', '.join(PROTOCOLS)}")


# Training flags whose default comes from the protocol (argparse dest -> ProtocolSettings field).
PROTOCOL_FLAGS = ("epochs", "eval_every", "batch_size_train", "batch_size_test", "lr_img", "lr_txt", "momentum",
                  "weight_decay", "lr_schedule")


def apply_protocol_defaults(args) -> ProtocolSettings:
    """Fill every training flag left unset (None) with the protocol's value; returns the settings."""
    settings = protocol_settings(args.protocol)
    for name in PROTOCOL_FLAGS:
        if getattr(args, name, None) is None:
            setattr(args, name, getattr(settings, name))
    return settings


# ----------------------------------------------------------------------------- normalisation


def uses_protocol_normalization(image_encoder: str) -> bool:
    """True for the encoders the public evaluators train (nfnet_l0 and other timm models): they get the
    protocol's CLIP mean/std. efficientnet_lite0 (pip weights trained on [-1, 1] inputs) and open_clip towers
    (already CLIP's) keep their own."""
    if image_encoder == "efficientnet_lite0" or image_encoder.startswith("open_clip:"):
        return False
    return image_encoder in ("nfnet_l0",) or image_encoder.startswith(("timm:", "local-dir:")) \
        or Path(image_encoder).is_dir()


def protocol_preprocess(settings: ProtocolSettings, image_encoder: str, encoder_preprocess: dict) -> dict:
    """The preprocess dict (size, mean, std, normalization) one run uses for training and test images alike."""
    if settings.normalization == "clip" and uses_protocol_normalization(image_encoder):
        mean, std = clip_mean_std()
        return {**encoder_preprocess, "mean": mean, "std": std,
                "normalization": f"CLIP mean/std ({settings.name} protocol)"}
    return {**encoder_preprocess, "normalization": f"the image encoder's own ({image_encoder})"}


def lors_pixels(images: torch.Tensor) -> torch.Tensor:
    """LoRS `.pt` images (CLIP-normalised, LoRS data/__init__.py L57) -> pixels on the [0, 1] scale (not clipped),
    so they go through the same normalisation as the test images."""
    mean, std = (torch.tensor(v, dtype=images.dtype).view(1, 3, 1, 1) for v in clip_mean_std())
    return images * std + mean


# ----------------------------------------------------------------------------- augmentation (edge protocol)


def _uniform(gen, low, high) -> float:
    return low + (high - low) * float(torch.rand((), generator=gen))


def _randint(gen, low, high) -> int:
    """An integer in [low, high)."""
    return int(torch.randint(low, high, (), generator=gen))


def random_resized_crop_params(height, width, gen, scale=(0.5, 1.0), ratio=(3 / 4, 4 / 3)):
    """torchvision RandomResizedCrop.get_params with a torch.Generator: (top, left, h, w)."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * _uniform(gen, *scale)
        aspect = math.exp(_uniform(gen, *log_ratio))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return _randint(gen, 0, height - h + 1), _randint(gen, 0, width - w + 1), h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def _apply_op(img, op, gen):
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms.v2 import functional as TF

    level = RANDAUG_M / RANDAUG_MAX_LEVEL
    fill = [float(RANDAUG_FILL)] * 3 if img.dtype == torch.uint8 else [RANDAUG_FILL / 255.0] * 3
    sign = -1.0 if float(torch.rand((), generator=gen)) > 0.5 else 1.0
    bilinear = InterpolationMode.BILINEAR
    if op == "Identity":
        return img
    if op == "AutoContrast":
        return TF.autocontrast(img)
    if op == "Equalize":
        return TF.equalize(img)
    if op == "Brightness":  # factor level*1.8+0.1 (1.0 at M=5, as in the public code)
        return TF.adjust_brightness(img, level * 1.8 + 0.1)
    if op == "Sharpness":
        return TF.adjust_sharpness(img, level * 1.8 + 0.1)
    if op in ("ShearX", "ShearY"):  # cv2 shear about the top-left corner by factor level*0.3
        angle = sign * math.degrees(math.atan(level * 0.3))
        shear = [angle, 0.0] if op == "ShearX" else [0.0, angle]
        return TF.affine(img, angle=0.0, translate=[0.0, 0.0], scale=1.0, shear=shear, interpolation=bilinear,
                         fill=fill, center=[0.0, 0.0])
    if op in ("TranslateX", "TranslateY"):  # level*10 pixels
        offset = sign * level * RANDAUG_TRANSLATE_CONST
        translate = [offset, 0.0] if op == "TranslateX" else [0.0, offset]
        return TF.affine(img, angle=0.0, translate=translate, scale=1.0, shear=[0.0, 0.0], interpolation=bilinear,
                         fill=fill)
    if op == "Rotate":  # level*30 degrees about the centre
        return TF.rotate(img, sign * level * 30.0, interpolation=bilinear, fill=fill)
    raise ValueError(f"unknown RandAugment op {op}")


def randaugment(img: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """RandomAugment(N=2, M=5): two ops drawn with replacement, each applied with probability 0.5."""
    ops = [RANDAUG_OPS[_randint(gen, 0, len(RANDAUG_OPS))] for _ in range(RANDAUG_N)]
    for op in ops:
        if float(torch.rand((), generator=gen)) > 0.5:
            continue
        img = _apply_op(img, op, gen)
    return img


def edge_train_augment(images: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """The EDGE evaluator's training transform on a batch [B,3,S,S] (uint8, or float pixels on the [0, 1]
    scale), output at the same size: RandomResizedCrop(S, scale=(0.5, 1), bicubic), horizontal flip with
    probability 0.5, RandomAugment(2, 5). (The public code crops the decoded image before its resize to 224;
    here the crop is taken from the image already resized to S.)"""
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms.v2 import functional as TF

    out = []
    size = list(images.shape[-2:])
    for img in images:
        top, left, h, w = random_resized_crop_params(size[0], size[1], gen)
        img = TF.resized_crop(img, top, left, h, w, size, interpolation=InterpolationMode.BICUBIC, antialias=True)
        if float(torch.rand((), generator=gen)) < 0.5:
            img = TF.horizontal_flip(img)
        out.append(randaugment(img, gen))
    return torch.stack(out)


def help_text(settings_name: str) -> str:
    """One paragraph for --help: the protocol's values and their sources."""
    s = protocol_settings(settings_name)
    values = (f"epochs {s.epochs}, eval every {s.eval_every}, batch {s.batch_size_train}/{s.batch_size_test}, "
              f"lr {s.lr_img}/{s.lr_txt}, momentum {s.momentum}, weight decay {s.weight_decay}, "
              f"schedule {s.lr_schedule}, image size {s.image_size or 'encoder/data'}, pairs {s.pairs}, "
              f"augment {s.augment}, drop_last {s.drop_last}, normalization {s.normalization}")
    return f"{s.name}: {values} [" + "; ".join(f"{k}: {v}" for k, v in s.sources.items()) + "]"
