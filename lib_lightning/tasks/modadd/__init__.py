"""Analysis that belongs to the modular-addition task alone: Fourier labels of features and the
grokking progress measures (Nanda et al. 2023).

Pure torch, like the core: may import torch and ``lib_lightning.core``; never Lightning, so that the
notebook-style analysis and the callbacks share it.
"""
