"""Feature parsing through its public API: `load_features`, `parse_plugin_list`, `FeatureError`.

Edge values: each spelling of yes/no, the fp4 aliases, both ends of the MTP draft length range."""

import pytest

from vllm_frontier.plugins.features import FeatureError, load_features, parse_plugin_list

BOOL_VARS = {"FRONTIER_DSA": "dsa", "FRONTIER_MLA": "mla", "FRONTIER_MTP": "mtp",
             "FRONTIER_SPEC_MOE": "spec_moe", "FRONTIER_PD": "pd", "FRONTIER_ALL": "all"}


@pytest.mark.parametrize("var", sorted(BOOL_VARS))
@pytest.mark.parametrize("raw,want", [
    ("1", True), ("true", True), ("on", True), ("yes", True), ("YES", True), (" Yes ", True), ("True", True),
    ("0", False), ("false", False), ("off", False), ("no", False), ("NO", False), ("", False), ("  ", False),
])
def test_yes_no_spellings_for_every_switch(var, raw, want):
    f = load_features({var: raw})
    assert getattr(f, BOOL_VARS[var]) is want
    others = [v for v in BOOL_VARS if v != var]
    assert not any(getattr(f, BOOL_VARS[v]) for v in others) and f.fp4 is None


@pytest.mark.parametrize("raw", ["2", "y", "n", "enable", "ja", "1.0"])
def test_other_spellings_are_errors_naming_the_variable_and_the_valid_values(raw):
    with pytest.raises(FeatureError) as e:
        load_features({"FRONTIER_PD": raw})
    msg = str(e.value)
    assert msg.startswith(f"FRONTIER_PD={raw!r} is invalid") and "yes/no" in msg and "\n" not in msg


def test_all_is_parsed_like_the_others():
    with pytest.raises(FeatureError, match="FRONTIER_ALL='maybe'"):
        load_features({"FRONTIER_ALL": "maybe"})


@pytest.mark.parametrize("raw,mode", [
    ("1", "nvfp4"), ("yes", "nvfp4"), ("on", "nvfp4"), ("true", "nvfp4"),
    ("nvfp4", "nvfp4"), ("NVFP4", "nvfp4"), (" mxfp4 ", "mxfp4"), ("MXFP4", "mxfp4"),
    ("0", None), ("no", None), ("off", None), ("", None),
])
def test_fp4_values(raw, mode):
    assert load_features({"FRONTIER_FP4": raw}).fp4 == mode


@pytest.mark.parametrize("raw", ["fp8", "nvfp8", "mxfp6", "2"])
def test_fp4_bad_mode(raw):
    with pytest.raises(FeatureError, match="FRONTIER_FP4=.*valid values: 0, 1 \\(= nvfp4\\), nvfp4, mxfp4"):
        load_features({"FRONTIER_FP4": raw})


@pytest.mark.parametrize("k", ["1", "2", "7", "8", " 8"])
def test_mtp_draft_length_in_range(k):
    assert load_features({"FRONTIER_MTP": "1", "FRONTIER_MTP_K": k}).mtp_k == int(k)


@pytest.mark.parametrize("k", ["0", "9", "-1", "100", "", "three", "2.5"])
def test_mtp_draft_length_out_of_range(k):
    with pytest.raises(FeatureError, match="an integer from 1 to 8"):
        load_features({"FRONTIER_MTP": "1", "FRONTIER_MTP_K": k})


def test_mtp_draft_length_default_is_3():
    assert load_features({"FRONTIER_MTP": "1"}).mtp_k == 3
    assert load_features({}).mtp_k == 3


def test_nothing_set_is_all_off():
    f = load_features({})
    assert (f.dsa, f.mla, f.fp4, f.mtp, f.spec_moe, f.pd, f.all) == (False, False, None, False, False, False, False)
    assert not f.any and f.active() == []
    assert f.describe() == "vllm-frontier features: none (plugin inactive)"


