"""inferd: a continuous inference daemon for image streams."""

__version__ = "0.1.0"
