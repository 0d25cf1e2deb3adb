"""Data readers and writers: Karpathy JSON, CC3M, distilled sets, LoRS sets and the procedural set.

Import from the modules (`from dataset.registry import load_split`). May import `utils.common` only: no model
code, no other `utils` sub-package, no `evaluation/` and no script, so light readers do not import torch.
"""
