"""Reproduction artifact for "Feature Learning Beyond the Edge of Stability" (arXiv:2502.13110).

Modules, read in this order: ``model`` (the nuP MLP), ``scaling`` (depthwise gradient
scaling xi_k), ``measures`` (soft rank, Gram forms, norms), ``taylor`` and ``sharpness``
(second-order instruments), ``train`` (the training loop), ``data`` (MNIST), ``config``
(typed run configuration and output paths), ``aggregate`` and ``figures``.
"""

__version__ = "0.1.0"
