"""scripts/pretrain_demo_gpu.sh end to end on the CPU with the demo YAMLs at toy batch sizes: both pre-trainings run
within their budgets and are packed in pieces under 15 MiB; a second call on a fresh copy (another machine) takes
the pieces back and continues with the next epoch instead of starting over."""
import os
import pathlib
import shutil
import subprocess
import sys
import tarfile

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
CORPUS = ROOT / "tests" / "data" / "corpus"
pytestmark = pytest.mark.slow  # four short recipe runs: about two minutes on 2 cores
LM_ARGS = ('--precision=fp32 --blocks_per_epoch=4 --block_size=32 --valid_blocks=2 '
           '--train_dataloader_opts={"batch_size":2} --valid_dataloader_opts={"batch_size":2}')
ASR_ARGS = ('--precision=fp32 --train_dataloader_opts={"num_workers":0} '
            '--valid_dataloader_opts={"batch_size":2} --test_dataloader_opts={"batch_size":2}')


def run_script(tmp_path, name, carry, epochs):
    """Run the script in a fresh copy of the repository (results/ lands there, as on a new machine)."""
    work = tmp_path / name
    shutil.copytree(ROOT, work, ignore=shutil.ignore_patterns(".venv", ".git", "results", "data", ".*"))
    out = tmp_path / f"{name}_out"
    env = dict(os.environ, DATA=str(CORPUS), CARRY=str(carry), OUT=str(out), EPOCHS=epochs, MINUTES="lm:5 asr:5",
               DEVICE="cpu", LM_ARGS=LM_ARGS, ASR_ARGS=ASR_ARGS,
               PATH=f"{pathlib.Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    done = subprocess.run(["bash", str(work / "scripts" / "pretrain_demo_gpu.sh")], env=env, cwd=work,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return out


def members(out, name):
    pieces = sorted(out.glob(f"{name}.tgz.part*"))
    assert pieces and all(piece.stat().st_size <= 15 * 2**20 for piece in pieces)
    joined = out / f"{name}.tgz"
    joined.write_bytes(b"".join(piece.read_bytes() for piece in pieces))
    with tarfile.open(joined) as archive:
        return archive.getnames()


def test_both_pretrainings_pack_and_continue_on_another_machine(tmp_path):
    first = run_script(tmp_path, "first", tmp_path / "nothing", "lm:1 asr:1")
    lm_names, asr_names = members(first, "demo_lm"), members(first, "demo_asr")
    assert any(n.endswith("lm/model.safetensors") for n in lm_names)
    assert any(n.endswith("optimizer.ckpt") for n in lm_names) and not any("/tokens/" in n for n in lm_names)
    assert any(n.endswith("model.ckpt") for n in asr_names) and any(n.endswith("normalizer.ckpt") for n in asr_names)

    second = run_script(tmp_path, "second", first, "lm:2 asr:2")
    for name in ("demo_lm", "demo_asr"):
        log = (second / f"{name}_train_log.txt").read_text()
        assert log.count("epoch: 1,") == 1 and log.count("epoch: 2,") == 1, f"{name} did not continue:\n{log}"
