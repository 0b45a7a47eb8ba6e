"""The built-in tiny test model: real moshi classes, random weights, fixed seed.

It exists so that the whole product (engine, media path, signaling, browser)
runs and is tested on a CPU with no model hub. It is built with moshi's own
`get_mimi` / `get_moshi_lm` from small config dicts, so it exercises exactly
the code that runs moshiko, only smaller. It babbles: nothing it says means
anything, and every report of it says so.

Three things a naive random model gets wrong, and this one does not:
- PyTorch's default init shrinks the signal at every layer of Mimi's SEANet,
  so a random decoder outputs a near-constant bias whatever codes it gets.
  Convolutions are re-drawn with He init (variance preserving) and the last
  one is scaled to give speech-like levels with no DC offset.
- Mimi's quantizer starts with all-zero codebooks, so every code would be 0
  and a test could not tell one input from another. The codebooks are fitted
  with moshi's own k-means initialisation on a synthetic calibration signal,
  so codes depend on the input.
- The text tokenizer is a real sentencepiece model, trained here in a few
  milliseconds on a built-in English text, so text pieces are readable words.

`write_tiny_checkpoint` writes the same model out in the layout of a Hugging
Face checkpoint (config.json, weights, Mimi weights, tokenizer), so the real
loading path can be tested on it.
"""

from __future__ import annotations

import copy
import functools
import io
import json
import math
from dataclasses import dataclass
from pathlib import Path

import sentencepiece
import torch
from moshi.models import loaders
from moshi.models.compression import MimiModel
from moshi.models.lm import LMModel
from safetensors.torch import save_file

TINY_MODEL_NAME = "moshi-webrtc-tiny"
TINY_PERSONA_MODEL_NAME = "moshi-webrtc-tiny-persona"
TINY_DEFAULT_SEED = 20241122


def random_weights_notice(name: str) -> str:
    """What logs and clients are told about a model with random weights."""
    return f"TEST MODEL: {name} has random weights. It babbles; nothing it says means anything."

TINY_MIMI_CONFIG: dict = {
    "sample_rate": 24000,
    "channels": 1,
    "frame_rate": 12.5,
    "seanet": {
        "channels": 1,
        "dimension": 64,
        "causal": True,
        "n_filters": 8,
        "n_residual_layers": 1,
        "activation": "ELU",
        "compress": 2,
        "dilation_base": 2,
        "disable_norm_outer_blocks": 0,
        "kernel_size": 7,
        "residual_kernel_size": 3,
        "last_kernel_size": 3,
        "norm": "none",
        "pad_mode": "constant",
        # Same hop as the real Mimi, so frames stay 1920 samples at 24 kHz.
        "ratios": [8, 6, 5, 4],
        "true_skip": True,
    },
    "quantizer": {"dimension": 32, "n_q": 8, "bins": 128, "input_dimension": 64, "output_dimension": 64},
    "transformer": {
        "d_model": 64,
        "num_heads": 4,
        "num_layers": 1,
        "causal": True,
        "layer_scale": 0.01,
        "context": 50,
        "conv_layout": True,
        "max_period": 10000,
        "gating": "none",
        "norm": "layer_norm",
        "positional_embedding": "rope",
        "dim_feedforward": 128,
        "input_dimension": 64,
        "output_dimensions": [64],
    },
}


