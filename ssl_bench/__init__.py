"""ssl-bench: a benchmark harness for semi-supervised 3D left-atrium segmentation."""

__version__ = "0.1.0"
