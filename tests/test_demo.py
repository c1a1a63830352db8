"""`make demo`'s main job on two samples: both runs recorded as incremental with their thread count, and a
report whose heatmaps include the rise maps."""
import json

from occbench import demo


def test_demo_main_job_on_two_samples(tmp_path):
    index = demo.main(["--limit", "2", "--workers", "1", "--out-runs", str(tmp_path / "runs"),
                       "--report", str(tmp_path / "report")])
    for protocol in demo.PROTOCOLS:
        config = json.loads((tmp_path / "runs" / f"pare-demo-{protocol}" / "run.json").read_text())
        assert config["threads"] == 1 and config["incremental"]["used"] is True
        assert config["n_samples"] == 2 and config["status"] == "complete"
    text = index.read_text()
    assert "rise over the clean error, averaged" in text and "occsens40-dense: colour ranges" in text
