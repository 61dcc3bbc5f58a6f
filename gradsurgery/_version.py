"""The version of the library (read by the build from here, without importing torch)."""

__all__ = ["__version__"]

__version__ = "0.1.0.dev0"
