"""Checks of ``hook_h`` shared by the two families' hook tests (tests/test_intermediates.py for
Mamba-1, tests/test_mamba2_hooks.py for Mamba-2). Each family passes its own float64
``reference_forward`` (written from DESIGN.md with no tl_mamba function) and its ``_run`` helper."""

from __future__ import annotations

import torch
import torch.nn.functional as F

TOL = dict(atol=1e-5, rtol=1e-5)


def _cross_entropy(logits, tokens):
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))


def check_edit_returned_in_a_narrower_dtype(model, tokens, backend, narrow, run, reference_forward) -> None:
    """A hook that returns the states in ``narrow`` (bf16 / fp16) with position 3 halved edits
    position 3 only: its rounding of the other entries is not an edit. (Compared in the states'
    dtype, every entry differed, and every later state was pinned to its unedited value instead
    of continuing from the edit.) The reference applies at t = 3 the very values the hook wrote."""
    written = {}

    def halve_then_round(h, hook):
        h = h.clone()
        h[:, 3] *= 0.5
        out = h.to(narrow)
        written["h3"] = out[:, 3].double()
        return out

    logits, cache = run(model, tokens, backend, hooks=[("blocks.0.hook_h", halve_then_round)])
    ref_logits, acts, _ = reference_forward(model, tokens, h_edits={0: lambda t, h: written["h3"] if t == 3 else h})
    torch.testing.assert_close(cache["blocks.0.hook_y"][:, 4:].double(), acts["blocks.0.hook_y"][:, 4:], **TOL)
    torch.testing.assert_close(logits.double(), ref_logits, **TOL)


def check_probe_on_the_states_reaches_the_weights(model, tokens, backend, probe, reference_forward) -> None:
    """A hook that only reads the states, whose value enters the loss (a probe on h, ``probe`` of
    one state's shape): its gradient reaches the weights through the states, as autograd through
    the reference says. (The scan skips its states' backward when nothing but the recurrence term
    reads them: this is the case where something else does.)"""
    model.set_backend(backend)
    model.zero_grad(set_to_none=True)
    seen = {}
    logits = model.run_with_hooks(tokens, fwd_hooks=[("blocks.0.hook_h", lambda h, hook: seen.update(h=h))])
    (_cross_entropy(logits, tokens) + (seen["h"] * probe).sum()).backward()
    got = model.blocks[0].mixer.in_proj.weight.grad
    model.zero_grad(set_to_none=True)

    name = "blocks.0.mixer.in_proj.weight"
    weights = {k: v.detach().double() for k, v in model.state_dict().items()}
    weights[name].requires_grad_()
    states = []

    def keep(t, h):
        states.append(h)
        return h

    ref_logits, _, _ = reference_forward(model, tokens, h_edits={0: keep}, weights=weights)
    ref_ce = _cross_entropy(ref_logits, tokens)
    (ref,) = torch.autograd.grad(ref_ce + sum((h * probe.double()).sum() for h in states), weights[name],
                                 retain_graph=True)
    (ref_ce_only,) = torch.autograd.grad(ref_ce, weights[name])
    assert (ref - ref_ce_only).abs().max() > 1e-3  # the probe's part is not negligible
    torch.testing.assert_close(got.double(), ref, atol=1e-5, rtol=1e-4)


def check_states_returned_rounded_leave_the_gradients(model, tokens, backend, reference_forward) -> None:
    """A hook that returns the states rounded to bf16 and changes nothing else edits nothing: the
    weights' gradients are those of the unhooked model, by autograd through the reference. (The
    total-derivative term's gradient came back rounded through the hook's cast, and the rounding
    was passed into the states as a gradient through edits: 6e-3 to 1e-2 relative.)"""
    model.set_backend(backend)
    weights = {k: v.detach().double().requires_grad_() for k, v in model.state_dict().items()}
    ref_logits, _, _ = reference_forward(model, tokens, weights=weights)
    names = [name for name, _ in model.named_parameters() if name in weights]
    refs = torch.autograd.grad(_cross_entropy(ref_logits, tokens), [weights[name] for name in names],
                               allow_unused=True)
    assert len(names) > 5
    name = "blocks.0.hook_h"
    rounded = (name, lambda h, hook: h.clone().to(torch.bfloat16))
    rounded_again = (name, lambda h, hook: h.to(torch.bfloat16))  # (bf16 given: the same tensor back)
    reads = (name, lambda h, hook: None)
    # the rounding alone, and with hooks that change nothing after it (with hooks run one at a time,
    # the rounding was left out of the gradient taken out: 2.6e-3 relative). (Widened back to fp32 by
    # a later hook, the rounded values differ from the states in the dtype returned: an edit.)
    for hooks in ([rounded], [rounded, reads], [rounded, rounded_again], [reads, rounded]):
        model.zero_grad(set_to_none=True)
        logits = model.run_with_hooks(tokens, fwd_hooks=hooks)
        _cross_entropy(logits, tokens).backward()
        got = {name: param.grad.double() for name, param in model.named_parameters() if param.grad is not None}
        model.zero_grad(set_to_none=True)
        for param_name, ref in zip(names, refs):
            if ref is not None:
                torch.testing.assert_close(got[param_name], ref, atol=1e-6, rtol=1e-4,
                                           msg=lambda m: f"{param_name} under {len(hooks)} hooks: {m}")


