"""benchmarks/sparse_prefill_profile.py: the attention time of a sparse prefill split into the
block-sparse engine's parts, on a tiny model."""

from __future__ import annotations

from tokensift.runtime import block_sparse as bsa

from .conftest import load_benchmark, prompt_ids, tiny_model
from .test_sparse_prefill import _pattern_file


def test_profile_splits_attention_by_kind_of_call(tmp_path) -> None:
    profile = load_benchmark("sparse_prefill_profile")
    model = tiny_model("llama")
    config = _pattern_file(tmp_path, model, "vertical_slash", 4, 5)
    engine = {name: getattr(bsa, name) for name in profile.Parts.NAMES}
    specs = {
        "stacked": "a_shape:sinks=4,local=16,block_size=8,dense_tail=8",
        "per head": f"minference:config={config},block_size=8,last_q=16,recent_slashes=4,vertical_sinks=2,"
        "dense_tail=8",
    }
    rows = {kind: profile.profile(model, prompt_ids(120), spec) for kind, spec in specs.items()}
    for kind, row in rows.items():
        parts = row["parts"]
        assert set(parts) == {f"sparse, {kind}", "dense rows", "dense tail"}, parts
        sparse = parts[f"sparse, {kind}"]
        assert sparse["pairs"] > 0 and sparse["calls"] == model.num_layers
        assert sparse["ns_per_pair"] == 1e9 * sparse["seconds"] / sparse["pairs"]
        known = sum(part["seconds"] for part in parts.values())
        assert 0 < known <= row["attention_seconds"]
        assert abs(row["rest_seconds"] - (row["attention_seconds"] - known)) < 1e-9
        assert row["pairs_computed"] < 1.0
    assert {name: getattr(bsa, name) for name in profile.Parts.NAMES} == engine  # unwrapped after
    table = profile.render({"rows": list(rows.values())})
    assert f"| `{specs['stacked']}` |" in table and table.count("\n") == 3
