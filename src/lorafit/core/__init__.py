"""The adapter core every method shares: where adapters go (selection, targeting), the view of a frozen base
layer, the wrapper that holds adapters beside it, the method registry, attach/merge/unload, and the counts."""
