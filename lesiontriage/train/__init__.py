"""Training: one module per model, configs in configs/*.toml, checkpoints under runs/ (git-ignored)."""
