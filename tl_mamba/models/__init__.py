"""Model families: ``HookedMamba`` (Mamba-1, Falcon-Mamba: ``mamba.py``) and ``HookedMamba2``
(``mamba2.py``), both on ``HookedSSM`` (``base.py``: hooks, caching, generation). What their
blocks share is in ``block.py``, the heavy hooks (``hook_h``, ``hook_ssm_mask``) in
``heavy_hooks.py``, the checked hook point and small modules in ``components.py``."""
