"""Model families: ``HookedMamba`` (Mamba-1, Falcon-Mamba)."""
