"""`megalm export --format gguf` read back with the gguf package's own GGUFReader: every tensor
compared with megalm's weights (q/k rows in llama.cpp's interleaved RoPE order, checked by the
attention scores they produce), the llama metadata, and the tokenizer."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from megalm.models.load import load_model, load_tokenizer
from megalm.cli import main as megalm_main
from megalm.ops import apply_rope, rope_cos_sin


@pytest.fixture(scope="module")
def exported(trained, tmp_path_factory):
    from gguf import GGUFReader

    out = tmp_path_factory.mktemp("gguf") / "zero3"
    assert megalm_main(["export", trained["zero3"], "--format", "gguf", "--out", str(out), "--dtype", "fp16"]) == 0
    model, meta = load_model(trained["zero3"])
    return GGUFReader(str(out / "model.gguf")), model, meta


def rope_interleaved(x: torch.Tensor, pos: torch.Tensor, theta: float) -> torch.Tensor:
    """llama.cpp's llama RoPE: rotates pairs (x[2i], x[2i+1]) by pos * theta^(-2i/D). x [T, H, D]."""
    d = x.shape[-1]
    freq = theta ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    ang = pos[:, None].double() * freq[None]
    cos, sin = ang.cos()[:, None, :], ang.sin()[:, None, :]
    a, b = x[..., 0::2].double(), x[..., 1::2].double()
    return torch.stack([a * cos - b * sin, a * sin + b * cos], dim=-1).flatten(-2)


def test_metadata_and_tokenizer(exported):
    reader, model, meta = exported
    cfg = model.config
    field = lambda k: reader.fields[k].contents()  # noqa: E731
    assert field("general.architecture") == "llama"
    assert (field("llama.block_count"), field("llama.embedding_length"), field("llama.feed_forward_length")) == \
        (cfg.n_layers, cfg.dim, cfg.ffn_hidden)
    assert (field("llama.attention.head_count"), field("llama.attention.head_count_kv")) == (cfg.n_heads, cfg.n_kv_heads)
    assert field("llama.context_length") == cfg.max_seq_len and field("llama.rope.freq_base") == cfg.rope_theta
    assert field("llama.attention.layer_norm_rms_epsilon") == pytest.approx(cfg.norm_eps)
    sp = load_tokenizer(meta)
    assert field("tokenizer.ggml.model") == "llama"
    assert field("tokenizer.ggml.tokens") == [sp.id_to_piece(i) for i in range(sp.vocab_size())]
    assert field("tokenizer.ggml.scores") == pytest.approx([sp.get_score(i) for i in range(sp.vocab_size())])
    assert field("tokenizer.ggml.eos_token_id") == sp.eos_id() and field("tokenizer.ggml.bos_token_id") == sp.bos_id()


def test_every_tensor_read_back(exported):
    from gguf import GGMLQuantizationType

    reader, model, _ = exported
    cfg, state = model.config, model.state_dict()
    got = {t.name: t for t in reader.tensors}
    names = {"token_embd.weight": "tok_embeddings.weight", "output_norm.weight": "norm.weight",
             "output.weight": "output.weight"}
    for i in range(cfg.n_layers):
        for gg, mg in (("attn_norm", "attention_norm"), ("attn_v", "attention.wv"), ("attn_output", "attention.wo"),
                       ("ffn_norm", "ffn_norm"), ("ffn_gate", "feed_forward.w1"), ("ffn_up", "feed_forward.w3"),
                       ("ffn_down", "feed_forward.w2")):
            names[f"blk.{i}.{gg}.weight"] = f"layers.{i}.{mg}.weight"
    assert set(got) == set(names) | {f"blk.{i}.attn_{x}.weight" for i in range(cfg.n_layers) for x in "qk"}
    for gg, mg in names.items():
        t = got[gg]
        want = state[mg].numpy()
        assert t.tensor_type == (GGMLQuantizationType.F32 if want.ndim == 1 else GGMLQuantizationType.F16), gg
        assert np.array_equal(np.asarray(t.data), want.astype(np.asarray(t.data).dtype)), gg

    # q/k: llama.cpp's interleaved rotation of the exported rows gives megalm's attention scores.
    torch.manual_seed(0)
    T, pos = 7, torch.arange(7)
    x = torch.randn(T, cfg.dim, dtype=torch.float64)
    for i in range(cfg.n_layers):
        wq, wk = (torch.tensor(np.array(got[f"blk.{i}.attn_{n}.weight"].data)).double() for n in "qk")
        assert wq.shape == state[f"layers.{i}.attention.wq.weight"].shape
        q_g = rope_interleaved((x @ wq.T).view(T, cfg.n_heads, -1), pos, cfg.rope_theta)
        k_g = rope_interleaved((x @ wk.T).view(T, cfg.n_kv_heads, -1), pos, cfg.rope_theta)
        # The fp16 file's weights, in megalm's layout.
        mq, mk = (state[f"layers.{i}.attention.w{n}.weight"].half().double() for n in "qk")
        cos, sin = rope_cos_sin(pos[None], cfg.head_dim, cfg.rope_theta, dtype=torch.float64)
        q_m, k_m = apply_rope((x @ mq.T).view(1, T, cfg.n_heads, -1), (x @ mk.T).view(1, T, cfg.n_kv_heads, -1),
                              cos, sin)
        rep = cfg.n_heads // cfg.n_kv_heads
        scores_g = torch.einsum("thd,shd->hts", q_g, k_g.repeat_interleave(rep, 1))
        scores_m = torch.einsum("thd,shd->hts", q_m[0], k_m[0].repeat_interleave(rep, 1))
        assert (scores_g - scores_m).abs().max() < 1e-6 * scores_m.abs().max()
