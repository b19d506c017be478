"""raycls: label text with large language models at data-lake scale, as a Ray Data job."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("raycls")
except PackageNotFoundError:  # imported from a source tree that was never installed
    __version__ = "0+unknown"
