"""quantkit: quantize and convert LLMs from one recipe."""

__version__ = "0.1.0"
