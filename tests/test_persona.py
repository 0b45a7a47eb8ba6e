"""PersonaPlex-style models: the caller reaches the model, prompts are replayed per slot, nothing leaks.

The tiny persona model has PersonaPlex's layout (n_q == dep_q: the depth
transformer predicts the model's codebooks, then the caller's). Stock LMGen
would read zero codebooks of the caller and sample all depth steps, so these
tests fail for any step that drops the caller or decodes the caller's half.
"""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import torch
from conftest import audio_of, noise_frames, run_call, spy, texts_of
from moshi.models.compression import MimiModel

from server.engine.setup import create_engine
from server.model.moshi_step import GREEDY
from server.model.persona import Persona, PersonaError, PersonaLimits
from server.model.persona_gen import PersonaGen
from server.model.persona_step import PersonaStepper, VoiceOptions, synthetic_voices
from server.model.source import ModelSource


@pytest.fixture
async def persona_engine():
    engine = create_engine(ModelSource("tiny-persona"), max_calls=3, sampling=GREEDY, cpu_threads=1)
    await engine.start()
    yield engine
    await engine.stop()


@pytest.fixture
def traffic(monkeypatch):
    """What PersonaGen returns, what Mimi encodes to and what it is asked to decode, step by step."""
    seen: dict[str, list[torch.Tensor]] = {"gen_out": [], "encoded": [], "decoded": []}
    spy(monkeypatch, PersonaGen, "step", lambda gen, args, out: seen["gen_out"].append(out.clone()))
    spy(monkeypatch, MimiModel, "encode", lambda mimi, args, codes: seen["encoded"].append(codes.clone()))
    spy(monkeypatch, MimiModel, "decode", lambda mimi, args, pcm: seen["decoded"].append(args[0].clone()))
    return seen


async def test_inspection_names_the_kind_of_model(persona_engine, tiny_engine):
    assert persona_engine.info.kind == "personaplex"
    assert "kind=personaplex" in persona_engine.info.layout
    assert "model_codebooks=4 user_codebooks=4" in persona_engine.info.layout
    assert isinstance(persona_engine.stepper, PersonaStepper)
    assert tiny_engine.info.kind == "moshi" and tiny_engine.prompt_book is None


async def test_the_callers_audio_reaches_the_model(persona_engine):
    """Same seed, same (empty) prompt: only the input differs, and so does the answer."""
    a = await run_call(persona_engine, noise_frames(1, 20), seed=7)
    a_again = await run_call(persona_engine, noise_frames(1, 20), seed=7)
    b = await run_call(persona_engine, noise_frames(2, 20), seed=7)
    assert np.array_equal(audio_of(a), audio_of(a_again)) and texts_of(a) == texts_of(a_again)
    assert np.abs(audio_of(a)).max() > 0.01
    assert not np.allclose(audio_of(a), audio_of(b), atol=1e-3)


async def test_the_caller_is_forced_into_the_depth_steps_and_only_the_models_codes_are_decoded(
    persona_engine, traffic
):
    for seen in traffic.values():
        seen.clear()
    await run_call(persona_engine, noise_frames(3, 12), seed=1)
    layout = persona_engine.stepper.layout
    own = layout.model_codebooks
    encoded, outs, decoded = traffic["encoded"], traffic["gen_out"], traffic["decoded"]
    # One encode per frame; the first frame is dropped, so LM step s sees encoded frame s + 1.
    assert len(encoded) == 12 and len(outs) == 11
    for s, out in enumerate(outs):
        frame = s - layout.max_delay  # the frame this step's output describes
        if frame >= 1:
            # The caller's half of the output is exactly what Mimi heard: provided, never sampled.
            assert torch.equal(out[0, 1 + own :], encoded[frame + 1][0, :own, 0])
    generated = [out for out in outs if (out[0] >= 0).all()]
    assert len(decoded) == len(generated) > 0
    for out, codes in zip(generated, decoded, strict=True):
        assert codes.shape[1] == own  # the model's codebooks only: never text, never the caller's
        assert torch.equal(codes[0, :, 0], out[0, 1 : 1 + own])


