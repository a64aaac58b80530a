"""Tokens in: the tokenizer, padding, and the checks on token input, for every hooked Mamba model.

:class:`TokensMixin` is one of ``HookedSSM``'s bases (``tl_mamba/models/base.py``). It holds
TransformerLens' tokenizer helpers (``to_tokens``, ``to_string``, ``to_str_tokens``,
``to_single_token``, ``get_token_position`` ...), the padding side kept in agreement between
the tokenizer and ``cfg.default_padding_side``, and what the forward does with its input
before the embedding (:meth:`TokensMixin._prepare_input`): strings tokenized, token ids
checked against ``d_vocab``, an attention mask checked, or inferred from pad tokens. It reads
``self.cfg`` and ``self.W_E`` (for the device) from the model.
"""

from __future__ import annotations

from typing import Any, List, Literal, Optional, Union

import torch
from torch import Tensor

from tl_mamba.errors import caller_stacklevel


class UnknownTokenWarning(UserWarning):
    """``to_tokens`` read a word its tokenizer's vocabulary lacks as the unknown token."""


class TokensMixin:
    """Tokenizer, padding and token-input checks of ``HookedSSM`` (see the module docstring)."""

    @property
    def tokenizer(self) -> Any:
        """The tokenizer (None when the model has none). Assigning one is ``set_tokenizer(tok)``."""
        return self.__dict__.get("_tokenizer")

    @tokenizer.setter
    def tokenizer(self, tokenizer: Any) -> None:
        self.set_tokenizer(tokenizer)

    def set_tokenizer(self, tokenizer: Any, default_padding_side: Optional[Literal["left", "right"]] = None) -> None:
        """Use ``tokenizer`` (a Hugging Face tokenizer, or None for none), as TransformerLens's
        ``set_tokenizer`` does: its ``padding_side`` is set to ``default_padding_side`` when
        given, else to ``cfg.default_padding_side``, and ``cfg.default_padding_side`` follows.
        (Any object is accepted; one without ``padding_side`` is left as it is.)

        ``model.tokenizer = tok`` does the same. The tokenizer itself is changed (as in
        TransformerLens), so a tokenizer shared by several models pads alike for all of them.

        From then on the padding side is one setting, readable in both places: setting
        ``model.tokenizer.padding_side`` or ``model.cfg.default_padding_side`` changes it,
        and the next ``to_tokens`` / forward / ``generate`` brings the other in line (the
        one changed last wins). It decides how ``to_tokens`` pads a list of strings, and a
        forward on token input without an ``attention_mask`` infers the mask from the pad
        tokens when it is ``"left"`` (as TransformerLens's forward does), so that
        ``transformer_lens.utilities.get_attention_mask(model.tokenizer, tokens, prepend_bos)``
        and ``model.tokenizer.padding_side`` describe the tokens ``to_tokens`` gives.
        """
        if default_padding_side not in ("left", "right", None):
            raise ValueError(f"default_padding_side must be 'left', 'right' or None, got {default_padding_side!r}")
        side = default_padding_side or self.cfg.default_padding_side
        if tokenizer is not None and hasattr(tokenizer, "padding_side"):
            tokenizer.padding_side = side
        self.cfg.default_padding_side = side
        self._padding_side_agreed = side
        self.__dict__["_tokenizer"] = tokenizer

    def _padding_side(self) -> str:
        """The padding side in force: ``tokenizer.padding_side`` and ``cfg.default_padding_side``,
        brought into agreement first (the one changed since they last agreed wins; the
        config when both changed, since a tokenizer may be shared by other models)."""
        cfg_side = self.cfg.default_padding_side
        tok = self.tokenizer
        tok_side = getattr(tok, "padding_side", None) if tok is not None else None
        if tok_side not in ("left", "right") or tok_side == cfg_side:
            if tok_side == cfg_side:
                self._padding_side_agreed = cfg_side
            return cfg_side
        if cfg_side != getattr(self, "_padding_side_agreed", cfg_side):  # the config was changed
            tok.padding_side = cfg_side
            side = cfg_side
        else:  # the tokenizer was changed
            self.cfg.default_padding_side = side = tok_side
        self._padding_side_agreed = side
        return side

    def _require_tokenizer(self, what: str):
        if self.tokenizer is None:
            raise ValueError(
                f"{what} needs a tokenizer, and this model has none. Pass token tensors [batch, pos] instead, "
                "or give one: HookedMamba.from_pretrained(path, tokenizer=...) or model.tokenizer = tok."
            )
        return self.tokenizer

    def _bos_id(self) -> int:
        tok = self.tokenizer
        if tok is not None and getattr(tok, "bos_token_id", None) is not None:
            return int(tok.bos_token_id)
        if self.cfg.bos_token_id is None:
            raise ValueError("prepend_bos=True but neither the tokenizer nor the config has a BOS token id")
        return int(self.cfg.bos_token_id)

    def _pad_id(self) -> int:
        """The id ``to_tokens`` pads with: the tokenizer's pad token, else the config's, else the
        EOS (a GPT-NeoX tokenizer has no pad token; TransformerLens pads with its EOS too), else 0."""
        tok = self.tokenizer
        for candidate in (
            getattr(tok, "pad_token_id", None) if tok is not None else None,
            self.cfg.pad_token_id,
            getattr(tok, "eos_token_id", None) if tok is not None else None,
            self.cfg.eos_token_id,
        ):
            if candidate is not None:
                return int(candidate)
        return 0

    def to_tokens(
        self,
        input: Union[str, List[str]],
        prepend_bos: Optional[bool] = None,
        padding_side: Optional[Literal["left", "right"]] = None,
        move_to_device: bool = True,
        truncate: bool = True,
        return_attention_mask: bool = False,
    ):
        """Tokenize a string or list of strings to ``[b, p]`` (padded to the longest).

        ``prepend_bos`` defaults to ``cfg.default_prepend_bos``; ``padding_side`` to
        ``model.tokenizer.padding_side``, which ``set_tokenizer`` keeps equal to
        ``cfg.default_padding_side`` (``"right"`` unless changed). With
        ``return_attention_mask`` also returns the ``[b, p]`` mask (1 = real token).
        ``truncate`` is accepted as in TransformerLens and does nothing: a recurrent model
        has no context window (``n_ctx``) to cut prompts to.
        """
        tok = self._require_tokenizer("to_tokens")
        prepend_bos = self.cfg.default_prepend_bos if prepend_bos is None else prepend_bos
        padding_side = padding_side or self._padding_side()
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        strings = [input] if isinstance(input, str) else list(input) if isinstance(input, (list, tuple)) else None
        if not strings or not all(isinstance(s, str) for s in strings):
            got = type(input).__name__ if strings is None else "an empty list" if not strings else "a list of " + \
                ", ".join(sorted({type(s).__name__ for s in strings}))
            raise ValueError(f"to_tokens takes a string or a non-empty list of strings, got {got}")
        ids = [list(tok(s, add_special_tokens=False)["input_ids"]) for s in strings]
        self._warn_unknown_tokens(strings, ids)
        if prepend_bos:
            bos = self._bos_id()
            ids = [[bos] + seq for seq in ids]
        length = max(len(seq) for seq in ids)
        if length == 0:
            raise ValueError("to_tokens: every input tokenized to nothing (empty strings without BOS)")
        pad = self._pad_id()
        tokens = torch.full((len(ids), length), pad, dtype=torch.long)
        mask = torch.zeros((len(ids), length), dtype=torch.long)
        for row, seq in enumerate(ids):
            if padding_side == "right":
                tokens[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
                mask[row, : len(seq)] = 1
            else:
                tokens[row, length - len(seq) :] = torch.tensor(seq, dtype=torch.long)
                mask[row, length - len(seq) :] = 1
        if move_to_device:
            tokens, mask = tokens.to(self.W_E.device), mask.to(self.W_E.device)
        return (tokens, mask) if return_attention_mask else tokens

    def _unknown_token_id(self) -> Optional[int]:
        """The tokenizer's unknown-token id, where it means "not in the vocabulary": None when it
        has none, or shares its id with BOS / EOS / pad (GPT-NeoX's ``<|endoftext|>``), whose
        text a prompt may hold on purpose."""
        unk = getattr(self.tokenizer, "unk_token_id", None)
        shared = {getattr(self.tokenizer, f"{name}_token_id", None) for name in ("bos", "eos", "pad")}
        return None if unk is None or unk in shared else int(unk)

    def _warn_unknown_tokens(self, strings: List[str], ids: List[List[int]]) -> None:
        """Warn when a word the vocabulary lacks became the unknown token (a word-level
        tokenizer, such as the toy models', has no pieces to spell it with)."""
        unk = self._unknown_token_id()
        if unk is None:
            return
        unk_text = self.tokenizer.unk_token
        rows = [row for row, (text, seq) in enumerate(zip(strings, ids))
                if seq.count(unk) > text.count(unk_text)]  # an unknown token the text did not spell out
        if rows:
            import warnings

            warnings.warn(f"to_tokens: {len(rows)} of {len(strings)} inputs hold words the tokenizer does not know, "
                          f"read as {unk_text!r} (id {unk}), e.g. {strings[rows[0]][:80]!r} -> "
                          f"{self.tokenizer.convert_ids_to_tokens(ids[rows[0]])[:16]}", UnknownTokenWarning,
                          stacklevel=3)

    def to_string(self, tokens: Union[Tensor, List[int], int]) -> Union[str, List[str]]:
        """Decode ``[p]`` to a string, or ``[b, p]`` to a list of strings."""
        tok = self._require_tokenizer("to_string")
        if isinstance(tokens, int):
            tokens = [tokens]
        tokens = self._ids_to_read(tokens, "to_string")
        if tokens.dim() == 2:
            return [tok.decode(row.tolist()) for row in tokens]
        return tok.decode(tokens.tolist())

    def to_str_tokens(
        self,
        input: Union[str, Tensor, List[int]],
        prepend_bos: Optional[bool] = None,
        padding_side: Optional[str] = None,
    ) -> Union[List[str], List[List[str]]]:
        """One string per token: of a string (tokenized first) or of token ids.

        Token ids may be an int, a 0-d tensor (``logits.argmax(-1)[0, -1]``: a one-element
        list, as in TransformerLens), ``[p]``, ``[1, p]`` (a list of strings) or ``[b, p]``
        (a list of lists); a list of strings gives a list of lists.
        """
        tok = self._require_tokenizer("to_str_tokens")
        if isinstance(input, str):
            tokens = self.to_tokens(input, prepend_bos=prepend_bos, padding_side=padding_side)[0]
        elif isinstance(input, list) and input and isinstance(input[0], str):
            return [self.to_str_tokens(s, prepend_bos=prepend_bos) for s in input]
        else:
            tokens = self._ids_to_read(input, "to_str_tokens")
            if tokens.dim() == 0:
                tokens = tokens[None]
            if tokens.dim() == 2:
                if tokens.shape[0] != 1:
                    return [[tok.decode([t]) for t in row.tolist()] for row in tokens]
                tokens = tokens[0]
        return [tok.decode([t]) for t in tokens.tolist()]

    def _ids_to_read(self, tokens, what: str, max_dims: Optional[int] = 2) -> Tensor:
        """``tokens`` as an integer tensor of ids in ``[0, d_vocab)`` with at most ``max_dims``
        axes, for the methods that decode or look up ids (a tokenizer decodes an id past its
        vocabulary as nothing, so a wrong id would silently vanish from the text)."""
        tokens = torch.as_tensor(tokens)
        if not tokens.numel():  # torch.as_tensor([]) is float
            tokens = tokens.long()
        _check_token_dtype(tokens, f"{what}: the tokens")
        if max_dims is not None and tokens.dim() > max_dims:
            raise ValueError(f"{what} takes token ids [p] or [b, p], got shape {tuple(tokens.shape)}")
        self._check_token_ids(tokens, what=f"{what}: token ids")
        return tokens

    def to_single_token(self, string: str) -> int:
        """The id of a string that is exactly one token (no BOS); error otherwise, and for a
        word the vocabulary lacks (read as the unknown token)."""
        import warnings

        if not isinstance(string, str):
            raise TypeError(f"to_single_token takes a string, got {type(string).__name__} (the string of a token id "
                            "is to_single_str_token(id))")

        with warnings.catch_warnings():  # an unknown word is an error here, not a warning
            warnings.simplefilter("ignore", UnknownTokenWarning)
            tokens = self.to_tokens(string, prepend_bos=False)[0]
        if tokens.numel() != 1:
            raise ValueError(f"{string!r} is {tokens.numel()} tokens, not one: {self.to_str_tokens(tokens)}")
        token = int(tokens.item())
        if token == self._unknown_token_id() and string.strip() != self.tokenizer.unk_token:
            raise ValueError(f"{string!r} is not in the tokenizer's vocabulary: it reads as the unknown token "
                             f"{self.tokenizer.unk_token!r} (id {token})")
        return token

    def to_single_str_token(self, int_token: int) -> str:
        """The string of the single token ``int_token`` (TransformerLens's ``to_single_str_token``)."""
        if isinstance(int_token, Tensor) and int_token.numel() == 1 and not int_token.dtype.is_floating_point:
            int_token = int(int_token.item())
        if isinstance(int_token, bool) or not isinstance(int_token, int):
            raise TypeError(f"to_single_str_token takes one token id (an int), got {type(int_token).__name__}")
        return self.to_str_tokens(torch.tensor([int_token]))[0]

    def get_token_position(
        self,
        single_token: Union[str, int, Tensor],
        input: Union[str, Tensor],
        mode: Literal["first", "last"] = "first",
        prepend_bos: Optional[bool] = None,
        padding_side: Optional[Literal["left", "right"]] = None,
    ) -> int:
        """The position of ``single_token`` in ``input`` (TransformerLens's ``get_token_position``).

        Args:
            single_token: the token to find: an id, or a string that is exactly one token.
            input: a string (tokenized with ``prepend_bos``, default ``cfg.default_prepend_bos``:
                the BOS counts as position 0) or tokens ``[p]`` / ``[1, p]``.
            mode: ``"first"`` or ``"last"`` occurrence.
            prepend_bos / padding_side: how a string ``input`` is tokenized.

        Raises a ``ValueError`` if the token does not occur.
        """
        if mode not in ("first", "last"):
            raise ValueError(f"mode must be 'first' or 'last', got {mode!r}")
        if isinstance(input, str):
            tokens = self.to_tokens(input, prepend_bos=prepend_bos, padding_side=padding_side)
        else:
            tokens = torch.as_tensor(input)
        if tokens.dim() == 2 and tokens.shape[0] == 1:
            tokens = tokens[0]
        if tokens.dim() != 1:
            raise ValueError(f"tokens must be [p] or [1, p], got shape {tuple(tokens.shape)}")
        if isinstance(single_token, str):
            single_token = self.to_single_token(single_token)
        elif isinstance(single_token, Tensor):
            single_token = int(single_token.item())
        positions = (tokens == single_token).nonzero()[:, 0]
        if not positions.numel():
            raise ValueError(f"token {single_token} does not occur in the input")
        return int(positions[0 if mode == "first" else -1])

    def _prepare_input(self, input, attention_mask, prepend_bos, padding_side, continuing: bool = False):
        """Returns ``(tokens [b, p] long, attention_mask [b, p] or None)``.

        ``continuing``: the tokens continue a sequence (a forward from a non-empty
        ``RecurrentState``), so their first column is not where padding would be."""
        if isinstance(input, str) or (isinstance(input, (list, tuple)) and input and isinstance(input[0], str)):
            tokens, mask = self.to_tokens(
                input, prepend_bos=prepend_bos, padding_side=padding_side, return_attention_mask=True
            )
            self._check_token_ids(tokens, from_tokenizer=True)
            if attention_mask is None and not bool(mask.all()):
                attention_mask = mask
            elif attention_mask is not None:
                attention_mask = self._check_mask(attention_mask, tokens.shape)
            return tokens, attention_mask
        if isinstance(input, (list, tuple)) and not input:
            raise ValueError("input is an empty list: give a string, a list of strings or a token tensor [batch, pos]")
        if not isinstance(input, Tensor):
            raise TypeError(f"input must be a token tensor [batch, pos], a string or a list of strings, got {type(input).__name__}")
        tokens = input
        if tokens.dim() == 1:
            tokens = tokens[None]
        if tokens.dim() != 2:
            raise ValueError(f"token input must be [batch, pos], got shape {tuple(input.shape)}")
        _check_token_dtype(tokens, "token input", hint="; to feed residual activations use start_at_layer")
        if tokens.dtype not in (torch.int32, torch.int64):  # int8, int16, uint16 ...: torch indexes only with these
            tokens = tokens.long()
        if tokens.shape[1] == 0:
            raise ValueError("token input has no positions")
        self._check_token_ids(tokens)
        tokens = tokens.to(self.W_E.device)
        if attention_mask is None and not continuing:
            attention_mask = self._padding_from_tokens(tokens, prepend_bos, padding_side)
        if attention_mask is not None:
            attention_mask = self._check_mask(attention_mask, tokens.shape)
        return tokens, attention_mask

    def _check_token_ids(self, tokens: Tensor, from_tokenizer: bool = False, what: str = "token ids") -> None:
        """Every id must index a row of ``W_E``: ``0 <= id < d_vocab``."""
        _check_not_meta(tokens, what)
        if not tokens.numel():
            return
        low, high = int(tokens.min()), int(tokens.max())
        if low >= 0 and high < self.cfg.d_vocab:
            return
        if from_tokenizer:
            raise ValueError(
                f"the tokenizer gave token ids up to {high}, but the model has d_vocab={self.cfg.d_vocab} "
                f"(token ids must lie in [0, {self.cfg.d_vocab})): the tokenizer ({type(self.tokenizer).__name__}, "
                f"{_tokenizer_size(self.tokenizer)} tokens) does not belong to this model. Set model.tokenizer to "
                "the model's own tokenizer."
            )
        raise ValueError(f"{what} must lie in [0, {self.cfg.d_vocab}), got min {low} max {high}")

    def _padding_from_tokens(self, tokens: Tensor, prepend_bos: Optional[bool] = None,
                             padding_side: Optional[str] = None) -> Optional[Tensor]:
        """The attention mask of token input given without one, from the pad id ``to_tokens`` pads
        with (:meth:`_pad_id`: the tokenizer's pad token, else the config's, else the EOS).

        As TransformerLens does, a call with ``padding_side="left"``, or a model that pads on the
        left (``model.tokenizer.padding_side == "left"``, which ``set_tokenizer`` keeps equal to
        ``cfg.default_padding_side``: set either), infers it: each row's leading run of pad
        tokens is padding, less its last token when the pad token is also the BOS that
        ``prepend_bos`` (default ``cfg.default_prepend_bos``) puts there; this is the mask
        ``transformer_lens.utilities.get_attention_mask(model.tokenizer, tokens, prepend_bos)``
        gives. Otherwise nothing is inferred, but rows that begin with runs of pad tokens of
        different lengths are almost surely a left-padded batch, whose pads would run
        through the recurrence and change every later position: that warns.
        """
        import warnings

        tok = self.tokenizer
        infer = (padding_side or self._padding_side()) == "left"
        if tok is None or (tokens.shape[0] == 1 and not infer):
            return None
        pad = self._pad_id()  # what to_tokens pads with
        leading = (tokens == pad).long().cumprod(dim=1)  # [b, p]: 1 on each row's leading pad run
        bos = getattr(tok, "bos_token_id", None)
        bos = self.cfg.bos_token_id if bos is None else bos
        pad_is_bos = pad == bos
        prepend_bos = self.cfg.default_prepend_bos if prepend_bos is None else prepend_bos
        runs = leading.sum(1)
        if infer:
            mask = 1 - leading
            if pad_is_bos and prepend_bos:  # the run's last token is the BOS
                rows = (runs > 0).nonzero()[:, 0]
                mask[rows, runs[rows] - 1] = 1
            mask[runs == tokens.shape[1]] = 1  # a row of nothing but pads is not padding (zeros fed in, say)
            return mask
        # left padding, not a pad id met by chance in random token ids: a run of 2 or more pads, or
        # (pad != BOS) a run followed by the BOS
        looks_padded = runs.numel() > 0 and int(runs.max()) >= 2
        if not looks_padded and not pad_is_bos and bos is not None:
            after = tokens.gather(1, runs.clamp(max=tokens.shape[1] - 1)[:, None])[:, 0]
            looks_padded = bool(((runs > 0) & (runs < tokens.shape[1]) & (after == bos)).any())
        if looks_padded and bool((runs != runs[0]).any()):
            warnings.warn(
                f"The token rows begin with different numbers of pad tokens (id {pad}): this looks like a "
                "left-padded batch given without an attention_mask. The pads then run through the recurrence "
                "and change every later position. Pass attention_mask (to_tokens(..., return_attention_mask=True) "
                "gives it), or pass padding_side='left' (or set model.tokenizer.padding_side = 'left') to have it "
                "inferred from the pad tokens, as TransformerLens does.", UserWarning, stacklevel=caller_stacklevel())
        return None

    def _check_mask(self, attention_mask: Tensor, shape) -> Optional[Tensor]:
        if isinstance(attention_mask, Tensor):
            _check_not_meta(attention_mask, "attention_mask")
        attention_mask = torch.as_tensor(attention_mask, device=self.W_E.device)
        given = tuple(attention_mask.shape)
        if attention_mask.dim() == 1:  # one prompt's mask: a batch of one
            attention_mask = attention_mask[None]
        if tuple(attention_mask.shape) != tuple(shape):
            one_row = " (a 1-D mask is one prompt's)" if len(given) == 1 else ""
            raise ValueError(f"attention_mask must have shape {tuple(shape)} (batch, positions), got {given}{one_row}")
        if attention_mask.is_complex():
            raise TypeError(f"attention_mask must be a bool, integer or float tensor of 0s and 1s, "
                            f"got {attention_mask.dtype}")
        if attention_mask.dtype != torch.bool:
            bad = attention_mask[(attention_mask != 0) & (attention_mask != 1)]  # NaN included
            if bad.numel():
                values = bad.unique().tolist()
                shown = ", ".join(map(str, values[:8])) + (", ..." if len(values) > 8 else "")
                raise ValueError(
                    f"attention_mask must hold only 0 (padding) and 1 (real token), got {shown}. "
                    "It marks padding; it does not weight positions."
                )
        if bool(attention_mask.all()):
            return None
        _check_contiguous_padding(attention_mask)
        return attention_mask


def _check_not_meta(tensor: Tensor, what: str) -> None:
    """A tensor on the meta device has a shape but no values: no id or mask can be read from it."""
    if tensor.is_meta:
        raise ValueError(f"{what}: the tensor is on the meta device, which holds shapes but no values; "
                         "pass real values (on the CPU or the model's device)")


def _check_token_dtype(tokens: Tensor, what: str, hint: str = "") -> None:
    """Token ids must be an integer tensor, and not uint8 or bool: torch indexes with those as masks.
    ``hint`` ends the float message (the forward's: how to feed residual activations)."""
    if tokens.dtype == torch.uint8:
        raise TypeError(
            f"{what} must be an integer tensor of token ids (torch.long), got torch.uint8, which torch treats "
            "as a mask when indexing; convert with tokens.long()"
        )
    if tokens.dtype.is_floating_point or tokens.dtype.is_complex or tokens.dtype == torch.bool:
        raise TypeError(
            f"{what} must be an integer tensor of token ids, got {tokens.dtype}{hint}"
        )


def _tokenizer_size(tokenizer) -> Optional[int]:
    """The number of tokens a tokenizer can produce (added tokens included), or None if it cannot say."""
    try:
        return len(tokenizer)
    except TypeError:
        size = getattr(tokenizer, "vocab_size", None)
        return size if isinstance(size, int) else None


def trailing_padding(tokens: Tensor, pad_id: int) -> Optional[Tensor]:
    """The padding mask ``[b, p]`` (1 at real tokens) of each row's trailing run of ``pad_id``:
    ``to_tokens``' right padding, which the forward needs no mask for (it comes after every real
    token) but a statistic or a hook placing values by token must leave out. None where no row
    has such a run; a row of nothing but pads keeps its tokens (the forward refuses a mask row
    with no real token)."""
    trailing = (tokens == pad_id).flip(1).long().cumprod(1).flip(1).bool()  # [b, p]
    trailing[trailing.all(1)] = False
    return (~trailing).long() if bool(trailing.any()) else None


def padding_hit(chosen: Tensor, real: Tensor) -> Optional[tuple]:
    """Where positions chosen as columns of a batch fall on its padding: ``(row, columns)`` of the
    first row in which ``chosen [b, p]`` (bool) meets a 0 of ``real [b, p]`` (1 at real tokens), or
    None where none does. For the warnings of Knockout, the ablations and patching."""
    hit = chosen & (real == 0)
    if not bool(hit.any()):
        return None
    row = int(hit.any(1).nonzero()[0, 0])
    return row, hit[row].nonzero()[:, 0].tolist()


def leading_padding(mask: Tensor) -> Tensor:
    """Each row's left padding ``[b]``: the length of its leading run of 0s in ``mask [b, p]``
    (an attention mask, 1 or True at real tokens)."""
    return (mask == 0).long().cumprod(1).sum(1)


def _check_contiguous_padding(mask: Tensor) -> None:
    """Padding must be a prefix (left) or a suffix (right) of each row."""
    m = mask.long()
    for row in range(m.shape[0]):
        values = m[row]
        changes = int((values[1:] != values[:-1]).sum())
        if changes > 1 or (changes == 1 and not (values[0] == 0 or values[-1] == 0)):
            raise ValueError(
                f"attention_mask row {row} is not left- or right-padded ({values.tolist()}); "
                "padding must be a contiguous prefix or suffix"
            )
        if int(values.sum()) == 0:
            raise ValueError(f"attention_mask row {row} has no real tokens")
