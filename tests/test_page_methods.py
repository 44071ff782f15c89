"""The web page offers every explanation method the API accepts, each with a readable name:
its checkboxes and labels are written by hand (service/static/), so a new Method must be
added there too — this catches the one that was not."""

from __future__ import annotations

import re
from pathlib import Path

from lantern.core.jobs import Method

STATIC = Path(__file__).resolve().parent.parent / "service" / "static"


def test_every_method_has_a_checkbox_and_a_name_on_the_page() -> None:
    html = (STATIC / "index.html").read_text()
    boxes = set(re.findall(r'name="methods" value="([a-z_]+)"', html))
    assert boxes == {m.value for m in Method}
    script = (STATIC / "app.js").read_text()
    names = re.search(r"const METHOD_NAMES = \{(.*?)\};", script, flags=re.S)
    assert names is not None
    named = set(re.findall(r"^\s*([a-z_]+):", names.group(1), flags=re.M))
    assert named == {m.value for m in Method}
