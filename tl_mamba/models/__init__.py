"""Model families: ``HookedMamba`` (Mamba-1, Falcon-Mamba: ``mamba.py``) and ``HookedMamba2``
(``mamba2.py``), both on ``HookedSSM`` (``base.py``: forward, hooks, caching; its mixins
``tokens.py``: tokenizer and token input, and ``generation.py``: ``generate``). What their
blocks share is in ``block.py``, the heavy hooks (``hook_h``, ``hook_ssm_mask``) in
``heavy_hooks.py``, the checked hook point and small modules in ``components.py``."""
