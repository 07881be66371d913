"""The plugin layer's decision per feature: what `--plugin all` leaves out on this device, and why."""

from __future__ import annotations


def test_plugin_all_leaves_out_what_does_not_pay_here_and_says_why(monkeypatch):
    from types import SimpleNamespace

    import vllm_frontier.spec_decode.device as mtp_device
    from vllm_frontier.plugins import decide
    from vllm_frontier.plugins.features import Features

    hf = SimpleNamespace(num_nextn_predict_layers=1, kv_lora_rank=512, qk_rope_head_dim=64)
    cfg = SimpleNamespace(model_config=SimpleNamespace(hf_config=hf))
    monkeypatch.setattr(mtp_device, "mtp_pays", lambda device_type=None: (False, "slower here"))
    assert decide(Features(mtp=True, all=True), cfg) == {"mtp": "--plugin all leaves it off on this device: slower here"}
    assert decide(Features(mtp=True), cfg) == {}  # named on its own, it stays on
    monkeypatch.setattr(mtp_device, "mtp_pays", lambda device_type=None: (True, ""))
    assert decide(Features(mtp=True, all=True), cfg) == {}
