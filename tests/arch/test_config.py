"""Model configs: defaults, vocab resolution, validation messages, FLOP formula."""

import pydantic
import pytest
from menagerie.arch import AttentionConfig, SwiGLUConfig, TransformerConfig


def ModelConfig(*, n_heads=4, n_kv_heads=None, head_dim=None, mlp_dim=None, **common):
    """The baseline transformer with its attention and SwiGLU sizes given flat."""
    mixer = AttentionConfig(n_heads=n_heads, n_kv_heads=n_kv_heads, head_dim=head_dim)
    return TransformerConfig(mixer=mixer, ffn=SwiGLUConfig(hidden_dim=mlp_dim), **common)


def test_defaults_resolve_llama_rules():
    cfg = TransformerConfig()
    assert cfg.mixer.kv_heads == 4 and cfg.mixer.dim_head(cfg) == 64 and cfg.mixer.q_per_kv == 1
    assert cfg.ffn.dim(cfg) == 768  # 8/3 * 256 = 682.7 -> 768
    wide = ModelConfig(d_model=512, n_heads=8)
    assert wide.ffn.dim(wide) == 1536
    assert ModelConfig(mlp_dim=100).ffn.dim(cfg) == 100


def test_every_field_has_a_description():
    for cls in (TransformerConfig, AttentionConfig, SwiGLUConfig):
        for name, field in cls.model_fields.items():
            assert field.description, (cls.__name__, name)


def test_with_vocab():
    assert ModelConfig().with_vocab(50257).vocab_size == 50304
    assert ModelConfig(vocab_multiple=1).with_vocab(50257).vocab_size == 50257
    assert ModelConfig(vocab_size=60000).with_vocab(50257).vocab_size == 60000
    with pytest.raises(ValueError, match="model.vocab_size=100 is smaller than the tokenizer"):
        ModelConfig(vocab_size=100).with_vocab(50257)
    with pytest.raises(ValueError, match="with_vocab"):
        ModelConfig().num_params()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (
            dict(n_heads=6),
            "model.mixer.n_heads=6 does not divide model.d_model=256; choose n_heads from "
            "1, 2, 4, 8",
        ),
        (dict(n_kv_heads=3), "model.mixer.n_kv_heads=3 does not divide model.mixer.n_heads=4"),
        (dict(head_dim=15), "head dim=15 is odd"),
        (dict(d_model=0), "model.d_model=0 must be a positive integer"),
        (dict(n_layers=-1), "model.n_layers=-1 must be a positive integer"),
        (dict(norm_eps=0.0), "model.norm_eps=0.0 must be positive"),
        (dict(dmodel=3), "Extra inputs are not permitted"),
        (dict(remat="some"), "'none', 'full' or 'dots'"),
    ],
)
def test_validation_messages(kwargs, message):
    with pytest.raises(pydantic.ValidationError) as err:
        ModelConfig(**kwargs)
    assert message in str(err.value)
    assert err.value.error_count() == 1


def test_head_dim_overrides_divisibility():
    cfg = ModelConfig(n_heads=6, head_dim=32)
    assert cfg.mixer.dim_head(cfg) == 32


def test_flops_per_token_hand_computed():
    cfg = ModelConfig(vocab_size=256, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, mlp_dim=128)
    # per layer: q 64*64 + k,v 2*64*32 + o 64*64 + SwiGLU 3*64*128 = 36864
    # matmul params: 2*36864 + LM head 64*256 = 90112 -> 6x = 540672
    # attention: 6 * 2 layers * 32 seq * 4 heads * 16 head_dim = 24576
    assert cfg.flops_per_token(32) == 540672 + 24576
    # tying does not change FLOPs
    assert cfg.model_copy(update={"tie_embeddings": False}).flops_per_token(32) == 565248


def test_num_params_hand_computed():
    cfg = ModelConfig(vocab_size=256, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, mlp_dim=128)
    body = 2 * (36864 + 2 * 64) + 64
    assert cfg.num_params(include_embeddings=False) == body
    assert cfg.num_params() == body + 256 * 64
    untied = cfg.model_copy(update={"tie_embeddings": False})
    assert untied.num_params() == body + 2 * 256 * 64
    assert untied.num_params(include_embeddings=False) == body
