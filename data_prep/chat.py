"""Chat template and loss mask for instruction data (`megalm prep --sft`).

An example is a list of (role, content) turns. The template wraps each turn in literal
strings (role prefix + content + role suffix) and ends every assistant turn with the
tokenizer's EOS id. The text between two EOS ids is rendered whole and tokenized in ONE
sentencepiece call (never piece by piece, which would add a dummy-prefix "▁" at every seam), and
each token's byte span in that text decides its mask: a token is trained when it overlaps an
assistant turn's content or suffix; the EOS closing an assistant turn is trained; prompt and
template tokens are not.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any

from megalm.config import Section, build, read_yaml
from megalm.errors import UserError

ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class ChatTemplate(Section):
    """Literal strings around each turn; `--chat-template FILE.yaml` overrides any of them."""

    system_prefix: str = "<|system|>\n"
    system_suffix: str = "\n"
    user_prefix: str = "<|user|>\n"
    user_suffix: str = "\n"
    assistant_prefix: str = "<|assistant|>\n"
    assistant_suffix: str = ""

    @classmethod
    def from_dict(cls, raw: Any, source: str) -> "ChatTemplate":
        return build(cls, raw, source)

    @classmethod
    def load(cls, path: str) -> "ChatTemplate":
        name = f"--chat-template {path}"
        return build(cls, read_yaml(path, "chat template", name=name), name)

    def to_dict(self) -> dict[str, str]:
        return dataclasses.asdict(self)

    def prompt(self, turns: list[tuple[str, str]]) -> str:
        """The text a model is given to answer after `turns` (no assistant content yet)."""
        return self.render(turns, "", add_generation_prompt=True)

    def render(self, turns: list[tuple[str, str]], eos_token: str, add_generation_prompt: bool = False) -> str:
        """The text of `turns` as training saw it: every assistant turn closed by the EOS token
        (written here as its piece text), then, on request, the prompt for the next answer."""
        text = "".join(self._wrap(r, c) + (eos_token if r == "assistant" else "") for r, c in turns)
        return text + (self.assistant_prefix if add_generation_prompt else "")

    def jinja(self) -> str:
        """render() as a Jinja chat template (Hugging Face's `chat_template`, whose renderer passes
        `messages`, `eos_token` and `add_generation_prompt`). The literal strings go in as quoted
        expressions, not template text, so Jinja's block trimming cannot eat their newlines."""
        def lit(text: str) -> str:
            return json.dumps(text)  # a JSON string is a valid Jinja string literal

        parts = ["{%- for m in messages -%}"]
        for i, role in enumerate(ROLES):
            cond = f"m['role'] == {lit(role)}"
            eos = " + eos_token" if role == "assistant" else ""
            parts.append(f"{{%- {'if' if i == 0 else 'elif'} {cond} -%}}"
                         f"{{{{ {lit(getattr(self, role + '_prefix'))} + m['content'] + "
                         f"{lit(getattr(self, role + '_suffix'))}{eos} }}}}")
        parts.append("{%- else -%}{{ raise_exception('role must be system, user or assistant') }}")
        parts.append("{%- endif -%}{%- endfor -%}")
        parts.append(f"{{%- if add_generation_prompt -%}}{{{{ {lit(self.assistant_prefix)} }}}}{{%- endif -%}}")
        return "".join(parts)

    def _wrap(self, role: str, content: str) -> str:
        return getattr(self, f"{role}_prefix") + content + getattr(self, f"{role}_suffix")


def parse_example(obj: Any, where: str) -> list[tuple[str, str]]:
    """A JSONL record -> turns. `where` is "file:line" for the one-line error."""
    if not isinstance(obj, dict):
        raise UserError(f"{where}: expected a JSON object with prompt/response or messages")
    if "messages" in obj:
        msgs = obj["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise UserError(f"{where}: messages: expected a non-empty list of {{role, content}}")
        turns = []
        for i, m in enumerate(msgs):
            if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
                raise UserError(f"{where}: messages[{i}]: expected {{\"role\": one of {', '.join(ROLES)}, "
                                f"\"content\": a string}}, got {str(m)[:80]}")
            turns.append((m["role"], m["content"]))
        if not any(r == "assistant" for r, _ in turns):
            raise UserError(f"{where}: messages: no assistant turn, so nothing to train on")
        return turns
    for key in ("prompt", "response"):
        if not isinstance(obj.get(key), str):
            raise UserError(f"{where}: {key}: expected a string (records are {{\"prompt\", \"response\"}} or "
                            f"{{\"messages\": [...]}}), got {obj.get(key)!r}"[:300])
    turns = [("user", obj["prompt"]), ("assistant", obj["response"])]
    if "system" in obj:
        if not isinstance(obj["system"], str):
            raise UserError(f"{where}: system: expected a string, got {obj['system']!r}"[:300])
        turns.insert(0, ("system", obj["system"]))
    return turns


def encode_example(sp: Any, template: ChatTemplate, turns: list[tuple[str, str]],
                   eos_id: int) -> tuple[list[int], list[int]]:
    """(token ids, loss mask) of one example; mask[i] = 1 when token i is a trained target."""
    ids: list[int] = []
    mask: list[int] = []
    text, spans = "", []  # the segment being built, and its trained (begin, end) byte spans

    def flush() -> None:
        for piece in sp.encode(text, return_type="proto").pieces:
            ids.append(piece.id)
            mask.append(int(any(piece.begin < e and b < piece.end for b, e in spans)))

    for role, content in turns:
        prefix = getattr(template, f"{role}_prefix")
        if role != "assistant":
            text += template._wrap(role, content)
            continue
        start = len((text + prefix).encode())
        text += prefix + content + template.assistant_suffix
        spans.append((start, len(text.encode())))
        flush()
        ids.append(eos_id)
        mask.append(1)
        text, spans = "", []
    # Turns after the last assistant turn are dropped: no trained token follows them.
    return ids, mask
