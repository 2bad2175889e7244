"""Data: one reader per shared set (sources/), the unified manifest, leakage-free splits, scenes."""
