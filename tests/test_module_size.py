"""No module over 500 lines (DESIGN.md): the package, its tests and benchmarks."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LIMIT = 500
TREES = ("voice_agent", "tests", "benchmarks")


def too_long(root: Path = ROOT, limit: int = LIMIT) -> list[str]:
    """'path: N lines' for every .py file under the trees that has more than `limit`."""
    out = []
    for tree in TREES:
        for path in sorted((root / tree).rglob("*.py")):
            if "__pycache__" in path.parts:
                continue
            with path.open("rb") as f:
                lines = sum(1 for _ in f)
            if lines > limit:
                out.append(f"{path.relative_to(root)}: {lines} lines")
    return out


def test_no_module_over_500_lines() -> None:
    long = too_long()
    assert not long, f"modules over {LIMIT} lines (split them by job):\n" + "\n".join(long)


def test_the_count_can_fail(tmp_path: Path) -> None:
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "big.py").write_text("x = 1\n" * (LIMIT + 1))
    (tmp_path / "tests" / "ok.py").write_text("x = 1\n" * LIMIT)
    assert too_long(tmp_path) == [f"tests/big.py: {LIMIT + 1} lines"]
