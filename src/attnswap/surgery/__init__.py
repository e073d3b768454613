"""Finding attention sites in a model and rewriting them in place."""
