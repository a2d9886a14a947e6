"""The commands of docs/training.md and docs/corpus.md that run on the tiny configurations are run by tests, as
written (issue #17: documented commands that trained nothing, or needed flags the docs did not give)."""
import pathlib
import re

import pytest

from tests.doc_commands import ROOT, checkout_view, documented_commands, run_command

DOCS = ("docs/training.md", "docs/corpus.md")
RUN_BY_TESTS = {  # block marker -> the test that runs it
    "tests/test_training_chain.py runs": "tests/test_training_chain.py",
    "tests/test_docs.py runs": "tests/test_docs.py",
}


def all_sh_commands(doc):
    """Every command of every ```sh block of `doc`, continuation lines joined."""
    blocks = re.findall(r"```sh\n(.*?)```", (ROOT / doc).read_text(), flags=re.S)
    text = "\n".join(blocks).replace("\\\n", " ")
    return [" ".join(line.split()) for line in text.splitlines() if line.strip() and not line.startswith("#")]


def test_every_tiny_command_in_the_docs_is_run_by_a_test():
    tested = {" ".join(tokens) for marker in RUN_BY_TESTS for tokens in documented_commands("docs/training.md",
                                                                                              marker)}
    untested = [command.split("#")[0].strip() for doc in DOCS for command in all_sh_commands(doc)
                if ("hparams/tiny/" in command or "duplex_tiny.yaml" in command)]
    untested = [command for command in untested if command not in tested]
    assert untested == []
    assert all((ROOT / test).is_file() for test in RUN_BY_TESTS.values())


@pytest.mark.slow
def test_documented_csv_manifest_command_trains(tmp_path):
    """`data_prep: null` with the corpus maker's manifests, as docs/training.md shows it (2 tiny epochs)."""
    (command,) = documented_commands("docs/training.md", "tests/test_docs.py runs")
    with checkout_view(tmp_path):
        brain = run_command(command)
    assert brain.optimizer_step > 0 and brain.last_stage_stats["loss"] > 0
    saved = list((tmp_path / "results" / "tiny-csv" / "stage1" / "save").glob("CKPT+*"))
    assert len(saved) == 2
    assert not (tmp_path / "results" / "tiny-csv" / "stage1" / "manifests").exists()  # nothing prepared
