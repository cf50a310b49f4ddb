"""Research tooling on top of the strategies: data, models, metrics (sharpness, divergence), the
toy problem and ``localsgd compare``."""
