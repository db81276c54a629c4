"""The reproducibility study's driver: `--no_run` reports without decoding anything."""
import json

from benchmarks import repro_study


def test_no_run_writes_the_report_without_starting_a_configuration(tmp_path, monkeypatch):
  def refuse(*args, **kwargs):
    raise AssertionError("--no_run started a configuration")

  monkeypatch.setattr(repro_study, "run_config", refuse)
  monkeypatch.setattr(repro_study, "load_model", refuse)
  out = tmp_path / "study.json"
  result = repro_study.main(["--no_run", "--problems", "2", "--devices", "1",
                             "--batch_sizes", "1", "--out", str(out), "--readme", ""])
  assert result["missing"] == 3 and not result["complete"]
  assert json.loads(out.read_text())["missing_configs"] == ["bf16/b1/d1", "fp32/b1/d1",
                                                            "layercast/b1/d1"]
