"""sglang-turbo: the SGLang-facing side of the Turbo layer (platform, plugin, launcher)."""

__version__ = "0.1.0"
