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


def _tokens(batch: int = 3, length: int = 9) -> torch.Tensor:
    tokens = torch.randint(1, 40000, (batch, length))
    tokens[:, 0], tokens[:, -1] = 49406, EOT  # no padding: the end token is last
    return tokens


def _decoder(state, source: str, layers: int, mid_norm: int = 0) -> CaptionDecoder:
    cfg = DecoderConfig(layers=layers, width=64, heads=2, visual_width=64, mid_norm=mid_norm)
    decoder = CaptionDecoder(cfg)
    decoder.load_state_dict(decoder_state_from_towers(state, decoder.state_dict(), cfg, source))
    return decoder.eval()


def test_text_start_computes_the_text_towers_states(masked):
    decoder = _decoder(masked.state_dict(), "text", layers=2)
    tokens, visual = _tokens(), torch.randn(3, 17, 64)
    with torch.no_grad():
        _, states = masked.encode_text_with_states(tokens)
        hidden = decoder.ln_final(decoder.hidden_states(tokens, visual))
    # The new cross-attention adds nothing yet: the decoder is the (causal) text tower.
    torch.testing.assert_close(hidden, states, atol=1e-5, rtol=1e-4)
    assert torch.equal(decoder.token_embedding.weight, masked.text.token_embedding.weight)
    assert decoder.blocks[0].cross_attn.out.weight.abs().sum() == 0
    assert decoder.blocks[0].cross_attn.q.weight.abs().sum() > 0  # its own init, trainable


def test_fusion_start_computes_the_fusion_encoders_last_state(masked):
    decoder = _decoder(masked.state_dict(), "fusion", layers=3, mid_norm=2)
    tokens, visual = _tokens(), torch.randn(3, 17, 64)
    with torch.no_grad():
        fused = masked.fuse(tokens, visual)  # (B, L, W), bidirectional self-attention
        hidden = decoder.ln_final(decoder.hidden_states(tokens, visual))
    # The last word sees every word either way: there the causal decoder equals the encoder.
    torch.testing.assert_close(hidden[:, -1], fused[:, -1], atol=1e-5, rtol=1e-4)
    # Earlier words no longer see the words after them.
    assert not torch.allclose(hidden[:, 1], fused[:, 1], atol=1e-3)
    # The cached path (generation) goes through the middle norm too.
    cache = decoder.init_cache(visual, max_length=tokens.shape[1])
    with torch.no_grad():
        stepped = torch.cat([decoder.step(tokens[:, i : i + 1], cache) for i in range(9)], 1)
        full = decoder(tokens, visual)
    torch.testing.assert_close(stepped, full, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(
    ("source", "layers", "mid_norm", "message"),
    [
        ("fusion", 2, 0, r"needs decoder_cfg.layers = 3 and mid_norm = 2"),
        ("fusion", 3, 1, r"needs decoder_cfg.layers = 3 and mid_norm = 2"),
        ("text", 3, 0, r"2 text blocks needs decoder_cfg.layers = 2 and mid_norm = 0"),
        ("bert", 2, 0, r"must be one of text, fusion"),
    ],
)
def test_a_decoder_of_another_depth_is_one_sentence(masked, source, layers, mid_norm, message):
    cfg = DecoderConfig(layers=layers, width=64, heads=2, visual_width=64, mid_norm=mid_norm)
    with pytest.raises(ValueError, match=message):
        decoder_state_from_towers(
            masked.state_dict(), CaptionDecoder(cfg).state_dict(), cfg, source
        )


def test_missing_towers_and_other_widths_are_named(masked):
    state = masked.state_dict()
    cfg = DecoderConfig(layers=3, width=64, heads=2, visual_width=64, mid_norm=2)
    own = CaptionDecoder(cfg).state_dict()
    no_fusion = {k: v for k, v in state.items() if not k.startswith("fusion.")}
    with pytest.raises(ValueError, match="no fusion encoder.*decoder_init: text"):
        decoder_state_from_towers(no_fusion, own, cfg, "fusion")
    no_text = {k: v for k, v in state.items() if not k.startswith("text.")}
    with pytest.raises(ValueError, match="no text tower"):
        decoder_state_from_towers(no_text, own, cfg, "fusion")
    wide = DecoderConfig(layers=3, width=128, heads=2, visual_width=64, mid_norm=2)
    with pytest.raises(ValueError, match="text.token_embedding.weight' has shape"):
        decoder_state_from_towers(state, CaptionDecoder(wide).state_dict(), wide, "fusion")


def test_finetune_init_builds_the_decoder_only_when_the_checkpoint_has_none(masked, tmp_path):
    file = tmp_path / "masked.safetensors"
    save_file({k: v.contiguous() for k, v in masked.state_dict().items()}, str(file))

    model = build_model(MICRO_MASKED_CAPTION)
    report = load_init_weights(model, file, "fusion")
    assert report.fresh == [] and report.ignored == ["fusion", "mae_decoder"]
    assert "caption decoder built from its text tower and fusion encoder" in describe_init(
        str(file), report
    )
    assert torch.equal(
        model.decoder.blocks[2].cross_attn.kv.weight, masked.fusion.blocks[0].cross_attn.kv.weight
    )
    assert torch.equal(model.decoder.ln_mid.weight, masked.text.ln_final.weight)

    plain = build_model(MICRO_MASKED_CAPTION)  # without decoder_init: a fresh decoder
    assert load_init_weights(plain, file).fresh == ["decoder"]
    assert not torch.equal(plain.decoder.ln_mid.weight, masked.text.ln_final.weight)

    # A checkpoint with a decoder (a caption run) keeps its own.
    caption_file = tmp_path / "caption.safetensors"
    state = {k: v.contiguous() for k, v in plain.state_dict().items()}
    save_file(state, str(caption_file))
    again = build_model(MICRO_MASKED_CAPTION)
    assert load_init_weights(again, caption_file, "fusion").derived == ""
    assert torch.equal(again.decoder.ln_mid.weight, plain.decoder.ln_mid.weight)


def test_finetune_init_errors_name_the_problem(masked, tmp_path):
    file = tmp_path / "masked.safetensors"
    save_file({k: v.contiguous() for k, v in masked.state_dict().items()}, str(file))
    with pytest.raises(WeightsError, match="needs a model with a caption decoder"):
        load_init_weights(build_model(MICRO_MASKED), file, "text")
    with pytest.raises(WeightsError, match=r"masked.safetensors': a decoder started from"):
        load_init_weights(build_model(MICRO_CAPTION), file, "fusion")  # 1 block, not 3


def test_vlpt_finetune_starts_the_decoder_from_a_masked_checkpoint(
    masked, synth_world, tmp_path, capsys
):
    init = tmp_path / "masked.safetensors"
    save_file({k: v.contiguous() for k, v in masked.state_dict().items()}, str(init))
    out = tmp_path / "caption"
    args = run_overrides(
        synth_world,
        out,
        f"init={init}",
        f"model.name={MICRO_MASKED_CAPTION}",
        "finetune.decoder_init=fusion",
        "train.max_steps=2",
        "train.batch_size=16",
        "eval.max_items=10",
        "data.test=[]",
    )
    assert (
        main(["finetune", str(ROOT / "configs/finetune/synthetic-caption-tiny.yaml"), *args]) == 0
    )
    printed = capsys.readouterr().out
    assert "caption decoder built from its text tower and fusion encoder" in printed
    assert "freshly initialised" not in printed
    model, cfg = load_trained_model(out)
    assert cfg.finetune.decoder_init == "fusion" and model.decoder.cfg.mid_norm == 2
