from pathlib import Path

import pytest

from everloop.errors import SpecError
from everloop.spec import load_spec, parse_spec

MINIMAL = {"name": "churn", "data": {"source": "d.csv", "target": "y"}}


def test_minimal_file_gets_defaults():
    spec = parse_spec(MINIMAL)
    assert spec.evaluation.split.holdout == 0.2
    assert spec.monitoring.window.rows == 5000
    assert spec.retraining.triggers == ["drift", "performance"]


@pytest.mark.parametrize(("change", "expected"), [
    ({"model": {"params": "abc"}}, "model.params: Input should be a valid dictionary (got 'abc')"),
    ({"evaluation": {"metric": "auc"}}, "evaluation.metric: Input should be"),
    ({"evaluation": {"split": {"holdout": 1.5}}}, "evaluation.split.holdout: Input should be less than 1 (got 1.5)"),
    ({"monitoring": {"window": {}}}, "monitoring.window: give exactly one of 'rows' or 'minutes'"),
    ({"promotion": {"max_regression": -1}}, "promotion.max_regression: Input should be greater than or equal to 0"),
    ({"serving": {"max_batch_rows": "many"}}, "serving.max_batch_rows: Input should be a valid integer"),
    ({"retraining": {"triggers": ["weather"]}}, "retraining.triggers.0: Input should be"),
])
def test_bad_field_is_named_with_value_and_expectation(change, expected):
    with pytest.raises(SpecError) as info:
        parse_spec(MINIMAL | change)
    assert expected in str(info.value)


def test_unknown_field_lists_the_allowed_ones():
    with pytest.raises(SpecError) as info:
        parse_spec(MINIMAL | {"data": {"source": "d.csv", "target": "y", "taget": "z"}})
    assert "data.taget: unknown field 'taget'; expected one of: id, source, target, timestamp" in str(info.value)


def test_missing_required_fields_are_all_reported():
    with pytest.raises(SpecError) as info:
        parse_spec({"data": {}})
    problems = info.value.problems
    assert "name: required field is missing" in problems
    assert "data.source: required field is missing" in problems
    assert "data.target: required field is missing" in problems


def test_cross_field_rules():
    with pytest.raises(SpecError, match="by_time needs data.timestamp"):
        parse_spec(MINIMAL | {"evaluation": {"split": {"by_time": True}}})
    with pytest.raises(SpecError, match="features.numeric lists \\['y'\\]"):
        parse_spec(MINIMAL | {"features": {"numeric": ["y"]}})


def test_yaml_syntax_error_names_line(tmp_path: Path):
    (tmp_path / "everloop.yaml").write_text("name: x\ndata: [unclosed\n")
    with pytest.raises(SpecError, match=r"not valid YAML at line \d+, column \d+"):
        load_spec(tmp_path)


def test_missing_and_non_mapping_files(tmp_path: Path):
    with pytest.raises(SpecError, match="no project file here"):
        load_spec(tmp_path)
    (tmp_path / "everloop.yaml").write_text("- just\n- a list\n")
    with pytest.raises(SpecError, match="expected a mapping of settings at the top, got list"):
        load_spec(tmp_path)
    (tmp_path / "everloop.yaml").write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(SpecError, match="not UTF-8"):
        load_spec(tmp_path)
