"""visbatch's engine: everything that does work, usable without the CLI."""

try:
    from importlib.metadata import version as _version

    __version__ = _version("visbatch")
except Exception:  # running from a source tree that is not installed
    __version__ = "0.0.0+unknown"
