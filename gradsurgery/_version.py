"""The version of the library (read by the build from here, without importing torch)."""

__version__ = "0.1.0.dev0"
