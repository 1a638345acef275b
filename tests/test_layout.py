"""Source files stay one idea each: none is longer than about 600 lines unless its first lines say why it
must be one file (DESIGN.md; the limit the one-door-per-job redesign set)."""

from __future__ import annotations

from pathlib import Path

import ditq

SRC = Path(ditq.__file__).parent
LIMIT = 620  # "about 600"
REASON = "one file because"  # the words a long file's opening comment or docstring must hold


def test_no_source_file_is_longer_than_about_600_lines():
    long = []
    for path in sorted(p for p in SRC.rglob("*") if p.suffix in (".py", ".cpp", ".h")):
        lines = path.read_text().splitlines()
        if len(lines) > LIMIT and REASON not in "\n".join(lines[:20]).lower():
            long.append(f"{path.relative_to(SRC.parent)}: {len(lines)} lines")
    assert not long, "split these along their seams, or say at their top why not:\n" + "\n".join(long)
