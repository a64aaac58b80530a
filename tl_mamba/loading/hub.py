"""Turn a user's ``name_or_path`` into a local checkpoint directory."""

from __future__ import annotations

import os
import pathlib
from typing import Optional, Union

from .errors import CheckpointNotFoundError

# Files a checkpoint directory may need: config, weights (one format is chosen when the
# hub can be listed), tokenizer. params.json and the Mistral tokenizers are Mistral's native
# layout (small files); its consolidated.safetensors is fetched only from a repo that has no
# other weights (Codestral's repo has both: the transformers shards are fetched).
CONFIG_PATTERNS = ["config.json", "generation_config.json", "params.json"]
SAFETENSORS_PATTERNS = ["model.safetensors", "model-*.safetensors", "model.safetensors.index.json"]
BIN_PATTERNS = ["pytorch_model.bin", "pytorch_model-*.bin", "pytorch_model.bin.index.json"]
MISTRAL_WEIGHT_PATTERNS = ["consolidated.safetensors"]
TOKENIZER_PATTERNS = [
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "tokenizer.model.v*",
    "tekken.json",
]

_TRUE = {"1", "true", "yes", "on"}


def _hub_offline() -> bool:
    """True when ``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``) is set now.

    Read at call time: huggingface_hub reads it once at import, so a later change to
    the environment (e.g. in a test) would otherwise be missed.
    """
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(var, "").strip().lower() in _TRUE:
            return True
    try:
        from huggingface_hub import constants

        return bool(constants.HF_HUB_OFFLINE)
    except Exception:  # pragma: no cover - huggingface_hub missing
        return False