async def test_a_prompt_is_forced_token_by_token_and_changes_what_follows(persona_engine, traffic):
    plan = persona_engine.plan_persona(Persona(prompt="You are a pirate.", voice="test-low"))
    layout = persona_engine.stepper.layout
    for seen in traffic.values():
        seen.clear()
    prompted = await run_call(persona_engine, noise_frames(4, 16), seed=3, prompt=plan)
    replay = traffic["gen_out"][: plan.steps]
    for step, out in enumerate(replay):
        frame = step - layout.max_delay
        if frame >= 1:  # the forced tokens come back out where they were put: text, voice, tone
            assert torch.equal(out[0].cpu(), torch.from_numpy(plan.given[frame]))
    assert not traffic["decoded"][: plan.steps] or len(traffic["decoded"]) == len(traffic["gen_out"]) - plan.steps
    plain = await run_call(persona_engine, noise_frames(4, 16), seed=3)
    other = await run_call(persona_engine, noise_frames(4, 16), seed=3,
                           prompt=persona_engine.plan_persona(Persona(prompt="You are a pirate.", voice="test-high")))
    assert not np.allclose(audio_of(prompted), audio_of(plain), atol=1e-3)
    assert not np.allclose(audio_of(prompted), audio_of(other), atol=1e-3)


async def test_replaying_a_prompt_does_not_stall_or_touch_the_other_slots(persona_engine):
    """A neighbour paced in real time keeps its pace and its exact output while a long prompt replays."""
    frames = noise_frames(5, 40)
    alone = await run_call(persona_engine, frames, seed=11)
    long_plan = persona_engine.plan_persona(Persona(prompt="hello there how are you doing today " * 4))
    assert long_plan.steps > 60

    neighbour = await persona_engine.open_call(seed=11)
    prompted = None
    results = []
    loop = asyncio.get_running_loop()
    start = loop.time()
    for i, frame in enumerate(frames):
        if i == 5:
            prompted = await persona_engine.open_call(prompt=long_plan)
        await asyncio.sleep(max(0.0, start + 0.08 * i - loop.time()))  # a frame every 80 ms, as a caller
        result = await neighbour.process(frame)
        results.append(result)
        if prompted is not None and prompted.prompting:
            prompted.submit(frames[i])  # its caller talks meanwhile and gets silence back
    await neighbour.close()
    await prompted.prompt_done
    await prompted.close()

    assert prompted.stats.frames_during_prompt > 0
    assert persona_engine.stats.prompt_steps >= long_plan.steps
    assert neighbour.stats.frames_dropped == 0
    # How fast a prompt replays and how long a neighbour waits are timings: bench/persona_start.py and
    # bench/engine_step.py --persona measure them (a wall-clock bound here failed on a busy machine).
    assert np.array_equal(audio_of(results), audio_of(alone))  # nothing of the prompt leaked across
    assert texts_of(results) == texts_of(alone)


async def test_a_slot_forgets_its_last_callers_prompt(persona_engine):
    fresh = await run_call(persona_engine, noise_frames(6, 12), seed=5)
    plan = persona_engine.plan_persona(Persona(prompt="You are a pirate.", voice="test-low"))
    for slot_user in range(persona_engine.batch_size):  # leave a prompt, finished or half-replayed, in every slot
        call = await persona_engine.open_call(prompt=plan)
        if slot_user % 2:
            await call.prompt_done
        await call.close()
    after = await run_call(persona_engine, noise_frames(6, 12), seed=5)
    assert np.array_equal(audio_of(after), audio_of(fresh)) and texts_of(after) == texts_of(fresh)


