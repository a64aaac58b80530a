"""The `tl-mamba` command runs end to end (the README's main job)."""

from tl_mamba.cli import main


def test_demo_writes_plots(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path)]) == 0
    for name in ("patch_resid_pre.png", "patch_state.png"):
        data = (tmp_path / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000
    out = capsys.readouterr().out
    assert "logit lens" in out and "agrees with a full forward: True" in out


def test_hooks_lists_contract_hooks(capsys):
    assert main(["hooks"]) == 0
    out = capsys.readouterr().out
    for hook in ("hook_h", "hook_ssm_mask", "hook_delta", "ln_final.hook_scale"):
        assert hook in out
