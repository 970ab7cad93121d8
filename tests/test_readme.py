"""README's demo table is what the demo printed, from a committed reference of its results.json."""
import json
import os
from dataclasses import asdict

from open_clip_safe import demo

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REFERENCE = os.path.join(REPO, "docs", "results", "demo-seed0.json")


def test_readme_demo_table_is_the_reference_runs():
    reference = json.load(open(REFERENCE))
    readme = open(os.path.join(REPO, "README.md")).read()
    assert demo.markdown_table(reference["rows"]) in readme, "README's demo table is not the reference's"
    assert f"commit {reference['commit']}" in readme and reference["date"] in readme
    assert reference["seed"] == 0


def test_the_reference_was_made_with_todays_demo_settings():
    reference = json.load(open(REFERENCE))
    assert reference["config"] == asdict(demo.DemoConfig()), "the demo's settings changed: run it again and commit " \
                                                             "its report/results.json as the reference"


def test_readme_stays_a_guide():
    assert len(open(os.path.join(REPO, "README.md")).read().splitlines()) <= 200