async def test_bad_personas_are_refused_with_what_is_wrong(persona_engine, tiny_engine):
    book = persona_engine.prompt_book
    with pytest.raises(PersonaError, match=r"unknown voice 'nobody'; this server's voices: test-high, test-low"):
        persona_engine.plan_persona(Persona(voice="nobody"))
    most = book.limits.max_prompt_chars
    with pytest.raises(PersonaError, match=rf"characters long; this server takes at most {most}"):
        persona_engine.plan_persona(Persona(prompt="x" * (most + 1)))
    with pytest.raises(PersonaError, match=r"tokens long; this server takes at most"):
        persona_engine.plan_persona(Persona(prompt="x y " * 200))
    with pytest.raises(PersonaError, match=r"moshi-webrtc-tiny \(moshi\) takes no persona"):
        tiny_engine.plan_persona(Persona(prompt="You are a pirate."))
    with pytest.raises(PersonaError, match="persona.voice must be a string"):
        Persona.from_json({"voice": 3})
    with pytest.raises(PersonaError, match="unknown members: style"):
        Persona.from_json({"style": "pirate"})
    assert persona_engine.plan_persona(Persona(prompt="", voice="")).steps == 12  # just the two silences


async def test_voice_clips_come_from_a_folder_and_limits_apply(tmp_path):
    from server.caller import write_wav

    clips = synthetic_voices()
    write_wav(tmp_path / "alto.wav", clips["test-low"], 24000)
    write_wav(tmp_path / "long.wav", np.tile(clips["test-low"], 3), 24000)
    limits = PersonaLimits(max_voice_seconds=5.0)
    engine = create_engine(ModelSource("tiny-persona"), max_calls=1, sampling=GREEDY,
                           voices=VoiceOptions(folder=tmp_path, limits=limits))
    with pytest.raises(ValueError, match=r"voice long is 6.0 s long; voice clips may be at most 5 s"):
        await engine.start()
    await engine.stop()
    (tmp_path / "long.wav").unlink()
    engine = create_engine(ModelSource("tiny-persona"), max_calls=1, sampling=GREEDY,
                           voices=VoiceOptions(folder=tmp_path, limits=limits))
    await engine.start()
    try:
        assert engine.prompt_book.describe()["voices"] == ["alto"]
        assert engine.prompt_book.default_voice == "alto"
        plan = engine.plan_persona(Persona(voice="alto.wav"))
        assert plan.description.startswith("voice=alto")
    finally:
        await engine.stop()


async def test_a_model_that_takes_no_persona_refuses_voices():
    engine = create_engine(ModelSource("tiny"), max_calls=1, voices=VoiceOptions())
    with pytest.raises(ValueError, match="takes no persona, so voices cannot be used"):
        await engine.start()
    await engine.stop()


async def test_a_precomputed_voice_replays_exactly_like_its_clip(tmp_path, persona_engine):
    """PersonaPlex ships voices as `.pt` files (per-step embeddings and the final token cache). One made
    from a clip must give the very same conversation as the clip itself."""
    from server.model.persona import save_precomputed_voice

    recorded = await persona_engine.run_op(lambda: persona_engine.stepper.record_voice("test-low"))
    voice_steps = len(persona_engine.prompt_book.voices["test-low"].codes)
    assert recorded.embeddings.shape == (voice_steps - 1, 1, 64) and recorded.cache.shape == (9, 4)
    save_precomputed_voice(recorded, tmp_path / "low-pre.pt")
    clips = synthetic_voices()
    engine = create_engine(ModelSource("tiny-persona"), max_calls=2, sampling=GREEDY,
                           voices=VoiceOptions(folder=tmp_path, synthetic=clips))
    await engine.start()
    try:
        assert engine.prompt_book.voices["low-pre"].precomputed is not None
        persona = dict(prompt="You are a pirate.")
        from_clip = await run_call(engine, noise_frames(8, 16), seed=2,
                                   prompt=engine.plan_persona(Persona(voice="test-low", **persona)))
        from_file = await run_call(engine, noise_frames(8, 16), seed=2,
                                   prompt=engine.plan_persona(Persona(voice="low-pre.pt", **persona)))
        other = await run_call(engine, noise_frames(8, 16), seed=2,
                               prompt=engine.plan_persona(Persona(voice="test-high", **persona)))
    finally:
        await engine.stop()
    assert np.allclose(audio_of(from_file), audio_of(from_clip), atol=1e-5)
    assert texts_of(from_file) == texts_of(from_clip)
    assert not np.allclose(audio_of(other), audio_of(from_clip), atol=1e-3)


