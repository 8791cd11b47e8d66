"""Running a model with adapters: loading a base with an adapter, merging, held-out evaluation (loss, exact
match by generation), and one adapter per batch row (mixed-adapter serving)."""
