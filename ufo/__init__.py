"""ufo: a distributed trainer for UFO-style multi-task vision supernets.

One ViT backbone serves many tasks; each block's FFN has a shared path and one path per task.
The pruning step (`ufo.export`) turns a supernet checkpoint into a plain timm ViT for one task.
"""

__version__ = "0.1.0"