def test_a_precomputed_voice_for_another_model_is_refused(tmp_path):
    from server.model.persona import PrecomputedVoice, save_precomputed_voice

    save_precomputed_voice(PrecomputedVoice(torch.zeros(5, 1, 4096), torch.zeros(17, 4, dtype=torch.long)),
                           tmp_path / "NATF0.pt")
    stepper_options = VoiceOptions(folder=tmp_path)
    from server.engine.setup import build_stepper

    with pytest.raises(ValueError, match=r"NATF0.pt was made for another model: embeddings of width 4096"):
        build_stepper(ModelSource("tiny-persona"), 1, voices=stepper_options)


def test_a_personaplex_config_without_architecture_loads_as_moshi_7b_with_dep_q_16():
    """PersonaPlex's config.json may hold only its type; its loader uses moshi's 7B config with dep_q=16."""
    from moshi.models import loaders

    from server.model.check import ModelLayout, check_layout
    from server.model.source import complete_personaplex_config

    raw = {"model_type": "personaplex", "version": "7b-v1"}
    info = loaders.CheckpointInfo("w", "m", "t", {"version": "7b-v1"}, raw, None, "personaplex", None)
    complete_personaplex_config(info)
    assert info.lm_config == {**loaders._lm_kwargs, "dep_q": 16}
    lm = loaders.get_moshi_lm(None, lm_kwargs=info.lm_config, device="meta", dtype=torch.bfloat16)
    assert sum(p.numel() for p in lm.parameters()) == 8_371_408_896  # as PersonaPlex's own build
    layout = ModelLayout(card=lm.card, text_card=lm.text_card, n_q=lm.n_q, dep_q=lm.dep_q, delays=tuple(lm.delays),
                         mimi_codebooks=16, mimi_cardinality=2048, sample_rate=24000, frame_size=1920,
                         tokenizer_size=32000, device="meta", dtype="bfloat16")
    check_layout(layout, sample_rate=24000)
    assert (layout.kind, layout.model_codebooks, layout.user_codebooks) == ("personaplex", 8, 8)
    moshiko = loaders.CheckpointInfo("w", "m", "t", None, None, None, "moshi", None)
    complete_personaplex_config(moshiko)  # anything else is left alone
    assert moshiko.lm_config is None


def test_a_voices_archive_is_unpacked_once_with_regular_files_only(tmp_path):
    import io
    import tarfile

    from server.caller import write_wav
    from server.model.voices import voices_folder

    write_wav(tmp_path / "NATF0.wav", synthetic_voices()["test-low"], 24000)
    archive = tmp_path / "voices.tgz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tmp_path / "NATF0.wav", arcname="voices/NATF0.wav")
        link = tarfile.TarInfo("voices/evil.wav")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(link)
        note = tarfile.TarInfo("../outside.txt")
        note.size = 2
        tar.addfile(note, io.BytesIO(b"hi"))
    cache = tmp_path / "cache"
    with pytest.raises(Exception, match="outside"):  # a path out of the target is refused, not written
        voices_folder(archive, cache)
    assert not (tmp_path / "outside.txt").exists()
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tmp_path / "NATF0.wav", arcname="voices/NATF0.wav")
        link = tarfile.TarInfo("voices/evil.wav")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(link)
    folder = voices_folder(archive, cache)
    assert folder.name == "voices" and sorted(p.name for p in folder.iterdir()) == ["NATF0.wav"]
    assert voices_folder(archive, cache) == folder  # the second time, nothing is unpacked again


async def test_a_persona_checkpoint_directory_loads_through_the_same_path_as_moshiko(tmp_path):
    from server.model.tiny_model import write_tiny_checkpoint

    directory = write_tiny_checkpoint(tmp_path / "persona-ckpt", persona=True)
    engine = create_engine(ModelSource(str(directory)), max_calls=1, sampling=GREEDY)
    await engine.start()
    try:
        assert engine.info.kind == "personaplex" and engine.info.is_test_model
        assert engine.prompt_book is not None and engine.prompt_book.voices  # a test model gets test voices
        results = await run_call(engine, noise_frames(9, 8), prompt=engine.plan_persona(None))
        assert any(not r.silent for r in results)
    finally:
        await engine.stop()
