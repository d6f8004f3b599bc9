"""Everything that needs torch to make a checkpoint: network, data augmentation, loops, QAT.

May import: `core`, the package root (`config`, `data`, `tracking`), torch and torchao.
"""
