"""Shared building blocks of the EDGE pipeline: losses, model loading, seeding, I/O, configs."""
