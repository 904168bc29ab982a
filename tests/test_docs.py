"""The README documents every setting and every metric the code defines."""

import re
from pathlib import Path

from services import metrics
from services.config import setting_fields

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()


def test_every_setting_is_in_the_readme():
    missing = [f.name for _, f in setting_fields() if f"`{f.name}`" not in README]
    assert not missing, f"settings missing from README: {missing}"


def test_every_metric_is_in_the_readme():
    source = Path(metrics.__file__).read_text()
    names = set(re.findall(r'"(promptrec_[a-z_]+)"', source))
    assert len(names) >= 10
    missing = sorted(n for n in names if f"`{n}`" not in README)
    assert not missing, f"metrics missing from README: {missing}"
