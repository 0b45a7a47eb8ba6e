"""The KV cache options against moshi's own cache: text logit error and greedy token agreement.

    ./run bench kv_agreement                   # tiny moshiko and PersonaPlex layouts on the CPU (float32)
    ./run bench kv_agreement --real-size       # their real architectures, random weights (bf16 on CUDA)

The LM alone, one slot, greedy, with random caller codes. The reference run (the model's dtype, moshi's
cache) records every token it chooses. Each other storage is then teacher-forced: it is fed the
reference's tokens (its own choices are recorded, then replaced), so every step's logits are compared on
the same history; two free runs would part at the first near-tie and compare nothing after it.

The 8-bit storages, and the fused kernel (its own summation order, in float32), are each compared with the
reference. Per variant, over `--steps` (600) steps: the text logits' error (largest |difference| over the
reference logits' spread: median, p99 and worst step), and greedy agreement: the share of steps whose
text token, and of (step, codebook) pairs whose model audio token, equal the reference's.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("NO_TORCH_COMPILE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from server.model.kv_compat import KvOptions  # noqa: E402
from server.model.moshi_step import GREEDY, MoshiStepper  # noqa: E402
from server.model.persona_gen import UNGENERATED  # noqa: E402
from server.model.persona_step import PersonaStepper, VoiceOptions, synthetic_voices  # noqa: E402
from server.model.random_model import RANDOM_MOSHIKO, RANDOM_PERSONAPLEX, build_random_model  # noqa: E402
from server.model.source import LoadedModel, ModelSource, load_model  # noqa: E402

VARIANTS = {  # the fused kernel runs on CUDA; elsewhere its torch reference
    "int8": KvOptions(storage="int8"),
    "fp8": KvOptions(storage="fp8"),
    "fused": KvOptions("fused"),
    "fused-int8": KvOptions("fused", "int8"),
    "window": KvOptions("window"),
}


class Record:
    """What one run chose at each step: text logits, text token, model audio tokens."""

    def __init__(self) -> None:
        self.logits: list[torch.Tensor] = []
        self.text: list[int] = []
        self.audio: list[np.ndarray] = []


def run_moshiko(model: LoadedModel, kv: KvOptions, codes: np.ndarray, forced: Record | None) -> Record:
    """Step LMGen directly; its public hooks see (and, when forced, overwrite) each step's choices."""
    stepper = MoshiStepper(model, 1, GREEDY, kv=kv)
    gen, record, device = stepper.generator, Record(), stepper.device
    step = [0]

    def on_text(token: torch.Tensor) -> None:
        record.text.append(int(token[0]))
        if forced is not None:
            token.fill_(forced.text[step[0]])

    def on_audio(tokens: torch.Tensor) -> None:
        record.audio.append(tokens[0].cpu().numpy().copy())
        if forced is not None:
            tokens.copy_(torch.from_numpy(forced.audio[step[0]])[None].to(device))

    gen.on_text_logits_hook = lambda logits: record.logits.append(logits[0].flatten().float().cpu())
    gen.on_text_hook, gen.on_audio_hook = on_text, on_audio
    try:
        stepper.reset_slots([0], [0])
        gen.set_exec_mask(torch.ones(1, dtype=torch.bool, device=device))
        with torch.no_grad():
            for step[0] in range(len(codes)):
                gen.step(torch.from_numpy(codes[step[0]]).to(device)[None, :, None])
    finally:
        stepper.close()
    return record


def run_persona(model: LoadedModel, kv: KvOptions, codes: np.ndarray, forced: Record | None) -> Record:
    """Step PersonaGen directly; a forced run is given the reference's text and audio as provided tokens."""
    stepper = PersonaStepper(model, 1, GREEDY, voices=VoiceOptions(synthetic=synthetic_voices()), kv=kv)
    gen, record, device = stepper.generator, Record(), stepper.device
    own = stepper.layout.model_codebooks
    channels = 1 + stepper.layout.n_q
    delays = list(model.lm.delays)

    def tap(logits: torch.Tensor, sampled: torch.Tensor) -> None:
        record.logits.append(logits[0].flatten().float().cpu())
        record.text.append(int(sampled[0, 0]))
        record.audio.append(sampled[0, 1 : 1 + own].cpu().numpy().copy())

    gen.step_tap = tap
    try:
        stepper.reset_slots([0], [0])
        gen.set_exec_mask(torch.ones(1, dtype=torch.bool, device=device))
        with torch.no_grad():
            for step in range(len(codes)):
                given = np.full((1, channels), UNGENERATED, dtype=np.int64)
                given[0, 1 + own :] = codes[step]
                # The tap's k-th call (step k + 1) chose what sits at cache position k + 1; a token given at
                # this step lands at step + its channel's delay.
                for channel in range(1 + own) if forced is not None else []:
                    k = step + delays[channel] - 1
                    if 0 <= k < len(forced.text):
                        given[0, channel] = forced.text[k] if channel == 0 else forced.audio[k][channel - 1]
                gen.step(torch.from_numpy(given).to(device))
    finally:
        stepper.close()
    return record


def compare(reference: Record, other: Record) -> dict:
    steps = min(len(reference.logits), len(other.logits))
    errors = np.array([float((a - b).abs().max() / a.std())
                       for a, b in zip(reference.logits[:steps], other.logits[:steps], strict=True)])
    text = np.array(reference.text[:steps]) == np.array(other.text[:steps])
    audio = np.stack(reference.audio[:steps]) == np.stack(other.audio[:steps])
    return {
        "steps_compared": steps,
        "text_logit_error_median": round(float(np.median(errors)), 4),
        "text_logit_error_p99": round(float(np.quantile(errors, 0.99)), 4),
        "text_logit_error_max": round(float(errors.max()), 4),
        "text_token_agreement": round(float(text.mean()), 4),
        "audio_token_agreement": round(float(audio.mean()), 4),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--real-size", action="store_true", help="the 7B architectures, random weights")
    parser.add_argument("--layouts", default="moshiko,personaplex")
    parser.add_argument("--variants", default="int8,fp8,fused,fused-int8",
                        help="KV options against the reference (moshi's ring in the model's dtype): " +
                             ", ".join(VARIANTS))
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--lm-layers", type=int, default=None, help="smoke runs only: fewer LM layers")
    args = parser.parse_args()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    rng = np.random.default_rng(0)
    for layout in args.layouts.split(","):
        persona = layout == "personaplex"
        if args.real_size:
            model = build_random_model(RANDOM_PERSONAPLEX if persona else RANDOM_MOSHIKO, device, dtype,
                                       lm_layers=args.lm_layers)
        else:
            model = load_model(ModelSource("tiny-persona" if persona else "tiny"), device, dtype)
        user = model.lm.n_q - model.lm.dep_q if not persona else model.lm.dep_q // 2
        codes = rng.integers(0, model.lm.card, size=(args.steps, user))
        run = run_persona if persona else run_moshiko
        reference = run(model, KvOptions(), codes, None)
        report = {"layout": layout, "model": model.name, "device": str(device),
                  "dtype": str(dtype).removeprefix("torch."), "torch": torch.__version__,
                  "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None}
        for name in args.variants.split(","):
            report[name] = compare(reference, run(model, VARIANTS[name], codes, reference))
        # The check of the check: the reference storage forced with its own tokens agrees with itself.
        report["model (self-check)"] = compare(reference, run(model, KvOptions(), codes, reference))
        print(json.dumps(report), flush=True)
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
