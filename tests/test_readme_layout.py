"""The README's layout section names every module of engine/ and service/ and every package folder."""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def layout_section() -> str:
    text = (REPO / "README.md").read_text()
    start = text.index("## Layout")
    return text[start : text.index("\n## ", start + 1)]


def test_every_module_and_package_of_engine_and_service_is_in_the_layout() -> None:
    layout = layout_section()
    missing = [
        path.relative_to(REPO).as_posix()
        for package in ("engine", "service")
        for path in sorted((REPO / package).rglob("*.py"))
        if path.name != "__init__.py" and path.name not in layout
    ]
    folders = {p.parent.relative_to(REPO).as_posix() for p in (REPO / "engine").rglob("__init__.py")}
    missing += [f for f in sorted(folders) if f.rsplit("/", 1)[-1] + "/" not in layout]
    assert not missing, f"README.md's layout section does not mention {missing}: add a line for each"