def tiny_lm_config(text_card: int, persona: bool = False) -> dict:
    """LMModel kwargs for the tiny model: moshiko's layout (text + model + user streams), scaled down.

    `persona`: PersonaPlex's layout instead, where the depth transformer predicts the caller's
    codebooks too (n_q == dep_q) and its context covers half the depth steps, as in the 7B."""
    own = 4
    dep_q = 2 * own if persona else own
    return {
        "dim": 64,
        "text_card": text_card,
        "existing_text_padding_id": 3,
        "n_q": 2 * own,
        "dep_q": dep_q,
        "card": TINY_MIMI_CONFIG["quantizer"]["bins"],
        "num_heads": 4,
        "num_layers": 2,
        "hidden_scale": 2,
        "causal": True,
        "layer_scale": None,
        "context": 100,  # a bounded context is what lets the LM stream forever
        "max_period": 10000,
        "gating": "silu",
        "norm": "rms_norm_f32",
        "positional_embedding": "rope",
        "depformer_dim": 32,
        "depformer_dim_feedforward": 64,
        "depformer_num_heads": 2,
        "depformer_num_layers": 1,
        "depformer_layer_scale": None,
        "depformer_multi_linear": True,
        "depformer_context": own,
        "depformer_max_period": 10000,
        "depformer_gating": "silu",
        "depformer_pos_emb": "none",
        "depformer_weights_per_step": True,
        # text, then the model's audio codebooks, then the user's, as in moshiko.
        "delays": [0] + [0] + [1] * (own - 1) + [0] + [1] * (own - 1),
    }


_TOKENIZER_TEXT = """\
hello there, how are you doing today
I am a tiny test model and I only babble
this voice comes from random weights, not from a real conversation
the quick brown fox jumps over the lazy dog
we are talking through a web browser with very low latency
please speak clearly into the microphone and I will answer
the weather is nice today and the coffee is still warm
numbers like one two three four five six seven eight nine ten
music, science, history and long stories about the sea
can you hear me now? yes, I can hear you quite well
good morning, good evening, good night and see you later
where is the train station, which way to the market
thank you very much, you are welcome, no problem at all
let me think about that for a moment before I reply
"""


def build_tiny_tokenizer() -> bytes:
    """Train a small sentencepiece model; deterministic, about 20 ms. Ids 0-3 as in moshi's tokenizer."""
    buffer = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(_TOKENIZER_TEXT.splitlines() * 20),
        model_writer=buffer,
        vocab_size=200,
        hard_vocab_limit=False,
        model_type="unigram",
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=3,
        num_threads=1,
        minloglevel=2,
    )
    return buffer.getvalue()


def _calibration_audio(sample_rate: int, generator: torch.Generator) -> torch.Tensor:
    """Sweeps and noise at several levels: 256 frames to fit 128-entry codebooks, [16, 1, 1.28 s]."""
    t = torch.arange(16 * 1920) / sample_rate
    signals = []
    for k in range(16):
        base_hz = 80.0 * (1.25**k)
        level = 10 ** (-(k % 5) * 6 / 20) * 0.5
        sweep = level * torch.sin(2 * math.pi * base_hz * t * (1 + 0.3 * t))
        noise = 0.05 * (k % 3) * torch.randn(t.shape, generator=generator)
        signals.append(sweep + noise)
    return torch.stack(signals)[:, None, :]


def _device_of(module: torch.nn.Module) -> torch.device:
    return next(module.parameters()).device


def fit_codebooks(mimi: MimiModel, generator: torch.Generator) -> None:
    """Give a random Mimi usable codebooks with moshi's own k-means initialisation.

    moshi's residual quantizer initialises one more level per training forward
    pass, so the calibration latents go through it once per active codebook
    (encoded once: the encoder is deterministic, and a real-size one is slow).
    """
    audio = _calibration_audio(mimi.sample_rate, generator).to(_device_of(mimi))
    mimi.quantizer.train()
    with torch.no_grad():
        latent = mimi.encode_to_latent(audio, quantize=False)
        for _ in range(mimi.num_codebooks):
            mimi.quantizer(latent, mimi.frame_rate)
    mimi.eval()


def he_init_convolutions(mimi: MimiModel) -> None:
    """Variance-preserving weights and zero biases, so audio and codes depend on their input."""
    with torch.no_grad():
        for module in mimi.modules():
            if isinstance(module, torch.nn.Conv1d):
                torch.nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
            elif isinstance(module, torch.nn.ConvTranspose1d):
                fan_in = module.in_channels * module.kernel_size[0] / module.stride[0]
                torch.nn.init.normal_(module.weight, std=math.sqrt(2 / fan_in))
            else:
                continue
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)


