"""Seeding: one global seed per run and one derived seed per item."""
import hashlib
import os

import torch


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices): accelerate's `set_seed`."""
    from accelerate.utils import set_seed

    set_seed(seed)


def derive_seed(seed: int, index: int) -> int:
    """A per-item seed from (run seed, item index), independent of process count and batch size."""
    digest = hashlib.sha256(f"{int(seed)}:{int(index)}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & 0x7FFF_FFFF_FFFF_FFFF


def item_generator(seed: int, index: int, device="cpu") -> torch.Generator:
    """A torch.Generator seeded with `derive_seed(seed, index)`."""
    return torch.Generator(device=device).manual_seed(derive_seed(seed, index))


def set_cpu_threads(num_threads: int = None) -> int:
    """Set torch intra-op threads deliberately (oversubscription on small machines is costly).

    Default: $OMP_NUM_THREADS if set, else the number of cores divided by the local process count.
    """
    if num_threads is None:
        env = os.environ.get("OMP_NUM_THREADS")
        if env:
            num_threads = int(env)
        else:
            local = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("ACCELERATE_NUM_PROCESSES", "1")) or 1)
            num_threads = max(1, (os.cpu_count() or 1) // max(1, local))
    torch.set_num_threads(num_threads)
    return num_threads
