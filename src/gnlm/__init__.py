"""gnlm: how many training steps could exact Gauss-Newton save, and how far is my optimizer from it?"""

__version__ = "0.1.0"
