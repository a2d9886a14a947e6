"""CustomGenerator: CLI end to end on the tiny model, pass-2 state reuse == the reference's full re-prefill,
checkpoint + normaliser loading, bf16, readable CLI errors."""
import pathlib
import re
import subprocess
import sys

import numpy as np
import pytest
import soundfile
import torch

from CustomGenerator import CustomGenerator, GenerationOptions
from duplex.sampling import SamplingConfig
from modules.checkpoint import save_reference_checkpoint
from modules.model import load_inference_network, load_model_hparams
from modules.tokenizer import load_tokenizer
from src import prompts
from src.sequence import build_sequences

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY_YAML = ROOT / "duplex" / "duplex_tiny.yaml"
GREEDY = GenerationOptions(SamplingConfig(greedy=True), SamplingConfig(greedy=True), max_new_tokens=6)


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(3)


def speech_like(seconds=1.0, rate=16000, seed=0):
    """Noise shaped by a few moving formants: enough structure for the encoder, no TTS needed."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * rate)) / rate
    voiced = sum(np.sin(2 * np.pi * f * t * (1 + 0.1 * np.sin(3 * t))) for f in (220, 660, 1250))
    return (0.1 * voiced + 0.02 * rng.standard_normal(t.shape)).astype(np.float32)  # (N,)


def run_cli(*args):
    return subprocess.run([sys.executable, "CustomGenerator.py", *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, timeout=600)  # a hang guard, far above a loaded machine's run


@pytest.mark.slow
def test_cli_end_to_end_on_a_stereo_44k_file(tmp_path):
    path = tmp_path / "question.wav"
    soundfile.write(path, np.stack([speech_like(1.5, 44100)] * 2, axis=1), 44100)
    result = run_cli(TINY_YAML, "--wav_path", path, "--seed", 1)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert re.fullmatch(r"state token: <\|(endofuser|incomplete|ignore)\|>", lines[0])
    assert len(lines) >= 2


def test_cli_bad_input_is_one_line_not_a_traceback(tmp_path, capsys):
    """In process (the subprocess run above proves the script itself starts): exit code 2, one readable line."""
    from CustomGenerator import main
    assert main([str(TINY_YAML), "--wav_path", str(tmp_path / "missing.wav")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: {tmp_path / 'missing.wav'}: audio file not found; check the path"]


def reference_greedy(lm, prompt_embeds, state_ids, assistant_ids, steps):
    """The reference's way: re-run a full HF forward over the whole concatenation for every decision."""
    with torch.no_grad():
        logits = lm(prompt_embeds)[0, -1]  # (V,)
        state_ids = torch.tensor(state_ids)
        state_id = int(state_ids[logits[state_ids].argmax()])
        ids = [state_id] + assistant_ids
        reply = []
        for _ in range(steps):
            embeds = torch.cat([prompt_embeds, lm.embed(torch.tensor([ids + reply]))], dim=1)
            token = int(lm(embeds)[0, -1].argmax())
            if token == 0:
                break
            reply.append(token)
    return state_id, reply


def test_state_reuse_matches_full_reprefill(tokenizer):
    hparams = load_inference_network(TINY_YAML)
    net = hparams["net"]
    generator = CustomGenerator(net, tokenizer, GREEDY)
    wav = torch.from_numpy(speech_like(1.2))
    result = generator.generate(wav)
    with torch.no_grad():
        speech, lens = net["speech_encoder"](wav[None], torch.ones(1))  # (1, P, H)
    prompt = build_sequences(net["model"].lm.embed, [generator.prompt_ids], speech, lens, [generator.suffix_ids])
    state_id, reply = reference_greedy(net["model"].lm, prompt.inputs_embeds, generator.state_ids,
                                       generator.assistant_ids, GREEDY.max_new_tokens)
    assert result.state_token == tokenizer.convert_ids_to_tokens(state_id)
    assert result.reply_ids == reply and len(reply) > 0



def test_many_waveforms_together_give_what_each_gives_alone(tokenizer):
    """generate_many / transcribe_many run their jobs together on the scheduler (batched prefill of different
    lengths, batched decode steps); greedy results equal one waveform at a time."""
    net = load_inference_network(TINY_YAML)["net"]
    generator = CustomGenerator(net, tokenizer, GREEDY)
    wavs = [torch.from_numpy(speech_like(seconds, seed=i)) for i, seconds in enumerate((0.6, 1.3, 0.9, 1.3))]
    alone = [generator.generate(wav) for wav in wavs]
    together = generator.generate_many(wavs)
    assert [(r.state_token, r.reply_ids) for r in together] == [(r.state_token, r.reply_ids) for r in alone]
    instruction = prompts.ASR_SENTENCES[0]
    assert generator.transcribe_many(wavs, instruction) == [generator.transcribe(wav, instruction) for wav in wavs]

def test_modules_are_in_eval_mode_and_seed_reproduces(tokenizer):
    net = load_inference_network(TINY_YAML)["net"]
    assert not any(m.training for m in net["model"].modules())
    assert not any(m.training for m in net["speech_encoder"].modules())
    sampled = GenerationOptions(SamplingConfig(0.9, 0.7, 50), SamplingConfig(0.9, 0.7, 50), max_new_tokens=5)
    wav = torch.from_numpy(speech_like(0.8))
    first = CustomGenerator(net, tokenizer, sampled, seed=3).generate(wav)
    again = CustomGenerator(net, tokenizer, sampled, seed=3).generate(wav)
    assert first == again and first.state_token in prompts.STATE_TOKENS