def test_active_lists_features_in_order_with_the_fp4_mode():
    f = load_features({"FRONTIER_PD": "1", "FRONTIER_FP4": "mxfp4", "FRONTIER_DSA": "on", "FRONTIER_ALL": "1"})
    assert f.any and f.active() == ["dsa", "fp4=mxfp4", "pd"]
    assert f.describe() == "vllm-frontier features: dsa, fp4=mxfp4, pd [--plugin all]"


def test_environ_defaults_to_the_process_environment(monkeypatch):
    monkeypatch.setenv("FRONTIER_MLA", "yes")
    monkeypatch.setenv("FRONTIER_MTP_K", "5")
    f = load_features()
    assert f.mla and f.mtp_k == 5


# ---- --plugin lists -------------------------------------------------------------------------
@pytest.mark.parametrize("value,env", [
    ("dsa", {"FRONTIER_DSA": "1"}),
    ("MLA", {"FRONTIER_MLA": "1"}),
    ("fp4", {"FRONTIER_FP4": "nvfp4"}),
    ("nvfp4", {"FRONTIER_FP4": "nvfp4"}),
    ("mxfp4", {"FRONTIER_FP4": "mxfp4"}),
    ("fp4=mxfp4", {"FRONTIER_FP4": "mxfp4"}),
    ("fp4=nvfp4", {"FRONTIER_FP4": "nvfp4"}),
    ("mtp", {"FRONTIER_MTP": "1"}),
    ("mtp=1", {"FRONTIER_MTP": "1", "FRONTIER_MTP_K": "1"}),
    ("mtp=8", {"FRONTIER_MTP": "1", "FRONTIER_MTP_K": "8"}),
    ("spec_moe", {"FRONTIER_SPEC_MOE": "1"}),
    ("spec-moe", {"FRONTIER_SPEC_MOE": "1"}),
    ("specmoe", {"FRONTIER_SPEC_MOE": "1"}),
    ("pd,,dsa,", {"FRONTIER_PD": "1", "FRONTIER_DSA": "1"}),
])
def test_plugin_names_and_aliases(value, env):
    assert parse_plugin_list(value) == env


def test_plugin_all_sets_every_feature_and_keeps_explicit_modes():
    env = parse_plugin_list("all")
    assert env == {"FRONTIER_ALL": "1", "FRONTIER_DSA": "1", "FRONTIER_MLA": "1", "FRONTIER_FP4": "1",
                   "FRONTIER_MTP": "1", "FRONTIER_SPEC_MOE": "1", "FRONTIER_PD": "1"}
    f = load_features(env)
    assert f.all and f.fp4 == "nvfp4" and f.active() == ["dsa", "mla", "fp4=nvfp4", "mtp", "spec_moe", "pd"]
    assert parse_plugin_list("mxfp4,all")["FRONTIER_FP4"] == "mxfp4"
    assert parse_plugin_list("all,mtp=6")["FRONTIER_MTP_K"] == "6"


@pytest.mark.parametrize("value", ["mtp=0", "mtp=9", "mtp=x"])
def test_plugin_mtp_bound(value):
    with pytest.raises(FeatureError, match="FRONTIER_MTP_K=.*from 1 to 8"):
        parse_plugin_list(value)


@pytest.mark.parametrize("value,match", [
    ("", "at least one name"),
    (" , ", "at least one name"),
    ("fp4=fp8", "FRONTIER_FP4='fp8'"),
    ("dsa=1", "unknown name 'dsa=1'"),
    ("all=1", "unknown name 'all=1'"),
    ("flash", "unknown name 'flash'"),
])
def test_plugin_errors_list_the_valid_names(value, match):
    with pytest.raises(FeatureError, match=match) as e:
        parse_plugin_list(value)
    if "name" in match:
        assert "valid names: all, dsa, mla, fp4, fp4=nvfp4, fp4=mxfp4, mtp, mtp=K, spec_moe, pd" in str(e.value)


def test_feature_error_is_a_value_error():
    assert issubclass(FeatureError, ValueError)
