"""docs/spec.md, the spec reference, is what the models make of it: every field of the spec
is described, the file is not stale, and its example is a valid spec."""

from __future__ import annotations

import re
from pathlib import Path

from podkit.system.k8s import iter_fields
from podkit.system.spec import Probe, parse_spec
from podkit.system.specdoc import REGENERATE, fields, reference

DOC = Path(__file__).resolve().parent.parent / "docs" / "spec.md"


def test_docs_spec_md_is_what_the_models_make() -> None:
    assert DOC.read_text(encoding="utf-8") == reference(), (
        f"docs/spec.md differs from the models: regenerate it with `{REGENERATE}`"
    )


def test_every_field_of_the_spec_is_described() -> None:
    described = {path: (info.description or "").strip() for path, info in fields()}
    paths = [*iter_fields(), *iter_fields(Probe, "probe.")]
    assert len(paths) > 40
    assert sorted(set(paths) - set(described)) == []  # the reference misses no field
    assert {"probe.http.path", "probe.tcp.port", "probe.exec.command"} <= set(described)
    assert sorted(p for p, text in described.items() if not text) == []


def test_the_example_in_the_reference_is_a_valid_spec() -> None:
    blocks = re.findall(r"^```yaml\n(.*?)^```$", DOC.read_text(encoding="utf-8"), re.M | re.S)
    assert blocks
    for block in blocks:
        spec = parse_spec(block, "docs/spec.md")
        assert spec.pods and spec.services


def test_every_link_in_the_reference_reaches_a_heading() -> None:
    text = reference()
    anchors = {
        re.sub(r"[^a-z0-9_ -]", "", h.lower()).replace(" ", "-")
        for h in re.findall(r"^#+ (.*)$", text, re.M)
    }
    links = set(re.findall(r"\]\(#([^)]*)\)", text))
    assert links and sorted(links - anchors) == []