def level_decoder_output(mimi: MimiModel, generator: torch.Generator, target_rms: float = 0.1) -> None:
    """Scale the decoder's last convolution so decoded calibration audio has `target_rms` and no DC."""
    last = [m for m in mimi.decoder.modules() if isinstance(m, torch.nn.Conv1d)][-1]
    with torch.no_grad():
        decoded = mimi.decode(mimi.encode(_calibration_audio(mimi.sample_rate, generator).to(_device_of(mimi))))
        scale = target_rms / float(decoded.std())
        last.weight.mul_(scale)
        last.bias.mul_(scale).sub_(float(decoded.mean()) * scale)


@dataclass
class TinyModel:
    mimi: MimiModel
    lm: LMModel
    tokenizer_proto: bytes
    lm_config: dict

    def text_tokenizer(self) -> sentencepiece.SentencePieceProcessor:
        return sentencepiece.SentencePieceProcessor(model_proto=self.tokenizer_proto)


def build_tiny_model(
    seed: int = TINY_DEFAULT_SEED, device: str | torch.device = "cpu", persona: bool = False
) -> TinyModel:
    """The tiny model in memory, a fresh copy each time. The same seed always gives the same weights.
    `persona`: the PersonaPlex layout (see `tiny_lm_config`), same Mimi and tokenizer."""
    template = _tiny_template(seed, persona)
    return TinyModel(
        copy.deepcopy(template.mimi).to(device),
        copy.deepcopy(template.lm).to(device),
        template.tokenizer_proto,
        dict(template.lm_config),
    )


@functools.lru_cache(maxsize=4)
def _tiny_template(seed: int, persona: bool = False) -> TinyModel:
    """Building takes about a second (codebook fitting); tests build many engines, so keep one per seed."""
    tokenizer_proto = build_tiny_tokenizer()
    text_card = sentencepiece.SentencePieceProcessor(model_proto=tokenizer_proto).vocab_size()
    lm_config = tiny_lm_config(text_card, persona)
    num_codebooks = max(lm_config["dep_q"], lm_config["n_q"] - lm_config["dep_q"])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        mimi = loaders.get_mimi(None, TINY_MIMI_CONFIG, device="cpu", num_codebooks=num_codebooks)
        he_init_convolutions(mimi)
        fit_codebooks(mimi, torch.Generator().manual_seed(seed))
        level_decoder_output(mimi, torch.Generator().manual_seed(seed + 1))
        lm = loaders.get_moshi_lm(None, lm_kwargs=lm_config, device="cpu", dtype=torch.float32)
    return TinyModel(mimi, lm, tokenizer_proto, lm_config)


TINY_FILES = {
    "moshi_name": "model.safetensors",
    "mimi_name": "mimi.safetensors",
    "mimi_config_name": "mimi_config.json",
    "tokenizer_name": "tokenizer.model",
}


def write_tiny_checkpoint(directory: str | Path, seed: int = TINY_DEFAULT_SEED, persona: bool = False) -> Path:
    """Write the tiny model as a checkpoint directory that the real loader reads like moshiko's."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model = build_tiny_model(seed, persona=persona)
    config = dict(model.lm_config)
    config.update(TINY_FILES)
    name = TINY_PERSONA_MODEL_NAME if persona else TINY_MODEL_NAME
    config["model_id"] = {"name": name, "seed": seed, "test_model": True}
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    (directory / TINY_FILES["mimi_config_name"]).write_text(json.dumps(TINY_MIMI_CONFIG, indent=2))
    (directory / TINY_FILES["tokenizer_name"]).write_bytes(model.tokenizer_proto)
    save_file(_contiguous(model.lm.state_dict()), str(directory / TINY_FILES["moshi_name"]))
    save_file(_contiguous(model.mimi.state_dict()), str(directory / TINY_FILES["mimi_name"]))
    return directory


def _contiguous(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {key: value.detach().contiguous().clone() for key, value in state.items()}
