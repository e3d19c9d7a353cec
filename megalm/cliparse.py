"""The argument parser every `megalm <verb>` uses.

Two rules for all verbs, so no verb is the odd one out:
- options may stand anywhere among the positionals (`megalm train cfg.yaml --resume none a=1 b=2`),
  as torchrun, Megatron and torchtitan accept: `parse_args` is argparse's intermixed parsing;
- a usage error is one `error:` line and exit status 2 through the CLI's UserError path, never a
  usage dump followed by a traceback.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import NoReturn

from megalm.errors import UserError


class Parser(argparse.ArgumentParser):
    def parse_args(self, args: Sequence[str] | None = None,  # type: ignore[override]
                   namespace: argparse.Namespace | None = None) -> argparse.Namespace:
        return self.parse_intermixed_args(args, namespace)

    def error(self, message: str) -> NoReturn:
        raise UserError(f"{self.prog}: {message} (see {self.prog} --help)")
