"""Print the command README.md marks for CI: ``python3 .ci/readme_command.py demo|test``.

README's "The two commands" section puts ``<!-- ci: NAME ... -->`` right before
each ```bash block; .ci/run runs what this prints, so CI runs README's
commands as written and they cannot drift apart. Exits 1, saying why, when the
marker is missing, repeated, or not followed by a one-line ```bash block.
"""

from __future__ import annotations

import pathlib
import re
import sys

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"


def readme_command(name: str, text: str) -> str:
    """The one-line command in the ```bash block right after ``<!-- ci: NAME ...-->``."""
    pattern = re.compile(r"<!-- ci: " + re.escape(name) + r"\b[^>]*-->\n```bash\n([^\n]+)\n```")
    found = pattern.findall(text)
    if len(found) != 1:
        raise ValueError(f"README.md: expected one `<!-- ci: {name} -->` marker followed by a one-line "
                         f"```bash block, found {len(found)}")
    return found[0].strip()


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__.splitlines()[0], file=sys.stderr)
        return 2
    try:
        print(readme_command(argv[0], README.read_text()))
    except ValueError as exc:
        print(exc, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
