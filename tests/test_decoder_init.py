"""A caption decoder started from a checkpoint's text tower and fusion encoder
(`finetune.decoder_init`): it computes what they computed, and a bad fit is one clear error."""

import pytest
import torch
from conftest import ROOT, run_overrides
from safetensors.torch import save_file

from vlpt.cli import main
from vlpt.models import WeightsError, build_model
from vlpt.models.decoder import CaptionDecoder, DecoderConfig
from vlpt.models.decoder_init import decoder_state_from_towers
from vlpt.train.checkpoint import load_trained_model
from vlpt.train.finetune import describe_init, load_init_weights

MICRO_MASKED = str(ROOT / "tests/fixtures/micro-masked.json")  # text 2 blocks, fusion 1
MICRO_MASKED_CAPTION = str(ROOT / "tests/fixtures/micro-masked-caption.json")
MICRO_CAPTION = str(ROOT / "tests/fixtures/micro-caption.json")
CAPTION_CONFIG = str(ROOT / "configs/finetune/synthetic-caption-tiny.yaml")
HEADS = {"text": 2, "fusion": 2}
EOT = 49407


@pytest.fixture(scope="module")
def masked():
    """A micro masked model with every weight random (norms and biases included), so that a
    mapping that dropped or swapped a tensor would show."""
    torch.manual_seed(0)
    model = build_model(MICRO_MASKED).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.05)
    return model


@pytest.fixture
def masked_file(masked, tmp_path):
    file = tmp_path / "masked.safetensors"
    save_file({k: v.contiguous() for k, v in masked.state_dict().items()}, str(file))
    return file


def _tokens(batch: int = 3, length: int = 9) -> torch.Tensor:
    tokens = torch.randint(1, 40000, (batch, length))
    tokens[:, 0], tokens[:, -1] = 49406, EOT  # no padding: the end token is last
    return tokens


def _cfg(layers: int, mid_norm: int = 0, heads: int = 2) -> DecoderConfig:
    return DecoderConfig(layers=layers, width=64, heads=heads, visual_width=64, mid_norm=mid_norm)


def _decoder(state, source: str, layers: int, mid_norm: int = 0):
    """The decoder started from `state`, and the fresh one it was built on."""
    cfg = _cfg(layers, mid_norm)
    fresh = CaptionDecoder(cfg)
    decoder = CaptionDecoder(cfg)
    decoder.load_state_dict(
        decoder_state_from_towers(state, fresh.state_dict(), cfg, source, HEADS)
    )
    return decoder.eval(), fresh


def test_text_start_computes_the_text_towers_states(masked):
    decoder, fresh = _decoder(masked.state_dict(), "text", layers=2)
    tokens, visual = _tokens(), torch.randn(3, 17, 64)
    with torch.no_grad():
        _, states = masked.encode_text_with_states(tokens)
        hidden = decoder.ln_final(decoder.hidden_states(tokens, visual))
    # The new cross-attention adds nothing yet: the decoder is the (causal) text tower.
    torch.testing.assert_close(hidden, states, atol=1e-5, rtol=1e-4)
    assert torch.equal(decoder.token_embedding.weight, masked.text.token_embedding.weight)
    block = decoder.blocks[0].cross_attn
    assert not block.out.weight.any() and not block.out.bias.any()
    assert torch.equal(block.q.weight, fresh.blocks[0].cross_attn.q.weight)  # its own init


