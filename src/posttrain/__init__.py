"""posttrain: post-train small language models on a CPU, and the same code on many GPUs.

Importing the package is light; heavy libraries load inside the functions that need them.
"""

__version__ = "0.1.0"