def check_int_or_bool_states_are_read_as_floats(model, tokens, backend, dtype, run, reference_forward) -> None:
    """A hook returning the states as ``dtype`` (int64 or bool: ``h > 0``) sets every entry to 0 or 1,
    as if it had cast them to float (compared in the int dtype, the truncated originals matched
    half of the new values, which then kept their old floats)."""
    written = {}

    def signs(h, hook):
        written["h"] = (h > 0).to(dtype)
        return written["h"]

    logits, _ = run(model, tokens, backend, hooks=[("blocks.0.hook_h", signs)])
    ref_logits, _, _ = reference_forward(model, tokens, h_edits={0: lambda t, h: written["h"][:, t].double()})
    torch.testing.assert_close(logits.double(), ref_logits, **TOL)


def check_hooks_after_an_edit_see_the_continued_states(model, tokens, backend, probe, reference_forward) -> None:
    """Hooks on ``hook_h`` run in order, and a hook after an edit gets the states the recurrence
    continues into from it: a cache before the edits holds the unedited states, one between them
    the states after the first edit, one after both the states y is read from. A second edit that
    is a function of the states applies to the continued ones, so two hooks mean what one sequential
    scan with both edits means. (Every hook got the unedited states, and a cache after an edit held
    them past the edited position, where y never read them.) The reference applies the edits step
    by step; the weights' gradients, a probe on the last hook's states included, are autograd's
    through it."""
    model.set_backend(backend)
    seen = {}

    def keep(key):
        def hook(h, hook):  # (a copy: a later hook's in-place edit shows in the tensor itself, as at any hook)
            seen[key] = h.clone()
            return None  # (a cache's way: the next hook gets the same tensor)
        return hook

    def halve_at_2(h, hook):  # in place
        h[:, 2] *= 0.5

    def flip_at_5(h, hook):  # a function of the states it is given, out of place
        h = h.clone()
        h[:, 5] = -1.5 * h[:, 5]
        return h

    name = "blocks.0.hook_h"
    hooks = [(name, keep("before")), (name, halve_at_2), (name, keep("between")), (name, flip_at_5),
             (name, keep("after"))]
    model.zero_grad(set_to_none=True)
    logits = model.run_with_hooks(tokens, fwd_hooks=hooks)
    loss = _cross_entropy(logits, tokens) + (seen["after"] * probe).sum()
    loss.backward()
    got = {n: param.grad.double() for n, param in model.named_parameters() if param.grad is not None}
    model.zero_grad(set_to_none=True)

    def first(t, h):
        return 0.5 * h if t == 2 else h

    def both(t, h):
        return -1.5 * h if t == 5 else first(t, h)

    with torch.no_grad():
        _, plain, _ = reference_forward(model, tokens)
        _, after_first, _ = reference_forward(model, tokens, h_edits={0: first})
    torch.testing.assert_close(seen["before"].detach().double(), plain[name], **TOL)
    torch.testing.assert_close(seen["between"].detach().double(), after_first[name], **TOL)
    assert (after_first[name][:, 3:] - plain[name][:, 3:]).abs().max() > 1e-3  # the first edit carried on
    weights = {k: v.detach().double().requires_grad_() for k, v in model.state_dict().items()}
    ref_logits, acts, _ = reference_forward(model, tokens, h_edits={0: both}, weights=weights)
    torch.testing.assert_close(seen["after"].detach().double(), acts[name], **TOL)
    torch.testing.assert_close(logits.detach().double(), ref_logits.detach(), **TOL)
    ref_loss = _cross_entropy(ref_logits, tokens) + (acts[name] * probe.double()).sum()
    names = [n for n in got if n in weights]
    refs = torch.autograd.grad(ref_loss, [weights[n] for n in names], allow_unused=True)
    assert "blocks.0.mixer.in_proj.weight" in names
    for n, ref in zip(names, refs):
        if ref is not None:
            torch.testing.assert_close(got[n], ref, atol=1e-5, rtol=1e-4, msg=lambda m: f"{n}: {m}")
    # without autograd, in inference mode too, the same, final states included (there the last
    # rerun's output, when no hook changed the states after it, is the forward's: no second rerun)
    from tl_mamba import RecurrentState

    with torch.no_grad():
        _, _, ref_finals = reference_forward(model, tokens, h_edits={0: both})
    for mode in (torch.no_grad, torch.inference_mode):
        state = RecurrentState.empty(model.cfg.n_layers)
        with mode():
            again = model.run_with_hooks(tokens, fwd_hooks=hooks, state=state)
        torch.testing.assert_close(again.double(), ref_logits.detach(), **TOL)
        torch.testing.assert_close(seen["between"].double(), after_first[name], **TOL)
        torch.testing.assert_close(state.layers[0]["ssm"].double(), ref_finals[0], **TOL)