def test_fusion_start_computes_the_fusion_encoders_last_state(masked):
    decoder, _ = _decoder(masked.state_dict(), "fusion", layers=3, mid_norm=2)
    tokens, visual = _tokens(), torch.randn(3, 17, 64)
    with torch.no_grad():
        fused = masked.fuse(tokens, visual)  # (B, L, W), bidirectional self-attention
        hidden = decoder.ln_final(decoder.hidden_states(tokens, visual))
    # With one fusion block the last word sees every word either way: there the causal
    # decoder computes what the encoder did (a second block would read changed earlier states).
    torch.testing.assert_close(hidden[:, -1], fused[:, -1], atol=1e-5, rtol=1e-4)
    # Earlier words no longer see the words after them.
    assert not torch.allclose(hidden[:, 1], fused[:, 1], atol=1e-3)
    # The cached path (generation) goes through the middle norm too, pre-filled or step by step.
    cache = decoder.init_cache(visual, max_length=tokens.shape[1])
    with torch.no_grad():
        chunks = [decoder.step(tokens[:, :4], cache)]
        chunks += [decoder.step(tokens[:, i : i + 1], cache) for i in range(4, 9)]
        full = decoder(tokens, visual)
    torch.testing.assert_close(torch.cat(chunks, 1), full, atol=1e-4, rtol=1e-4)


def test_a_decoder_without_middle_norm_has_the_state_dict_of_before():
    keys = CaptionDecoder(_cfg(2)).state_dict().keys()
    assert not any(k.startswith("ln_mid") for k in keys)  # older checkpoints load unchanged
    assert "ln_mid.weight" in CaptionDecoder(_cfg(3, mid_norm=2)).state_dict()
    with pytest.raises(ValueError, match=r"mid_norm \(3\) must lie in \[0, layers\)"):
        _cfg(3, mid_norm=3)


@pytest.mark.parametrize(
    ("source", "layers", "mid_norm", "heads", "message"),
    [
        ("fusion", 2, 0, 2, r"1 fusion blocks needs 3 blocks and mid_norm 2 .*has 2 and 0"),
        ("fusion", 3, 1, 2, r"needs 3 blocks and mid_norm 2"),
        ("text", 3, 0, 2, r"2 text blocks needs 2 blocks and mid_norm 0"),
        ("fusion", 3, 2, 4, r"text blocks have 2 attention heads; the decoder has 4"),
        ("bert", 2, 0, 2, r"must be one of text, fusion"),
    ],
)
def test_a_decoder_of_another_shape_is_one_sentence(
    masked, source, layers, mid_norm, heads, message
):
    cfg = _cfg(layers, mid_norm, heads)
    with pytest.raises(ValueError, match=message):
        decoder_state_from_towers(
            masked.state_dict(), CaptionDecoder(cfg).state_dict(), cfg, source, HEADS
        )


def test_missing_towers_other_widths_and_unused_tensors_are_named(masked):
    state = masked.state_dict()
    cfg = _cfg(3, mid_norm=2)
    own = CaptionDecoder(cfg).state_dict()

    def build(state, cfg=cfg, own=own):
        return decoder_state_from_towers(state, own, cfg, "fusion", HEADS)

    no_fusion = {k: v for k, v in state.items() if not k.startswith("fusion.")}
    with pytest.raises(ValueError, match="no fusion encoder.*decoder_init=text.*tiny-conv-caption"):
        build(no_fusion)
    bare = {**state, "fusion.positional_embedding": torch.zeros(40, 64)}  # text_states: false
    with pytest.raises(ValueError, match=r"text_states: false.*decoder_init=text"):
        build(bare)
    with pytest.raises(ValueError, match="no text tower"):
        build({k: v for k, v in state.items() if not k.startswith("text.")})
    scaled = {**state, "text.transformer.resblocks.1.ls_1.gamma": torch.ones(64)}  # layer scale
    with pytest.raises(ValueError, match=r"no place for \(text.transformer.resblocks.1.ls_1"):
        build(scaled)
    wide = DecoderConfig(layers=3, width=128, heads=2, visual_width=64, mid_norm=2)
    with pytest.raises(ValueError, match="text.token_embedding.weight' has shape"):
        build(state, wide, CaptionDecoder(wide).state_dict())


