"""The offline demo: every stage on the procedural data set (or a user's Karpathy data), with a report."""
