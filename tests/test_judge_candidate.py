"""scripts/judge_candidate.sh refuses inputs that would compare the wrong things, before any evaluation runs."""
import pathlib
import subprocess

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "judge_candidate.sh"


def _run(*args):
    return subprocess.run(["bash", str(SCRIPT), *map(str, args)], capture_output=True, text=True, timeout=60)


def test_help_says_what_each_argument_is():
    done = _run("--help")
    assert done.returncode == 2
    assert "EXPORT CORPUS REAL OUT" in done.stdout and "compare_reports" in done.stdout


def test_a_corpus_without_the_scripts_or_real_set_without_asterisk_is_named(tmp_path):
    corpus, real, export = tmp_path / "corpus", tmp_path / "real", tmp_path / "export"
    for folder in (corpus / "conversations", corpus / "conversations-engine", real, export / "CKPT+x"):
        folder.mkdir(parents=True)
    for path in (corpus / "test.csv", corpus / "test-engine.csv", real / "real.csv"):
        path.write_text("ID\n")
    done = _run(export, corpus, real, tmp_path / "out")
    assert done.returncode == 2 and f"{real / 'real-asterisk.csv'} is missing" in done.stderr
    (real / "real-asterisk.csv").write_text("ID\n")
    (export / "CKPT+x").rmdir()
    done = _run(export, corpus, real, tmp_path / "out")
    assert done.returncode == 2 and "no CKPT+* folder" in done.stderr
    assert not (tmp_path / "out").exists()  # nothing was started