def test_finetune_init_builds_the_decoder_only_when_the_checkpoint_has_none(
    masked, masked_file, tmp_path
):
    model = build_model(MICRO_MASKED_CAPTION)
    report = load_init_weights(model, masked_file, "fusion")
    # The fusion encoder went into the decoder: not "ignored", and the decoder is not fresh.
    assert report.fresh == [] and report.ignored == ["mae_decoder"]
    assert "caption decoder built from its text tower and fusion encoder" in describe_init(
        str(masked_file), report
    )
    fusion_kv = masked.fusion.blocks[0].cross_attn.kv.weight
    assert torch.equal(model.decoder.blocks[2].cross_attn.kv.weight, fusion_kv)
    assert torch.equal(model.decoder.ln_mid.weight, masked.text.ln_final.weight)

    plain = build_model(MICRO_MASKED_CAPTION)  # without decoder_init: a fresh decoder
    assert load_init_weights(plain, masked_file).fresh == ["decoder"]
    assert torch.equal(plain.decoder.ln_mid.weight, torch.ones(64))

    # A checkpoint with a decoder (a caption run) keeps its own.
    caption_file = tmp_path / "caption.safetensors"
    save_file({k: v.contiguous() for k, v in plain.state_dict().items()}, str(caption_file))
    again = build_model(MICRO_MASKED_CAPTION)
    assert load_init_weights(again, caption_file, "fusion").derived == ""
    assert torch.equal(again.decoder.blocks[2].mlp_fc.weight, plain.decoder.blocks[2].mlp_fc.weight)


def test_finetune_init_errors_name_the_problem(masked_file, tmp_path):
    with pytest.raises(WeightsError, match="needs a model with a caption decoder"):
        load_init_weights(build_model(MICRO_MASKED), masked_file, "text")
    with pytest.raises(WeightsError, match=r"masked.safetensors': a decoder started from"):
        load_init_weights(build_model(MICRO_CAPTION), masked_file, "fusion")  # 1 block, not 3
    # A one-block caption run's decoder into a three-block one: not a silent partial load.
    shallow = tmp_path / "shallow.safetensors"
    state = build_model(MICRO_CAPTION).state_dict()
    save_file({k: v.contiguous() for k, v in state.items()}, str(shallow))
    with pytest.raises(WeightsError, match=r"only part of the model's 'decoder'.*decoder.blocks.1"):
        load_init_weights(build_model(MICRO_MASKED_CAPTION), shallow, "fusion")


def _caption_args(world, out, init, *extra):
    return run_overrides(
        world,
        out,
        f"init={init}",
        f"model.name={MICRO_MASKED_CAPTION}",
        "train.max_steps=2",
        "train.batch_size=16",
        "eval.max_items=10",
        "data.test=[]",
        *extra,
    )


def test_vlpt_finetune_starts_the_decoder_from_a_masked_checkpoint(
    masked_file, synth_world, tmp_path, capsys
):
    out = tmp_path / "caption"
    assert main(["finetune", CAPTION_CONFIG, *_caption_args(synth_world, out, masked_file)]) == 0
    printed = capsys.readouterr().out
    assert "caption decoder built from its text tower and fusion encoder" in printed
    assert "freshly initialised" not in printed
    model, cfg = load_trained_model(out)
    assert cfg.finetune.decoder_init == "fusion" and model.decoder.cfg.mid_norm == 2


def test_vlpt_finetune_from_a_contrastive_checkpoint_says_what_to_override(
    masked, synth_world, tmp_path, capsys
):
    contrastive = tmp_path / "contrastive.safetensors"  # no fusion encoder
    state = {k: v for k, v in masked.state_dict().items() if not k.startswith("fusion.")}
    save_file({k: v.contiguous() for k, v in state.items()}, str(contrastive))
    args = _caption_args(synth_world, tmp_path / "caption", contrastive)
    assert main(["finetune", CAPTION_CONFIG, *args]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "no fusion encoder" in error[0]
    assert "model.name=tiny-conv-caption finetune.decoder_init=" in error[0]
