"""The training run's sentencepiece tokenizer in the forms serving stacks load.

- Hugging Face: `tokenizer.json` (a `tokenizers` pipeline rebuilt from the model's own spec: its
  precompiled normalization table, whitespace rules, BPE merges ranked by piece score or the
  unigram scores, unknown and byte-fallback handling) + `tokenizer_config.json`, and the original
  `tokenizer.model`. `AutoTokenizer.from_pretrained` loads it.
- GGUF: the vocabulary, scores and token types (sentencepiece's type numbers are GGUF's).

Every export checks the rebuilt tokenizer against sentencepiece on a probe text and refuses, in
one line, a tokenizer whose ids differ (a model type or option this rebuild does not cover).
Text that spells a control token ("</s>") is where the two deliberately differ: Hugging Face
tokenizers match special tokens in text, sentencepiece never does.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import sentencepiece
from sentencepiece import sentencepiece_model_pb2 as pb

from megalm.errors import UserError

SPACE = "\u2581"
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
PROBE = ("The quick brown fox jumps over the lazy dog.  Numbers 12345 and 3.14; symbols #@%&* (a, b) [c] {d}\n"
         "  Leading spaces,\ttabs and\nnew lines. Caf\u00e9 na\u00efve \ufb01 \u2163 \uff46\uff55\uff4c\uff4c width "
         "\u6f22\u5b57 \u2211\u2211 end")


@dataclass
class SpmModel:
    blob: bytes
    pieces: list[str]
    scores: list[float]
    types: list[int]
    model_type: str  # "bpe" | "unigram" | ...
    bos_id: int
    eos_id: int
    unk_id: int
    pad_id: int

    @classmethod
    def parse(cls, blob: bytes, what: str) -> "SpmModel":
        proto = pb.ModelProto()
        try:
            proto.ParseFromString(blob)
        except Exception:
            raise UserError(f"{what}: not a sentencepiece model") from None
        kind = pb.TrainerSpec.ModelType.Name(proto.trainer_spec.model_type).lower()
        spec = proto.trainer_spec
        return cls(blob, [p.piece for p in proto.pieces], [p.score for p in proto.pieces],
                   [int(p.type) for p in proto.pieces], kind, spec.bos_id, spec.eos_id, spec.unk_id, spec.pad_id)

    def proto(self):
        proto = pb.ModelProto()
        proto.ParseFromString(self.blob)
        return proto

    def piece(self, idx: int) -> str | None:
        return self.pieces[idx] if 0 <= idx < len(self.pieces) else None


def _hf_backend(spm: SpmModel, what: str):
    # optional (installed with transformers, the export extra): only the HF tokenizer needs it
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

    proto = spm.proto()
    norm_spec, trainer = proto.normalizer_spec, proto.trainer_spec
    if spm.unk_id < 0:
        raise UserError(f"{what}: a sentencepiece model without an unknown piece cannot be rebuilt for Hugging Face")
    unk = spm.pieces[spm.unk_id]
    if spm.model_type == "bpe":
        vocab = {p: i for i, p in enumerate(spm.pieces)}
        merges = []
        for merged, idx in vocab.items():
            if spm.types[idx] != NORMAL:
                continue
            for cut in range(1, len(merged)):
                left, right = merged[:cut], merged[cut:]
                if left in vocab and right in vocab:
                    merges.append((-spm.scores[idx], vocab[left], vocab[right], left, right))
        merges.sort()
        model = models.BPE(vocab=vocab, merges=[(a, b) for *_, a, b in merges], unk_token=unk, fuse_unk=True,
                           byte_fallback=trainer.byte_fallback)
    elif spm.model_type == "unigram":
        model = models.Unigram(list(zip(spm.pieces, spm.scores)), spm.unk_id, trainer.byte_fallback)
    else:
        raise UserError(f"{what}: sentencepiece model type {spm.model_type!r} cannot be exported (bpe or unigram)")
    tok = Tokenizer(model)
    steps = []
    if norm_spec.precompiled_charsmap:
        steps.append(normalizers.Precompiled(norm_spec.precompiled_charsmap))
    if norm_spec.remove_extra_whitespaces:
        steps += [normalizers.Strip(left=True, right=True), normalizers.Replace(Regex(" {2,}"), " ")]
    if norm_spec.add_dummy_prefix:
        steps.append(normalizers.Prepend(SPACE))
    steps.append(normalizers.Replace(" ", SPACE))
    tok.normalizer = normalizers.Sequence(steps)
    if trainer.split_by_whitespace and spm.model_type == "bpe":
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement=SPACE, prepend_scheme="never", split=True)
    tok.decoder = decoders.Sequence([decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
                                    + ([decoders.Strip(content=" ", left=1)] if norm_spec.add_dummy_prefix else []))
    special = [p for p, t in zip(spm.pieces, spm.types) if t in (UNKNOWN, CONTROL, USER_DEFINED)]
    tok.add_special_tokens([AddedToken(p, special=True, normalized=False) for p in special])
    return tok


def write_hf_tokenizer(spm: SpmModel, out_dir: str, what: str, max_length: int,
                       chat_template: str | None = None) -> None:
    """tokenizer.json + tokenizer_config.json (with `chat_template`, a Jinja template, when given) +
    special_tokens_map.json + tokenizer.model into out_dir, after checking the rebuild encodes
    PROBE exactly like sentencepiece."""
    tok = _hf_backend(spm, what)
    want = sentencepiece.SentencePieceProcessor(model_proto=spm.blob).encode(PROBE)
    got = tok.encode(PROBE, add_special_tokens=False).ids
    if got != want:
        at = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
        raise UserError(f"{what}: tokenizer mismatch: the Hugging Face rebuild of this sentencepiece model gives "
                        f"other ids than sentencepiece on the probe text (first difference at token {at})")
    tok.save(os.path.join(out_dir, "tokenizer.json"))
    specials = {k: spm.piece(i) for k, i in (("bos_token", spm.bos_id), ("eos_token", spm.eos_id),
                                             ("unk_token", spm.unk_id), ("pad_token", spm.pad_id))
                if spm.piece(i) is not None}
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": max_length,
              "add_bos_token": False, "add_eos_token": False, "clean_up_tokenization_spaces": False, **specials}
    if chat_template is not None:
        config["chat_template"] = chat_template
    for name, data in (("tokenizer_config.json", config), ("special_tokens_map.json", specials)):
        with open(os.path.join(out_dir, name), "w") as f:
            json.dump(data, f, indent=2, ensure_ascii=False)
    with open(os.path.join(out_dir, "tokenizer.model"), "wb") as f:
        f.write(spm.blob)
