"""Generation: ``generate`` decodes one token per forward on a carried ``RecurrentState``.

:class:`GenerationMixin` is one of ``HookedSSM``'s bases (``tl_mamba/models/base.py``);
:func:`sample_next_token` is its sampling step (greedy, temperature, top-k, top-p,
frequency and repetition penalties).
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Union

import torch
from torch import Tensor

from tl_mamba.models.tokens import _check_token_dtype


class GenerationMixin:
    """``generate`` of ``HookedSSM``: one prefill forward, then one forward per new token."""

    @torch.no_grad()
    def generate(
        self,
        input: Union[str, List[str], Tensor] = "",
        max_new_tokens: int = 10,
        stop_at_eos: bool = True,
        eos_token_id: Optional[Union[int, Sequence[int]]] = None,
        do_sample: bool = True,
        top_k: Optional[int] = None,
        top_p: Optional[float] = None,
        temperature: float = 1.0,
        freq_penalty: float = 0.0,
        repetition_penalty: float = 1.0,
        use_past_kv_cache: bool = True,
        prepend_bos: Optional[bool] = None,
        padding_side: Optional[str] = None,
        return_type: Optional[str] = "input",
        verbose: bool = True,
        attention_mask: Optional[Tensor] = None,
        seed: Optional[int] = None,
    ):
        """Decode recurrently: one prefill forward, then one forward per new token.

        The conv and SSM states are carried in a ``RecurrentState``, so each new
        token costs the same whatever the prefix length, and hooks fire at every
        step (on ``p = 1`` tensors after the prefill). So an edit of ``hook_h`` that is a
        function of the state (``h * 0.5``, ``h + v``) compounds from step to step, each
        step's hook seeing the state the last step's edit left, where one forward over the
        same tokens applies it to the states of the unedited scan (docs/quickstart.md,
        "Editing the state through hook_h"); ``use_past_kv_cache=False`` reads it that way. Keyword names follow
        TransformerLens' ``generate``. ``return_type="input"`` returns strings for
        string input and tokens otherwise; ``"str"`` / ``"tokens"`` force one (None
        gives tokens, as in TransformerLens). A string is the row's prompt and new tokens
        decoded with ``skip_special_tokens=True``, as TransformerLens (3.x and 4.x) decodes
        them: no BOS, no EOS, so ``generate(prompt)`` starts with ``prompt``. Unlike
        TransformerLens, a batch's padding (on the left, or the fill after a row's EOS) is
        left out even where the pad token is not a special token, so that each prompt of a
        batch gets the text it gets alone. Strings are padded on the left whatever ``padding_side``
        says (new tokens follow each prompt's last), as in TransformerLens 4.x; a token batch must
        come left-padded. For the BOS and EOS, ask for
        ``return_type="tokens"`` and use ``to_string``. ``top_k`` must be a positive int or
        None, and ``eos_token_id`` an id or a non-empty list of ids. A row that has ended is
        filled with the (first) EOS id, as in TransformerLens (transformers fills with the pad id).
        ``repetition_penalty`` (TransformerLens 4.x, transformers' rule): a token already in the
        row (its prompt or its new tokens, not its padding) has a positive logit divided by it
        and a negative one multiplied, before temperature, greedy decoding included; 1 is none.

        ``use_past_kv_cache=False`` re-runs the whole sequence at every step instead
        (hooks then see the whole sequence each time; cost grows with its length).
        So does every step while a ``Knockout`` is active: its positions (``sources=[0]``,
        ``targets=[-1]``) index the whole sequence, which a one-token step cannot see.
        Each new token is then predicted with the knockout applied to the sequence so
        far, its ``-1`` being the newest token. (A hand-written hook on ``hook_ssm_mask``
        sees each step's ``[b, H, 1, 1]`` mask, as any hook sees one-token tensors.)
        A hook that needs to know which place of the sequence a step's tensors are reads
        ``model.position_offset``; the ablation hooks of ``tl_mamba.circuits.ablation`` do, so
        their positions name places of the whole sequence (``positions=[2]`` ablates the
        prompt's third token once; negative positions are refused, the end moving at every step).
        """
        from tl_mamba.knockout import active_knockouts

        if isinstance(max_new_tokens, bool) or not hasattr(max_new_tokens, "__index__"):
            raise TypeError(f"max_new_tokens must be an int, got {max_new_tokens!r}")
        max_new_tokens = int(max_new_tokens)
        if max_new_tokens < 0:
            raise ValueError("max_new_tokens must be >= 0")
        if temperature < 0:
            raise ValueError("temperature must be >= 0")
        if freq_penalty < 0:  # as TransformerLens: a negative penalty would reward repetition
            raise ValueError(f"freq_penalty must be >= 0, got {freq_penalty}")
        if isinstance(repetition_penalty, bool) or not isinstance(repetition_penalty, (int, float)) \
                or not repetition_penalty > 0:  # (as transformers: 0 would divide by zero, a negative flip signs)
            raise ValueError(f"repetition_penalty must be a positive number (1.0: none), got {repetition_penalty!r}")
        if top_p is not None and not 0 < top_p <= 1:
            raise ValueError("top_p must be in (0, 1]")
        if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k <= 0):
            raise ValueError(f"top_k must be a positive int (or None for no top-k filtering), got {top_k!r}")
        if return_type not in ("input", "str", "tokens", None):
            raise ValueError(f"return_type must be 'input', 'str' or 'tokens', got {return_type!r}")
        if isinstance(eos_token_id, Tensor):
            eos_token_id = eos_token_id.tolist()
        if eos_token_id is not None and not isinstance(eos_token_id, int):
            eos_token_id = list(eos_token_id)
            if not eos_token_id and stop_at_eos:
                raise ValueError(
                    "eos_token_id is empty: give a token id or a non-empty list of them, "
                    "or stop_at_eos=False to never stop early"
                )
        string_input = isinstance(input, str) or (isinstance(input, list) and input and isinstance(input[0], str))
        if string_input:  # new tokens are appended on the right, so prompts must end together: strings are
            # padded on the left whatever padding_side says, as TransformerLens 4.x's generate does
            if padding_side not in (None, "left", "right"):
                raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
            padding_side = "left"
        tokens, attention_mask = self._prepare_input(input, attention_mask, prepend_bos, padding_side)
        if attention_mask is not None and not bool(attention_mask[:, -1].all()):
            raise ValueError(
                "generate needs every prompt to end at the last column: use left padding "
                "(a left-padded attention_mask, or padding_side='left' where the pads are read off the pad "
                "token; or give the prompts as strings, which generate pads on the left itself)"
            )
        if eos_token_id is None and stop_at_eos:
            eos_token_id = getattr(self.tokenizer, "eos_token_id", None) if self.tokenizer is not None else None
            if eos_token_id is None:
                eos_token_id = self.cfg.eos_token_id
        eos_ids = (
            torch.tensor([eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id), device=tokens.device)
            if (stop_at_eos and eos_token_id is not None)
            else None
        )
        if eos_ids is not None:  # an id the model cannot produce would never stop generation
            _check_token_dtype(eos_ids, "eos_token_id")
            self._check_token_ids(eos_ids, what="eos_token_id")
        gen = torch.Generator(device=tokens.device).manual_seed(seed) if seed is not None else None
        knockouts = active_knockouts(self)
        for ko in knockouts:
            if any(isinstance(getattr(ko, what), Tensor) and getattr(ko, what).dtype == torch.bool
                   for what in ("sources", "targets")):
                raise ValueError(
                    f"generate under {ko!r}: its bool-mask positions name the positions of one sequence length, "
                    "but generate lengthens the sequence at every step. Give sources and targets as ints "
                    "(negative ones count from the end: targets=[-1] is the newest token at each step).")
        if attention_mask is None:  # no padding, read with this call's prepend_bos and padding_side: the
            # forwards below must not infer padding again with the model's defaults (a BOS asked for here
            # would be taken for a pad where the pad token is the BOS and the model pads on the left)
            attention_mask = torch.ones_like(tokens)
        recurrent = use_past_kv_cache and not knockouts
        from tl_mamba.models.base import RecurrentState  # (base imports this module)

        state = RecurrentState.empty(self.cfg.n_layers) if recurrent else None
        growing, self._sequence_grows = self._sequence_grows, True  # hooks: model.position_offset
        try:
            result, own = self._decode(tokens, attention_mask, state, max_new_tokens, eos_ids, do_sample, top_k,
                                       top_p, temperature, freq_penalty, repetition_penalty, gen, verbose)
        finally:
            self._sequence_grows = growing
        if return_type == "str" or (return_type == "input" and string_input):
            # each row's own tokens only: a padded batch gives every prompt the text it gets alone
            tok = self._require_tokenizer("generate with string output")
            strings = [tok.decode(row[keep].tolist(), skip_special_tokens=True) for row, keep in zip(result, own)]
            return strings[0] if isinstance(input, str) else strings
        return result

    def _decode(self, tokens, attention_mask, state, max_new_tokens, eos_ids, do_sample, top_k, top_p, temperature,
                freq_penalty, repetition_penalty, gen, verbose):
        """generate's loop: ``(tokens [b, p + new], own [b, p + new])``, ``own`` marking each row's
        own tokens (not its padding, nor the fill after its EOS). ``state`` None re-runs the sequence
        at every step."""
        from tqdm.auto import tqdm

        recurrent = state is not None
        logits = self(tokens, attention_mask=attention_mask, state=state)
        finished = torch.zeros(tokens.shape[0], dtype=torch.bool, device=tokens.device)
        out_tokens = [tokens]
        # which tokens are each row's own (for strings): not its padding, nor the fill after its EOS
        own = [attention_mask.bool()]
        pad = self._pad_id() if eos_ids is None else int(eos_ids[0])
        for step in tqdm(range(max_new_tokens), disable=not verbose, desc="generate"):
            # the penalties count each row's own tokens: a pad id in a shorter prompt's padding is not
            # a token of that prompt (TransformerLens counts it, so a row depended on the others' lengths)
            penalised = freq_penalty or repetition_penalty != 1
            next_tokens = sample_next_token(
                logits[:, -1], do_sample=do_sample, top_k=top_k, top_p=top_p, temperature=temperature,
                freq_penalty=freq_penalty, repetition_penalty=repetition_penalty,
                history=torch.cat(out_tokens, dim=1) if penalised else None,
                history_mask=torch.cat(own, dim=1) if penalised else None, generator=gen,
            )
            next_tokens = torch.where(finished, torch.full_like(next_tokens, pad), next_tokens)
            out_tokens.append(next_tokens[:, None])
            own.append(~finished[:, None])
            if eos_ids is not None:
                finished |= torch.isin(next_tokens, eos_ids)
                if bool(finished.all()):
                    break
            if step + 1 == max_new_tokens:  # no forward for a token nobody will read
                break
            if recurrent:
                logits = self(next_tokens[:, None], state=state)
            else:
                sequence = torch.cat(out_tokens, dim=1)
                # left padding only (checked above): new tokens are real
                attention_mask = torch.cat([attention_mask, attention_mask.new_ones(len(sequence), 1)], dim=1)
                logits = self(sequence, attention_mask=attention_mask)
        return torch.cat(out_tokens, dim=1), torch.cat(own, dim=1)


def sample_next_token(
    logits: Tensor,
    *,
    do_sample: bool,
    top_k: Optional[int],
    top_p: Optional[float],
    temperature: float,
    freq_penalty: float = 0.0,
    repetition_penalty: float = 1.0,
    history: Optional[Tensor] = None,
    history_mask: Optional[Tensor] = None,
    generator: Optional[torch.Generator] = None,
) -> Tensor:
    """Pick the next token from ``logits [b, v]``: greedy, or sampled with temperature / top-k / top-p.

    ``freq_penalty`` subtracts ``freq_penalty ×`` each token's count in ``history [b, t]``, counting
    only where ``history_mask [b, t]`` is true (a row's own tokens, not the batch's padding).
    ``repetition_penalty`` divides the positive logits of the tokens present there (and multiplies
    the negative ones), before everything else: greedy decoding too."""
    logits = logits.float()
    counts = None
    if history is not None and (freq_penalty or repetition_penalty != 1):  # each token's count in its row
        weights = (torch.ones_like(history, dtype=logits.dtype) if history_mask is None
                   else history_mask.to(logits.dtype))
        counts = torch.zeros_like(logits).scatter_add_(1, history, weights)
    if repetition_penalty != 1 and counts is not None:
        penalised = torch.where(logits > 0, logits / repetition_penalty, logits * repetition_penalty)
        logits = torch.where(counts > 0, penalised, logits)
    if not do_sample or temperature == 0:
        return logits.argmax(-1)
    logits = logits / temperature
    if freq_penalty and counts is not None:
        logits = logits - freq_penalty * counts
    if top_k is not None and top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        drop = cumulative - sorted_logits.softmax(-1) >= top_p  # keep the smallest prefix reaching top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(1, order, sorted_logits)
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]
