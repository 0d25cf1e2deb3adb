"""Stage 4: the retrieval evaluation protocol (model, training loop, BLIP metrics, reports, CLI)."""