def test_checkpoint_and_normalizer_are_loaded(tmp_path, tokenizer):
    source = load_model_hparams(overrides={"seed": 11})
    source["speech_encoder"].train()
    source["speech_encoder"](torch.randn(1, 16000) * 0.1, torch.ones(1), epoch=1)
    save_reference_checkpoint(source["model"], tmp_path, source["normalizer"])
    net = load_inference_network(TINY_YAML, checkpoint=tmp_path)["net"]
    assert torch.equal(net["normalizer"].glob_mean, source["normalizer"].glob_mean)
    source["model"].eval(), source["speech_encoder"].eval()
    wav = torch.from_numpy(speech_like(1.0))[None]
    with torch.no_grad():
        assert torch.equal(net["speech_encoder"](wav, torch.ones(1))[0],
                           source["speech_encoder"](wav, torch.ones(1))[0])
        assert torch.equal(net["model"].lm.model.lm_head.weight, source["model"].lm.model.lm_head.weight)


def test_bf16_puts_the_lm_in_bfloat16(tokenizer):
    net = load_inference_network(TINY_YAML, precision="bf16")["net"]
    assert net["model"].lm.model.lm_head.weight.dtype == torch.bfloat16
    assert net["model"].encoder.custom_src_module.layers[0].w.weight.dtype == torch.float32
    result = CustomGenerator(net, tokenizer, GREEDY).generate(torch.from_numpy(speech_like(0.6)))
    assert result.state_token in prompts.STATE_TOKENS


def test_tokenizer_without_state_tokens_is_refused():
    net = load_inference_network(TINY_YAML)["net"]
    with pytest.raises(ValueError, match="missing DuplexMamba's added tokens"):
        CustomGenerator(net, load_tokenizer(1), GREEDY)


def test_stage12_model_without_state_tokens_is_refused(tokenizer):
    net = load_inference_network(TINY_YAML, overrides={"net": {"num_state_tokens": 1}})["net"]
    with pytest.raises(ValueError, match="50278 vocabulary rows.*stage-1/2 model has no state tokens"):
        CustomGenerator(net, tokenizer, GREEDY)


def test_full_size_yaml_asks_for_its_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint found"):
        load_inference_network(ROOT / "duplex" / "duplex.yaml", checkpoint=tmp_path, device="cpu")


def test_unknown_device_name_is_a_clear_error():
    with pytest.raises(ValueError, match="device 'gpu' is not a torch device; use cpu, cuda or cuda:N"):
        load_inference_network(TINY_YAML, device="gpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_cuda_without_gpu_is_a_clear_error():
    with pytest.raises(ValueError, match="no CUDA GPU is available; use --device cpu"):
        load_inference_network(TINY_YAML, device="cuda")


@pytest.mark.cuda
def test_bf16_on_gpu_generates(tokenizer):
    net = load_inference_network(TINY_YAML, device="cuda", precision="bf16")["net"]
    weight = net["model"].lm.model.lm_head.weight
    assert weight.is_cuda and weight.dtype == torch.bfloat16
    result = CustomGenerator(net, tokenizer, GREEDY).generate(torch.from_numpy(speech_like(0.6)))
    assert result.state_token in prompts.STATE_TOKENS


@pytest.mark.cuda
def test_gpu_runtime_generates_what_the_cpu_reference_generates(tokenizer):
    """fp32 on the GPU backend (pool, fused kernels, graphs) = the CPU reference, greedy; the pool's one
    row is released after each file, so a second file works."""
    from duplex.cuda_runtime import CudaMambaRuntime
    wav = torch.from_numpy(speech_like(0.8))
    cpu = CustomGenerator(load_inference_network(TINY_YAML, device="cpu")["net"], tokenizer, GREEDY)
    gpu = CustomGenerator(load_inference_network(TINY_YAML, device="cuda")["net"], tokenizer, GREEDY)
    assert isinstance(gpu.runtime, CudaMambaRuntime)
    want = cpu.generate(wav)
    for _ in range(2):
        got = gpu.generate(wav)
        assert (got.state_token, got.reply_ids) == (want.state_token, want.reply_ids)
    assert gpu.runtime.free_rows == gpu.runtime.max_rows


def test_full_size_yaml_points_at_the_folder_stage_4_saves_to():
    """The reference read checkpoints/ while training wrote results/ (spec §8.10); ours must agree."""
    import yaml

    loader = type("IgnoreTags", (yaml.SafeLoader,), {})
    loader.add_multi_constructor("!", lambda loader_, suffix, node: None)
    stage4 = yaml.load((ROOT / "hparams" / "S2S" / "train_stage4.yaml").read_text(), Loader=loader)
    inference = yaml.load((ROOT / "duplex" / "duplex.yaml").read_text(), Loader=loader)
    assert inference["checkpoint"] == f"results/{stage4['experiment_name']}/{stage4['seed']}/save"
