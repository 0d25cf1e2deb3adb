"""Model adapters: SD loading, text/image encoders, scorers, the retrieval model, cheap decode, tiny test models.

May import `utils.common` and `utils.method`; never the stage apps (`utils.stages`), `dataset/`, `evaluation/`
or the scripts.
"""
