"""Print, one per line, the shell commands of the README's Quickstart: its set-up block and its test command.

CI's README leg runs exactly these on a fresh clone in a fresh venv (issue 23), so a README edit that changes
what a newcomer runs changes what CI runs; nothing else is installed.
"""

import pathlib
import re
import sys

readme = pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else "README.md").read_text(encoding="utf-8")
quickstart = readme.split("## Quickstart", 1)[1].split("\n## ", 1)[0]
blocks = re.findall(r"```bash\n(.*?)```", quickstart, re.S)
commands = [line.split("#", 1)[0].strip() for block in blocks for line in block.splitlines()]
setup = [c for c in commands if c.startswith("pip install")]
tests = [c for c in commands if c.startswith("python -m pytest")]
if not setup or len(tests) != 1:
    sys.exit(f"README Quickstart: expected pip install lines and one 'python -m pytest' line, found {commands}")
print("\n".join(setup + tests))
