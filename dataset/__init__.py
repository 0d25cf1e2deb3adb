"""Data readers and writers: Karpathy JSON, CC3M, distilled sets, LoRS sets and the procedural set.

Names are imported lazily, so `python -m dataset.procedural` and light readers do not import torch.
"""
import importlib

_EXPORTS = {
    "cc3m": ("cc3m_eval_entries", "iter_cc3m_shards", "read_cc3m_folder"),
    "distilled": ("DistilledSet", "is_distilled_set", "read_distilled_set", "read_manifest", "write_distilled_set",
                  "write_manifest"),
    "images": ("load_image",),
    "karpathy": ("eval_from_groups", "group_by_image", "read_karpathy_eval", "read_karpathy_train"),
    "lors": ("LorsSet", "read_lors_pt"),
    "procedural": ("ProceduralSpec", "caption_attributes", "generate_procedural_dataset", "image_attributes",
                   "read_attributes"),
    "registry": ("DATASETS", "load_split", "resolve_split"),
    "torch_datasets": ("ImageCaptionTrainDataset", "RetrievalEvalDataset"),
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_MODULE_OF)


def __getattr__(name):
    if name in _MODULE_OF:
        return getattr(importlib.import_module(f".{_MODULE_OF[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
