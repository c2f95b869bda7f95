"""Stage code of the Gaussian Head Avatar data platform: one package, one CLI (``headavatar``)."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("headavatar")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0+unknown"
