"""`megalm ops build [--arch "8.0;9.0+PTX"] [--jit] [--strict]` and `megalm ops report`."""

from __future__ import annotations

from megalm.errors import UserError
from megalm.ops import build, report

USAGE = """usage: megalm ops <command> [args]

commands:
  build [--arch "8.0;9.0+PTX"] [--jit] [--strict]
                                     compile the fused CUDA ops ahead of time (cached), then
                                     self-test them on the visible GPU (--strict: exit 1 on a
                                     failed kernel)
  report                             per kernel: built, arch, self-test result, path in use"""


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0
    cmd, rest = argv[0], argv[1:]
    if cmd == "build":
        return build.main(rest)
    if cmd == "report":
        return report.main(rest)
    raise UserError(f"megalm ops {cmd}: unknown command; expected 'build' or 'report'")