def _default_cache_dir() -> Optional[str]:
    """The hub cache from the environment as it is now (``HF_HUB_CACHE`` or ``HF_HOME/hub``)."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.path.expanduser(os.environ["HF_HUB_CACHE"])
    if os.environ.get("HF_HOME"):
        return os.path.join(os.path.expanduser(os.environ["HF_HOME"]), "hub")
    return None  # huggingface_hub's own default


def _looks_local(name: str) -> bool:
    """Paths the user clearly meant as local (never a hub id ``owner/name``)."""
    return (
        name.startswith(("/", "./", "../", "~", ".\\", "..\\"))
        or name in (".", "..")
        or name.count("/") > 1
        or "\\" in name
        or (len(name) > 1 and name[1] == ":")  # C:\...
    )


def _not_found(repo_id: str, why: str) -> CheckpointNotFoundError:
    return CheckpointNotFoundError(
        f"could not get checkpoint {repo_id!r} from the Hugging Face hub: {why}. "
        f"It is not a local directory either. If you have the checkpoint on disk, pass its "
        f"local directory path instead (a folder with config.json and the weight files)."
    )


def resolve_checkpoint(
    name_or_path: Union[str, os.PathLike],
    *,
    revision: Optional[str] = None,
    cache_dir: Optional[Union[str, os.PathLike]] = None,
    token: Optional[Union[str, bool]] = None,
    local_files_only: bool = False,
) -> pathlib.Path:
    """Return a local directory holding the checkpoint ``name_or_path``.

    * An existing local directory is returned as is (resolved to an absolute path).
    * The name of a model shipped with the package (``"toy-mamba2"``) gives its directory.
    * A path that looks local (starts with ``/``, ``./``, ``../`` or ``~``, or has more
      than one ``/``) but does not exist raises :class:`CheckpointNotFoundError`.
    * Anything else is a hub id (``"state-spaces/mamba-130m-hf"``): the config, the
      weights (safetensors if the repo has them, else ``pytorch_model*.bin``) and the
      tokenizer files are fetched with ``huggingface_hub.snapshot_download`` into the
      hub cache, or taken from the cache when offline (``HF_HUB_OFFLINE=1`` or
      ``local_files_only=True``). If the id is neither cached nor reachable,
      :class:`CheckpointNotFoundError` (a ``FileNotFoundError``) names the id and
      suggests passing a local directory.
    """
    name = os.fspath(name_or_path)
    path = pathlib.Path(name).expanduser()
    if path.is_dir():
        return path.resolve()
    from tl_mamba.toy.shipped import shipped_model_dir

    shipped = shipped_model_dir(name)
    if shipped is not None:  # a model shipped inside the package ("toy-mamba2")
        return shipped
    if path.exists():
        raise CheckpointNotFoundError(
            f"{name!r} is a file; pass the checkpoint directory (the folder with config.json "
            f"and the weight files) instead"
        )
    if _looks_local(name):
        raise CheckpointNotFoundError(
            f"checkpoint directory {name!r} does not exist (resolved to {path.absolute()})"
        )

    try:
        import huggingface_hub
        from huggingface_hub.errors import (
            GatedRepoError,
            HFValidationError,
            LocalEntryNotFoundError,
            RepositoryNotFoundError,
            RevisionNotFoundError,
        )
        from huggingface_hub.utils import validate_repo_id
    except ImportError as err:  # pragma: no cover - huggingface_hub is a dependency
        raise _not_found(name, "huggingface_hub is not installed") from err

    try:
        validate_repo_id(name)
    except HFValidationError as err:
        raise CheckpointNotFoundError(
            f"{name!r} is neither an existing local directory nor a valid hub id "
            f"('owner/name'): {err}"
        ) from err

    if cache_dir is None:
        cache_dir = _default_cache_dir()
    offline = local_files_only or _hub_offline()
    common = dict(repo_id=name, revision=revision, cache_dir=cache_dir, token=token)
    try:
        if offline:
            folder = huggingface_hub.snapshot_download(**common, local_files_only=True)
        else:
            patterns = CONFIG_PATTERNS + TOKENIZER_PATTERNS + _weight_patterns(name, revision, token)
            folder = huggingface_hub.snapshot_download(**common, allow_patterns=patterns)
    except LocalEntryNotFoundError as err:
        what = f"revision {revision!r} of it is" if revision is not None else "it is"
        why = (
            f"hub access is disabled (HF_HUB_OFFLINE=1) and {what} not in the local cache"
            if offline
            else f"the hub is unreachable and {what} not in the local cache"
        )
        raise _not_found(name, why) from err
    except GatedRepoError as err:
        raise _not_found(name, "the repository is gated; log in with a token that has access") from err
    except RepositoryNotFoundError as err:
        raise _not_found(name, "no such repository (or it is private)") from err
    except RevisionNotFoundError as err:
        raise _not_found(name, f"revision {revision!r} does not exist") from err
    return pathlib.Path(folder)


def _weight_patterns(repo_id: str, revision: Optional[str], token) -> list:
    """Pick one weight format to download: :func:`weight_patterns_for` the repo's file list.

    When the repo cannot be listed (network trouble) both transformers formats are allowed;
    ``snapshot_download`` then falls back to whatever the cache holds.
    """
    try:
        from huggingface_hub import HfApi
        from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

        # One request, no retries (list_repo_files retries with backoff for ~20 s when the
        # hub is down). A fresh HfApi reads the endpoint (HF_ENDPOINT) as it is now.
        info = HfApi().model_info(repo_id, revision=revision, token=token)
        files = [sibling.rfilename for sibling in (info.siblings or [])]
    except (RepositoryNotFoundError, GatedRepoError, RevisionNotFoundError):
        raise
    except Exception:
        return SAFETENSORS_PATTERNS + BIN_PATTERNS
    return weight_patterns_for(files)


def weight_patterns_for(files) -> list:
    """The weight files to fetch from a repo holding ``files``, in the loader's order of
    preference: transformers safetensors (``model*.safetensors``), else ``pytorch_model*.bin``,
    else Mistral's ``consolidated.safetensors``; both transformers formats if it has none."""
    import fnmatch

    files = list(files)
    for patterns in (SAFETENSORS_PATTERNS, BIN_PATTERNS, MISTRAL_WEIGHT_PATTERNS):
        if any(fnmatch.fnmatchcase(f, p) for f in files for p in patterns):
            return patterns
    return SAFETENSORS_PATTERNS + BIN_PATTERNS
